"""Distilled vs scratch: the same student, epochs, optimizer and seeds, with and without a teacher.

Prints a markdown table (accuracy per seed, mean ± std, epoch times) — the README's numbers:

    python benchmarks/kd_vs_scratch.py                      # defaults of `kdedge distill`, seeds 0 1 2
    python benchmarks/kd_vs_scratch.py --epochs 2 --train-limit 5000   # quick look

Epoch times: scratch is the mean over all epochs; distillation's epoch 1 includes filling the
teacher-logit cache (unless it was already on disk), so the comparison uses epochs 2..N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import kdedge
from kdedge.config import DistillConfig, TrainConfig
from kdedge.models import count_flops, count_parameters


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> int:
    defaults = DistillConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher", default=defaults.teacher)
    p.add_argument("--student", default=defaults.student)
    p.add_argument("--data", default=defaults.data)
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", default="disk", choices=["disk", "memory"])
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = p.parse_args()

    data = kdedge.load_dataset(args.data, train_limit=args.train_limit)
    resolved = kdedge.resolve_teacher(args.teacher, data.spec)
    teacher, teacher_name = resolved.model, resolved.name
    common = dict(data=args.data, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device, train_limit=args.train_limit)
    rows = []
    for seed in args.seeds:
        student, spec = kdedge.resolve_student(args.student, data.spec, seed)
        scratch = kdedge.train(student, data.train, data.test, config=TrainConfig(model=args.student, seed=seed, **common), spec=spec, progress=False)
        student, spec = kdedge.resolve_student(args.student, data.spec, seed)  # the same initial weights
        kd = kdedge.distill(
            student, teacher, data.train, data.test,
            config=DistillConfig(student=args.student, teacher=args.teacher, seed=seed, alpha=args.alpha, temperature=args.temperature, cache=args.cache, **common),
            student_spec=spec, teacher_name=teacher_name, progress=False,
        )
        rows.append({
            "seed": seed,
            "scratch": scratch.test.accuracy,
            "kd": kd.test.accuracy,
            "scratch_f1": scratch.test.macro_f1,
            "kd_f1": kd.test.macro_f1,
            "scratch_epoch_s": [h["seconds"] for h in scratch.history],
            "kd_epoch_s": [h["seconds"] for h in kd.history],
            "cache_hit": kd.metrics.get("teacher_cache", {}).get("hit"),
            "teacher_accuracy": kd.teacher_test.accuracy,
        })
        print(f"seed {seed}: scratch {scratch.test.accuracy:.4f}  kd {kd.test.accuracy:.4f}", file=sys.stderr, flush=True)

    student_model, _ = kdedge.resolve_student(args.student, data.spec, 0)
    shape = tuple(data.spec.input_shape)
    s_params, t_params = count_parameters(student_model), count_parameters(teacher)
    s_flops, t_flops = count_flops(student_model, shape), count_flops(teacher, shape)
    scratch_epoch = statistics.mean(t for r in rows for t in r["scratch_epoch_s"])
    kd_later = [t for r in rows for t in r["kd_epoch_s"][1:]]
    kd_epoch = statistics.mean(kd_later) if kd_later else float("nan")
    kd_first = statistics.mean(r["kd_epoch_s"][0] for r in rows)

    print(f"## Distilled vs scratch: {args.student} from {teacher_name} on {args.data}")
    print()
    print(f"{args.epochs} epochs, batch {args.batch_size}, SGD+Nesterov lr {args.lr} cosine, α={args.alpha}, T={args.temperature}, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", first {args.train_limit} training images" if args.train_limit else ""))
    print()
    print("| seed | scratch acc % | distilled acc % | Δ pt | scratch macro F1 | distilled macro F1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {100 * r['scratch']:.2f} | {100 * r['kd']:.2f} | {100 * (r['kd'] - r['scratch']):+.2f} | {r['scratch_f1']:.4f} | {r['kd_f1']:.4f} |")
    scratch_acc = [r["scratch"] for r in rows]
    kd_acc = [r["kd"] for r in rows]
    print(f"| **mean ± std** | **{_mean_std(scratch_acc)}** | **{_mean_std(kd_acc)}** | **{100 * (statistics.mean(kd_acc) - statistics.mean(scratch_acc)):+.2f}** | | |")
    print()
    print("| quantity | value |")
    print("|---|---:|")
    print(f"| teacher test accuracy | {100 * rows[0]['teacher_accuracy']:.2f} % |")
    print(f"| student / teacher parameters | {s_params:,} / {t_params:,} ({t_params / s_params:.1f}×) |")
    print(f"| student / teacher FLOPs per image | {s_flops / 1e6:.2f} M / {t_flops / 1e6:.1f} M (1/{t_flops / s_flops:.1f}) |")
    print(f"| scratch epoch time (mean of all epochs) | {scratch_epoch:.2f} s |")
    print(f"| distillation epoch 1 (incl. teacher-logit cache fill) | {kd_first:.2f} s |")
    print(f"| distillation epochs 2..N (mean) | {kd_epoch:.2f} s ({kd_epoch / scratch_epoch:.2f}× scratch) |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
