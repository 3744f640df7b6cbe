"""Prune the shipped teacher, recover by distillation, and compare with the same architecture from scratch.

    python benchmarks/prune.py run --speedup 4 --seed 0                 # one pruned child (~10-15 min on 2 cores)
    python benchmarks/prune.py run --latency-of tiny_cnn --seed 0       # pruned to the default student's measured p50
    python benchmarks/prune.py run --speedup 4 --seed 0 --scratch       # + the same pruned architecture from random weights
    python benchmarks/prune.py run --speedup 2 --data DIR --teacher RUN --image-size 32   # e.g. resnet_cifar on the RGB folder
    python benchmarks/prune.py table                                    # the frontier: one interleaved timing of everything
    python benchmarks/prune.py runtimes PRUNED.safetensors              # its bytes and p50 in ORT, ExecuTorch, LiteRT, OpenVINO, ORT format

`run` prunes with ``kdedge.prune`` (criterion chosen on the validation split, 3 steps; recovery
from the unpruned teacher) and appends the result to benchmarks/results/prune.json: test and
validation accuracy, the prune run's own measured speedup, wall time, and the pruned spec (its
kept widths), so `table` can rebuild it. ``--scratch`` also distills the pruned architecture from
random weights with distill's recipe (its from-scratch lr 0.05; the recovery fine-tunes at 0.01) for the same total epochs (the recovery's steps and final
epochs), on the same split: the prune-and-distill vs from-scratch comparison, and its wall time is
the cost comparison.

`table` times, in one interleaved set (onnxruntime, 1 thread, batch 1; ratios to the teacher
measured together), the teacher, every pruned child, the zoo's default student and the searched
students of benchmarks/search_dominance.json (their accuracies from that file), prints the
frontier table and writes benchmarks/results/prune_frontier.png. ``--runtimes RUN`` adds, for one
pruned run directory, its ONNX file size and its p50 in every installed edge runtime.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.config import PruneConfig
from kdedge.data.sources import hold_out
from kdedge.models import ModelSpec, create_model
from kdedge.pruning import prune

RESULTS = Path(__file__).resolve().parent / "results"
RECORD = RESULTS / "prune.json"


def _load() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.is_file() else {"runs": []}


def _save(rec: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(rec, indent=1) + "\n")


def _flags() -> str:
    env = capture_environment(1)
    return f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | onnxruntime {env['versions'].get('onnxruntime')}"


def run(args: argparse.Namespace) -> None:
    print(_flags(), flush=True)
    data = kdedge.load_dataset(args.data, image_size=args.image_size)
    data = hold_out(data, 0.1)  # one validation split for prune, criterion choice and scratch alike
    teacher = kdedge.resolve_teacher(args.teacher, data.spec)
    budget: dict = {"speedup": args.speedup}
    if args.latency_of:  # as a speedup: the teacher's p50 ÷ that model's, timed interleaved (an absolute µs budget would carry this moment's drift)
        from kdedge.search import LatencyMeter

        meter = LatencyMeter(data.test.batch_of(8), num_classes=data.spec.num_classes, rounds=9)
        spec = ModelSpec(*kdedge.models.zoo.parse_model_name(args.latency_of), data.spec.num_classes, tuple(data.spec.input_shape))
        r = meter.measure({args.latency_of: spec, "teacher": teacher.spec}, modules={"teacher": teacher.model})
        budget = {"speedup": r["teacher"]["ratio"] / r[args.latency_of]["ratio"]}
        print(f"budget: {args.latency_of}'s p50 is the teacher's ÷ {budget['speedup']:.2f}", flush=True)
    config = PruneConfig(model=args.teacher, seed=args.seed, steps=args.steps, step_epochs=args.step_epochs, epochs=args.epochs,
                         criterion=args.criterion, allocation=args.allocation, lr=args.lr, **budget)
    t0 = time.perf_counter()
    result = prune(teacher.model, data, config=config, spec=teacher.spec, teacher_name=teacher.name, teacher_input=teacher.input,
                   log=lambda line: print(line, flush=True), progress=False)
    wall = time.perf_counter() - t0
    row = {"teacher": args.teacher, "data": args.data, "budget": budget, "latency_of": args.latency_of, "seed": args.seed, "steps": args.steps,
           "step_epochs": args.step_epochs, "epochs": args.epochs, "lr": args.lr, "criterion": result.record["criterion"], "allocation": result.record.get("allocation"), "criteria": result.record["criteria"],
           "test_accuracy": result.run.test.accuracy, "val_accuracy": result.run.val.accuracy, "teacher_test_accuracy": result.run.teacher_test.accuracy,
           "result": result.record["result"], "spec": result.spec.to_dict() if result.spec else None, "wall_s": wall, "env": _flags()}
    print(f"pruned: test {row['test_accuracy']:.4f} (teacher {row['teacher_test_accuracy']:.4f}), "
          f"{row['result'].get('speedup', float('nan')):.2f}× measured, {wall:.0f} s", flush=True)
    if args.save_run:
        kdedge.save_checkpoint(args.save_run, result.model, result.spec, data.spec)
    if args.scratch:
        epochs = args.step_epochs * (args.steps - 1) + args.epochs
        torch.manual_seed(args.seed)
        scratch_model = create_model(result.spec)
        cfg = kdedge.DistillConfig(seed=args.seed, epochs=epochs)  # distill's from-scratch recipe (lr 0.05), not the fine-tune's 0.01
        t1 = time.perf_counter()
        sr = kdedge.distill(scratch_model, teacher.model, data.train, data.test, val_data=data.val, config=cfg, student_spec=result.spec,
                            teacher_name=teacher.name, teacher_input=teacher.input, progress=False)
        row["scratch"] = {"epochs": epochs, "test_accuracy": sr.test.accuracy, "val_accuracy": sr.val.accuracy, "wall_s": time.perf_counter() - t1}
        print(f"scratch ({epochs} epochs, same recipe): test {sr.test.accuracy:.4f}, {row['scratch']['wall_s']:.0f} s", flush=True)
    rec = _load()
    rec["runs"].append(row)
    _save(rec)


def table(args: argparse.Namespace) -> None:
    from kdedge.bench.runners import make_runner
    from kdedge.bench.timing import measure_interleaved
    from kdedge.exporters.onnx import export_onnx

    print(_flags(), flush=True)
    rec = _load()
    data = kdedge.load_dataset("fashion-mnist")
    x = data.test.batch_of(1)
    shape = tuple(data.spec.input_shape)
    teacher = kdedge.resolve_teacher("resnet", data.spec)
    models: dict[str, tuple[torch.nn.Module, float | None, str]] = {"teacher resnet": (teacher.model, None, "shipped")}
    groups: dict[str, list[dict]] = {}
    for r in rec["runs"]:
        if r["data"] != "fashion-mnist" or not r.get("spec"):
            continue
        label = f"pruned {r['budget'].get('speedup') or 'at ' + str(r['latency_of'])}{'×' if r['budget'].get('speedup') else ''}"
        if not r.get("allocation"):  # rows from before the allocation choice and the head-to-head bisection (their own group)
            label += " (first pruner)"
        groups.setdefault(label, []).append(r)
    for label, rows in groups.items():
        spec = ModelSpec.from_dict(rows[0]["spec"])
        models[label] = (create_model(spec), float(np.mean([r["test_accuracy"] for r in rows])), f"{len(rows)} seed(s)")
    dom = json.loads((RESULTS / "search_dominance.json").read_text()) if (RESULTS / "search_dominance.json").is_file() else None
    models["tiny_cnn (zoo)"] = (create_model(ModelSpec("tiny_cnn", 1.0, 10, shape)), dom["tiny_cnn"]["test_accuracy"] if dom else None, "search_dominance.json")
    if dom:
        for name, fin in dom["finalists"].items():
            models[f"searched {name}"] = (create_model(ModelSpec(name, 1.0, 10, shape)), fin["test_accuracy"], "search_dominance.json")
    with tempfile.TemporaryDirectory() as work:
        fns = {}
        for i, (name, (m, _acc, _src)) in enumerate(models.items()):
            path = Path(work) / f"{i}.onnx"
            export_onnx(m.eval(), path, input_shape=shape)
            fns[name] = make_runner("ort-cpu", path=path, threads=1).prepare(x)
        stats = measure_interleaved(fns, rounds=15)
    t50 = stats["teacher resnet"].p50_ms
    teacher_acc = kdedge.evaluate(teacher.model, data.test).accuracy
    print("\n| model | test accuracy | p50 µs (ORT, 1 thread, batch 1) | speedup vs teacher | accuracy from |\n|---|---:|---:|---:|---|")
    points = []
    for name, (m, acc, src) in models.items():
        acc = teacher_acc if acc is None else acc
        p50 = stats[name].p50_ms
        points.append((name, p50, acc))
        print(f"| {name} | {acc:.4f} | {p50 * 1000:.1f} | {t50 / p50:.1f}× | {src} |")
    for label, rows in groups.items():
        scratch = [r["scratch"] for r in rows if "scratch" in r]
        tests = ", ".join(f"{r['test_accuracy']:.4f}" for r in rows)
        seeds = ", ".join(str(r["seed"]) for r in rows)
        walls = ", ".join(f"{r['wall_s']:.0f}" for r in rows)
        line = f"\n{label}: test {tests} (seeds {seeds}); criteria chosen {', '.join(r['criterion'] for r in rows)}; prune wall {walls} s"
        if scratch:
            line += "; scratch test " + ", ".join(f"{s['test_accuracy']:.4f}" for s in scratch) + ", wall " + ", ".join(f"{s['wall_s']:.0f}" for s in scratch) + " s"
        print(line)
    rec["frontier"] = {"teacher_p50_ms": t50, "points": [{"model": n, "p50_ms": p, "test_accuracy": a} for n, p, a in points], "env": _flags()}
    _save(rec)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p50, acc in points:
        kind = "o" if name.startswith("pruned") else ("s" if name.startswith("teacher") else ("^" if name.startswith("searched") else "D"))
        ax.scatter(p50 * 1000, acc * 100, marker=kind)
        ax.annotate(name.replace("searched ", ""), (p50 * 1000, acc * 100), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("p50 µs (onnxruntime, 1 thread, batch 1; timed interleaved)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Pruned teacher vs zoo and searched students (Fashion-MNIST)")
    fig.tight_layout()
    fig.savefig(RESULTS / "prune_frontier.png", dpi=120)
    print(f"wrote {RESULTS / 'prune_frontier.png'}")
    if args.runtimes:
        _runtimes(args.runtimes, teacher)


def runtimes(args: argparse.Namespace) -> None:
    print(_flags(), flush=True)
    _runtimes(args.checkpoint, None)


def _runtimes(run_dir: str, teacher) -> None:
    """The pruned model's artifacts in every installed runtime: bytes and p50 (1 thread, batch 1), with the teacher's alongside."""
    from kdedge.bench.harness import run_bench
    from kdedge.bundle import installed_edge_formats
    from kdedge.config import BenchConfig

    targets = ["ort-cpu"] + [t for f, t in (("executorch", "executorch-cpu"), ("litert", "litert-cpu"), ("openvino", "openvino-cpu"),
                                            ("ort", "ort-mobile-cpu")) if f in installed_edge_formats()]
    with tempfile.TemporaryDirectory() as work:
        cfg = BenchConfig(targets=tuple(targets), batch_sizes=(1,), threads=1, export_variants=("fp32",), plots=False, out=str(Path(work) / "bench"),
                          min_s=0.5)
        report, _ = run_bench([run_dir], teacher="resnet", config=cfg)
    print("\n| model | variant | target | artifact bytes | p50 µs (1 thread, batch 1) |\n|---|---|---|---:|---:|")
    for row in report["rows"]:
        print(f"| {row['model']} | {row['variant']} | {row['target']} | {row.get('bytes') or ''} | {row['latency_ms']['p50_ms'] * 1000:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--speedup", type=float, default=4.0)
    r.add_argument("--latency-of", help="prune to this zoo model's measured p50 instead (e.g. tiny_cnn)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--step-epochs", type=int, default=2)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--lr", type=float, default=PruneConfig.lr, help="the recovery's peak learning rate")
    r.add_argument("--criterion", default="auto")
    r.add_argument("--allocation", default="auto", help="latency, uniform, or auto (both tried on step 1; the better on validation)")
    r.add_argument("--data", default="fashion-mnist")
    r.add_argument("--teacher", default="resnet")
    r.add_argument("--image-size", type=int)
    r.add_argument("--scratch", action="store_true")
    r.add_argument("--save-run", help="also save the pruned checkpoint here (for table --runtimes)")
    t = sub.add_parser("table")
    t.add_argument("--runtimes", help="a pruned checkpoint: its bytes and p50 in every installed runtime")
    rt = sub.add_parser("runtimes")
    rt.add_argument("checkpoint", help="a pruned checkpoint: its bytes and p50 in every installed runtime, with the teacher's")
    args = ap.parse_args()
    {"run": run, "table": table, "runtimes": runtimes}[args.cmd](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
