"""Teacher vs student on this machine's CPU: the README's speedup, compression and accuracy table.

    python benchmarks/teacher_vs_student.py [--student RUN_DIR] [--threads N] [--out DIR]

Without --student it distills the default student first (15 epochs, ~4 min). Runs `kdedge bench
STUDENT --teacher resnet --targets torch-cpu,ort-cpu --batch-sizes 1,8,32,128 --min-s 2` through
the library, writes the full report (report.json, report.md, plots/) to --out, and prints the
summary tables in Markdown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.bench.harness import run_bench  # noqa: E402
from kdedge.config import BenchConfig, DistillConfig  # noqa: E402
from kdedge.runs import run_distill  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-s", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    student = args.student or str(run_distill(DistillConfig(out=tempfile.mkdtemp(prefix="kdedge-student-") + "/run"), progress=False).out)
    out = args.out or tempfile.mkdtemp(prefix="kdedge-tvs-") + "/report"
    config = BenchConfig(targets=("torch-cpu", "ort-cpu"), batch_sizes=(1, 8, 32, 128), min_s=args.min_s, threads=args.threads, out=out)
    report, out_dir = run_bench([student], teacher="resnet", config=config, log=lambda line: print(line, flush=True))
    env = report["env"]
    print(f"\n{env['cpu']['model']}, {env['cpu'].get('usable_cores')} cores ({' '.join(env['cpu'].get('flags', []))}), threads {args.threads or 'default'}, "
          f"torch {env['versions'].get('torch')}, onnxruntime {env['versions'].get('onnxruntime')}; full report: {out_dir}\n")
    rows = report["rows"]
    by = {(r["role"], r["variant"], r["batch"]): r for r in rows}
    print("| model | variant @ target | test acc | bytes | p50 batch 1 (ms) | samples/s batch 128 |")
    print("|---|---|---:|---:|---:|---:|")
    for (role, variant, batch), r in by.items():
        if batch != 1:
            continue
        big = by[(role, variant, 128)]
        print(f"| {r['model']} ({role}) | {variant} @ {r['target']} | {100 * r['accuracy']['top1']:.2f} % | {r['bytes'] / 1024:,.0f} KiB | "
              f"{r['latency_ms']['p50_ms']:.3f} | {big['throughput_per_s']:,.0f} |")
    print("\n| student | vs teacher | batch-1 p50 speedup | batch-128 throughput speedup | params ÷ | FLOPs ÷ | Δ acc (pt) | retention |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    comp = {(c["student_variant"], c["teacher_variant"], c["teacher_target"], c["batch"]): c for c in report["comparison"]}
    for (sv, tv, tt, b), c in comp.items():
        if b != 1:
            continue
        c128 = comp[(sv, tv, tt, 128)]
        print(f"| {sv} @ {c['student_target']} | {tv} @ {tt} | **{c['latency_speedup']:.1f}×** | {c128['throughput_speedup']:.1f}× | "
              f"{c.get('params_ratio', float('nan')):.1f}× | {c.get('flops_ratio', float('nan')):.1f}× | {c.get('accuracy_delta_pt', float('nan')):+.2f} | "
              f"{c.get('accuracy_retention', float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
