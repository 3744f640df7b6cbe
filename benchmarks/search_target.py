"""A search timed on an edge runtime at INT8: is its pick within budget in that runtime, and how steady is the pick?

    python -m kdedge search --target litert-cpu --target-precision int8 --latency-budget B --out runs/s-litert
    python benchmarks/search_target.py --search runs/s-litert            # ~10 min on 2 cores

Issue 27's acceptance for ``--target litert-cpu --target-precision int8`` with B = the default
student's LiteRT INT8 p50 ÷ 2:

1. The pick (``SEARCH/student``) exported as ``kdedge export`` does (LiteRT FP32 and INT8, calibrated
   on 512 training images) and scored in LiteRT on the 10,000 test images.
2. The pick's INT8 file and the default student's (``tiny_cnn``; ``--reference RUN`` for a trained
   one, else its seed-0 initialization: latency is the architecture's) timed with two bare
   ``ai_edge_litert`` ``Interpreter``s, 1 thread, batch 1, interleaved (15 blocks each), 5 times: the
   pick's p50 and its ratio to the default student's in each re-timing, their spread.
3. The pick made again 20 times from the latency cache, as a new search on this machine would: every
   candidate's cached ratio scaled by a freshly measured anchor, the budget applied, the finalists
   (the search's, in proxy order among those still within budget) re-timed head to head and picked
   by ``kdedge.search.run.pick``. How often the pick changes, and why.

Prints the tables and writes benchmarks/results/search_target.json. CPU flags are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.bench.timing import measure_interleaved
from kdedge.config import ExportConfig
from kdedge.models import ModelSpec, create_model, load_checkpoint
from kdedge.models.zoo import parse_model_name
from kdedge.search.latency import LatencyCache, LatencyMeter
from kdedge.search.run import HEAD_TO_HEAD_ROUNDS, pick

RESULTS = Path(__file__).resolve().parent / "results"


def _export(model: torch.nn.Module, out: Path, data, *, evaluate: bool) -> kdedge.ExportResult:
    config = ExportConfig(formats=("litert", "litert-int8"), evaluate=evaluate)
    return kdedge.export_model(model, out, data=data, config=config)


def _bare(path: Path, x: np.ndarray):
    """A bare LiteRT Interpreter on ``path``, 1 thread, the input set: its ``invoke`` is one inference."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    (inp,) = interp.get_input_details()
    interp.resize_tensor_input(inp["index"], [1, *x.shape[1:]])
    interp.allocate_tensors()
    (inp,) = interp.get_input_details()
    feed = x[:1].astype(np.float32)
    if inp["dtype"] == np.int8:
        scale, zero = inp["quantization"]
        feed = np.clip(np.round(feed / scale) + zero, -128, 127).astype(np.int8)
    interp.set_tensor(inp["index"], feed)
    interp.invoke()
    return interp.invoke


def _reselect(record: dict, data, x: np.ndarray) -> tuple[str, str]:
    """The pick a new search on the latency cache would make: (winner, why it differs, or "")."""
    t = record["target"]
    cache = LatencyCache.open(t["name"], t["threads"], t["batch"], precision=t.get("precision", "fp32"))
    meter = LatencyMeter(x, num_classes=data.spec.num_classes, target=t["name"], threads=t["threads"], batch=t["batch"], cache=cache,
                         precision=t.get("precision", "fp32"))
    cands = record["candidates"]
    specs = {n: ModelSpec(*parse_model_name(n), data.spec.num_classes, tuple(data.spec.input_shape)) for n in cands}
    lat = meter.measure(specs)
    budget = t["latency_budget_ms"]
    survivors = [n for n in cands if lat[n]["p50_ms"] <= budget and "proxy_val_accuracy" in cands[n]]
    unranked = [n for n in cands if lat[n]["p50_ms"] <= budget and "proxy_val_accuracy" not in cands[n]]
    ranked = sorted(survivors, key=lambda n: (-cands[n]["proxy_val_accuracy"], lat[n]["p50_ms"]))
    finalists = ranked[: len(record["finalists"])]
    untrained = [n for n in finalists if record["finalists"].get(n, {}).get("val_accuracy") is None]
    if untrained:
        return "?", f"finalist(s) {', '.join(untrained)} not trained by the search (now among the top {len(finalists)} by proxy within budget)"
    h2h = meter.measure({n: specs[n] for n in finalists}, fresh=True, rounds=HEAD_TO_HEAD_ROUNDS)
    fin = record["finalists"]
    winner = pick(finalists, {n: fin[n]["val_accuracy"] for n in finalists}, {n: lat[n]["p50_ms"] for n in finalists},
                  {n: v["p50_ms"] for n, v in h2h.items()}, budget)
    why = "" if winner == record["winner"] else f"finalists {finalists}, re-timed {[round(h2h[n]['p50_ms'] * 1e3, 2) for n in finalists]} µs"
    if unranked:
        why += f" (+{len(unranked)} within budget never ranked)"
    return winner, why


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", type=Path, required=True, help="a kdedge search output directory (search.json, student/)")
    ap.add_argument("--reference", type=Path, help="a trained default-student run directory (default: tiny_cnn at its seed-0 initialization)")
    ap.add_argument("--retimings", type=int, default=5)
    ap.add_argument("--reselections", type=int, default=20)
    args = ap.parse_args()
    record = json.loads((args.search / "search.json").read_text())
    t = record["target"]
    if t["name"] != "litert-cpu":
        sys.exit(f"search_target.py times LiteRT files; {args.search} searched on {t['name']}")
    env = capture_environment(1)
    print(f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | torch {torch.__version__}")
    data = kdedge.load_dataset(record["data"].get("name", "fashion-mnist"))
    x = data.test.batch_of(32)
    student = load_checkpoint(args.search / "student")
    if args.reference:
        reference = load_checkpoint(args.reference).model
    else:
        torch.manual_seed(0)
        reference = create_model(ModelSpec("tiny_cnn", 1.0, data.spec.num_classes, tuple(data.spec.input_shape)))
    out: dict = {"env": env, "search": str(args.search), "target": t, "winner": record["winner"], "searched_winner_p50_ms": record["winner_p50_ms"],
                 "head_to_head": record.get("head_to_head")}
    with tempfile.TemporaryDirectory() as work:
        pick_export = _export(student.model, Path(work) / "pick", data, evaluate=True)
        ref_export = _export(reference, Path(work) / "ref", data, evaluate=args.reference is not None)
        acc = {f"{a.format}-{a.precision}": a.accuracy["accuracy"] for a in pick_export.artifacts if a.accuracy}
        out["pick_accuracy"] = acc
        print(f"\npick {record['winner']}: LiteRT accuracy on the test split " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in acc.items()))
        fin = record["finalists"][record["winner"]]
        print(f"  (search: full-recipe val {100 * fin['val_accuracy']:.2f} %, test {100 * fin['test_accuracy']:.2f} %)")
        paths = {name: next(Path(work, name).glob("model.int8.tflite")) for name in ("pick", "ref")}
        fns = {name: _bare(p, x) for name, p in paths.items()}
        rows = []
        print(f"\nbare Interpreter, 1 thread, batch 1, interleaved ({HEAD_TO_HEAD_ROUNDS} blocks each); budget {t['latency_budget_ms'] * 1e3:.2f} µs")
        print(f"{'re-timing':>9}  {'pick µs':>8}  {'tiny_cnn µs':>11}  {'pick / tiny_cnn':>15}  within budget")
        for i in range(args.retimings):
            stats = measure_interleaved(fns, rounds=HEAD_TO_HEAD_ROUNDS)
            p, r = stats["pick"].p50_ms, stats["ref"].p50_ms
            rows.append({"pick_p50_ms": p, "reference_p50_ms": r, "ratio": p / r})
            print(f"{i + 1:>9}  {p * 1e3:8.2f}  {r * 1e3:11.2f}  {p / r:15.3f}  {p <= t['latency_budget_ms']}")
        ratios = [row["ratio"] for row in rows]
        p50s = [row["pick_p50_ms"] for row in rows]
        print(f"pick p50 {min(p50s) * 1e3:.2f}-{max(p50s) * 1e3:.2f} µs (spread {(max(p50s) - min(p50s)) / np.median(p50s):.0%}); "
              f"ratio to tiny_cnn {min(ratios):.3f}-{max(ratios):.3f}, median {np.median(ratios):.3f} (B = tiny_cnn ÷ 2 asks ≤ 0.5)")
        out["retimings"] = rows
    print(f"\n{args.reselections} picks on the latency cache (fresh anchor, budget, finalists re-timed head to head):")
    picks = []
    for i in range(args.reselections):
        winner, why = _reselect(record, data, x)
        picks.append({"winner": winner, "why": why})
        print(f"  {i + 1:2d}: {winner}{'  <- ' + why if why else ''}")
    changed = sum(p["winner"] != record["winner"] for p in picks)
    print(f"the pick changed in {changed} of {len(picks)}")
    out["reselections"] = picks
    out["pick_changed"] = changed
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search_target.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
