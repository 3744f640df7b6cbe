"""The one-decision bundle at three budgets on LiteRT, one thread (issue 27, item 5's acceptance).

    python benchmarks/decide_budgets.py                 # ~3 bundles; the search and pruning at reduced settings (below)
    python benchmarks/decide_budgets.py --quick         # 2,000 training images, 1 epoch: checks the script, measures nothing

B0 is the default student's (``tiny_cnn``) LiteRT INT8 p50 at 1 thread, batch 1, measured here by the
search's latency meter (ratio to its anchor, interleaved). For each budget k x B0 (k = 0.5, 1, 2),
``kdedge.compress_and_export`` with ``latency_budget``, ``target="litert-cpu"``, ``deploy_threads=1``
and every contender (``searched``, ``pruned``, ``student``) decides; its decision (every contender
at FP32 and INT8 in LiteRT: validation accuracy computed by LiteRT, p50 timed interleaved with the
others and the teacher) is printed with the shipped model's test accuracy from the bundle, and
compared with each single lever's best file within the budget:

- search: the searched student's best in-budget file;
- prune: the pruned teacher's best in-budget file;
- INT8 (PTQ): the default student's INT8 file, if in budget; FP32 default student likewise.

The decision takes the most accurate in-budget file of their union, so it is never below any of them on
validation; the table shows by how much it beats each. Reduced settings (to fit a 2-core session): the search
samples 16 candidates + 2 generations of 6 children, ranks on 10,000 images for 2 epochs, trains 2 finalists;
pruning takes 2 steps (magnitude, uniform) with 1 recovery epoch between them; every final recipe is 6 epochs.
Writes benchmarks/results/decide_budgets.json (with the CPU flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.bundle import GateFailure, compress_and_export
from kdedge.config import CompressConfig, SearchConfig
from kdedge.data import load_dataset
from kdedge.models import ModelSpec
from kdedge.search.latency import LatencyMeter

RESULTS = Path(__file__).resolve().parent / "results"


def default_student_p50(target: str) -> float:
    """tiny_cnn's INT8 p50 on ``target`` (1 thread, batch 1) by the search's meter: the ratio to its anchor x the anchor's p50."""
    data = load_dataset("fashion-mnist", train_limit=1000, test_limit=100)
    meter = LatencyMeter(data.test.batch_of(LatencyMeter.CALIBRATION), num_classes=10, target=target, precision="int8", rounds=15)
    spec = ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28))
    return meter.measure({"tiny_cnn": spec}, fresh=True)["tiny_cnn"]["p50_ms"]


def _levers(rows: list[dict], budget: float) -> dict[str, dict | None]:
    def best(pred) -> dict | None:
        ok = [r for r in rows if pred(r) and r.get("p50_ms", float("inf")) <= budget]
        return max(ok, key=lambda r: r["val_accuracy"]) if ok else None

    return {"search": best(lambda r: r["contender"] == "searched"), "prune": best(lambda r: r["contender"] == "pruned"),
            "int8 (PTQ) of the default student": best(lambda r: r["contender"] == "student" and r["precision"] == "int8"),
            "default student fp32": best(lambda r: r["contender"] == "student" and r["precision"] == "fp32")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="litert-cpu")
    ap.add_argument("--factors", default="0.5,1,2")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "decide_budgets.json"))
    args = ap.parse_args()
    env = capture_environment(1)
    b0 = default_student_p50(args.target)
    print(f"B0 = tiny_cnn INT8 p50 on {args.target}, 1 thread: {1000 * b0:.2f} µs")
    small = {"train_limit": 2000, "test_limit": 500, "epochs": 1, "prune_step_epochs": 1} if args.quick else {"epochs": 6, "prune_step_epochs": 1}
    runs = []
    for k in [float(f) for f in args.factors.split(",")]:
        budget = k * b0
        with tempfile.TemporaryDirectory(prefix="kdedge-decide-") as tmp:
            config = CompressConfig(**small, latency_budget=budget, target=args.target, deploy_threads=1, contenders=("searched", "pruned", "student"),
                                    targets=("ort-cpu", args.target), batch_sizes=(1,), prune_steps=2, prune_criterion="magnitude",
                                    prune_allocation="uniform", tune_runtime=False, out=str(Path(tmp) / "bundle"))
            search = SearchConfig(latency_budget=budget, candidates=4 if args.quick else 16, generations=0 if args.quick else 2, children=6,
                                  proxy_samples=1000 if args.quick else 10000, proxy_epochs=1 if args.quick else 2, finalists=1 if args.quick else 2,
                                  time_budget=8.0)
            t0 = time.perf_counter()
            try:
                result = compress_and_export(config, search=search, log=lambda line: print("  " + line, flush=True))
                manifest, out = result.manifest, result.out
            except GateFailure as exc:
                print(f"  {exc}")
                out = Path(tmp) / "bundle.rejected"
                manifest = json.loads((out / "manifest.json").read_text())
            seconds = time.perf_counter() - t0
        d = manifest["decision"]
        levers = _levers(d["rows"], budget)
        run = {"factor": k, "budget_ms": budget, "seconds": seconds, "decision": d, "gates": manifest["gates"],
               "shipped_test_accuracy": manifest["student"]["test_accuracy"], "levers": levers}
        runs.append(run)
        print(f"\nbudget {k:g} x B0 = {1000 * budget:.2f} µs ({seconds / 60:.1f} min)")
        print(f"{'contender':<10} {'prec':<5} {'architecture':<34} {'val %':>6} {'p50 µs':>8} {'p10-p90 µs':>13}  verdict")
        for r in d["rows"] + d["teacher"]:
            rng = "-".join(f"{1000 * v:.1f}" for v in r.get("p50_range_ms", []))
            print(f"{r['contender']:<10} {r['precision']:<5} {r['architecture'][:34]:<34} {100 * r.get('val_accuracy', float('nan')):>6.2f} "
                  f"{1000 * r.get('p50_ms', float('nan')):>8.2f} {rng:>13}  {r['verdict']}")
        for name, why in d["not_built"].items():
            print(f"{name:<10} not built: {why}")
        w = d["winner"]
        if w:
            print(f"shipped: {w['contender']} {w['precision']} {w['architecture']}: p50 {1000 * w['p50_ms']:.2f} µs vs budget {1000 * budget:.2f} µs, "
                  f"validation {100 * w['val_accuracy']:.2f} %, test {100 * run['shipped_test_accuracy']:.2f} % (FP32 in PyTorch)")
            for lever, r in levers.items():
                print(f"  vs {lever:<34}: " + (f"{100 * (w['val_accuracy'] - r['val_accuracy']):+.2f} pt ({r['contender']} {r['precision']})"
                                                if r else "nothing within the budget"))
        else:
            print("shipped: nothing within the budget (the latency_budget gate rejected the fastest)")
    record = {"script": "benchmarks/decide_budgets.py", "argv": sys.argv[1:], "kdedge": kdedge.__version__, "b0_ms": b0, "target": args.target,
              "cpu": env["cpu"], "runs": runs}
    if not args.quick:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
