"""The teacher's pass over 60,000 Fashion-MNIST training images, per runtime (issue 16).

    python benchmarks/teacher_pass.py [--rounds 2] [--threads 2] [--limit N] [--json benchmarks/results/teacher_pass.json]

What a cache costs: the logit cache is one pass, K stored views are K passes. For the shipped
teacher (ResNet, 52 MFLOPs per image) and a ~150-MFLOP CNN (the same ResNet at width 1.7, random
weights: speed does not depend on them), the script times whole passes in

* torch eager as kdedge ran the pass before issue 16 (FrozenTeacher, channels-last, batch 500),
* torch eager with contiguous NCHW inputs,
* onnxruntime as :func:`kdedge.distill.teacher_pass.teacher_pass` runs it (exported with the input
  map, intra-op threads = torch's), batch 500,

interleaved round by round (this machine drifts ±25 % over seconds), and reports the median
images/s, the ratio to torch eager, the runtime `teacher_pass` chooses, and the max |Δ| between
onnxruntime's and torch's logits over the whole pass. The CPU flags are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kdedge.bench.env import capture_environment
from kdedge.data import load_dataset
from kdedge.distill.teacher import FrozenTeacher
from kdedge.distill.teacher_pass import teacher_pass
from kdedge.models.zoo import ModelSpec, count_flops, create_model, load_checkpoint, pretrained_path


def _pass(score, data, batch: int) -> tuple[float, torch.Tensor]:
    """Seconds for one pass over ``data`` and the logits it produced."""
    index = (torch.arange(i, min(i + batch, len(data))) for i in range(0, len(data), batch))
    out = []
    start = time.perf_counter()
    for _idx, x, _y in data.batches(index):
        out.append(score(x))
    return time.perf_counter() - start, torch.cat(out)


def measure(name: str, model: torch.nn.Module, data, *, rounds: int, batch: int) -> dict:
    nchw = FrozenTeacher(copy.deepcopy(model), channels_last=False)
    cl = FrozenTeacher(model, channels_last=True)
    probe = next(iter(data.batches([torch.arange(256)])))[1]
    chosen = teacher_pass(cl, probe)  # what kdedge's cache passes do: parity check, interleaved timing on the probe, choice
    ort = teacher_pass(cl, probe, runtime="onnxruntime")
    runners = {"torch eager, channels-last (kdedge before)": cl, "torch eager, NCHW": nchw, "onnxruntime": ort}
    seconds: dict[str, list[float]] = {k: [] for k in runners}
    logits: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        for label, score in runners.items():
            s, out = _pass(score, data, batch)
            seconds[label].append(s)
            logits[label] = out
            print(f"  {name} round {r + 1}: {label:<44} {s:6.1f} s  ({len(data) / s:,.0f} images/s)", flush=True)
    base = statistics.median(seconds["torch eager, channels-last (kdedge before)"])
    rows = [{"runtime": label, "seconds": statistics.median(s), "images_per_s": len(data) / statistics.median(s),
             "vs_torch_eager": base / statistics.median(s), "all_seconds": s} for label, s in seconds.items()]
    diff = float((logits["onnxruntime"] - logits["torch eager, channels-last (kdedge before)"]).abs().max())
    return {"teacher": name, "flops": count_flops(model, (1, 28, 28)), "images": len(data), "rows": rows, "chosen": chosen.runtime,
            "chosen_probe_rates": chosen.describe(), "max_abs_diff_whole_pass": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--limit", type=int, default=None, help="first N training images (smoke test)")
    ap.add_argument("--json", default="benchmarks/results/teacher_pass.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", train_limit=args.limit).train
    shipped = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
    torch.manual_seed(0)
    wide = create_model(ModelSpec("resnet", 1.7, 10, (1, 28, 28)))
    env = capture_environment(None)
    print(f"CPU: {env['cpu']['model']}, flags {' '.join(env['cpu']['flags'])}; {args.threads} threads", flush=True)
    results = [measure("shipped resnet", shipped, data, rounds=args.rounds, batch=args.batch)]
    results.append(measure("resnet@1.7", wide, data, rounds=args.rounds, batch=args.batch))
    print(f"\n{len(data):,} images, {args.threads} threads, batch {args.batch}, median of {args.rounds} interleaved rounds\n")
    print("| teacher | MFLOPs | runtime | s per pass | images/s | × torch eager |")
    print("|---|---:|---|---:|---:|---:|")
    for r in results:
        for row in r["rows"]:
            print(f"| {r['teacher']} | {r['flops'] / 1e6:.0f} | {row['runtime']} | {row['seconds']:.1f} | {row['images_per_s']:,.0f} | {row['vs_torch_eager']:.2f} |")
    for r in results:
        print(f"{r['teacher']}: teacher_pass chose {r['chosen_probe_rates']}; onnxruntime vs torch over the pass: max |Δ| {r['max_abs_diff_whole_pass']:.1e}")
    if args.json and not args.limit:
        Path(args.json).write_text(json.dumps({"env": env, "threads": args.threads, "batch": args.batch, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
