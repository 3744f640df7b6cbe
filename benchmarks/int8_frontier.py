"""The student's INT8 against the teacher, each at its own best runtime and settings, timed side by side.

    python benchmarks/int8_frontier.py KEEP_DIR          # KEEP_DIR from benchmarks/qat.py --keep: KEEP_DIR/fp32 and KEEP_DIR/qat

The teacher (the shipped ``resnet``) is exported to FP32 in every CPU runtime here (ONNX Runtime,
ExecuTorch, LiteRT, OpenVINO); the student to FP32 from KEEP_DIR/fp32 and to INT8 from its
quantization-aware model KEEP_DIR/qat (``kdedge.export_model(..., int8_model=...)``: the scales it
trained with), each scored on the 10,000 test images in its own runtime. Every artifact runs at
batch 1 with 1 and 2 threads (ONNX Runtime: tuned over threads, graph optimization and execution
mode); all candidates are timed in one interleaved measurement, then the teacher's best and the
student's best INT8 (and best FP32) are timed again head to head. The speedup is that last run's
ratio. Prints the tables and the CPU flags; writes benchmarks/results/int8_frontier_<student>_<name of KEEP_DIR>.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.bench.runners import EdgeRunner
from kdedge.bench.timing import measure_interleaved
from kdedge.bench.tuning import settings_call, tune_onnx
from kdedge.config import ExportConfig
from kdedge.metrics import evaluate

RUNTIMES = ("executorch", "litert", "openvino")
RESULTS = Path(__file__).resolve().parent / "results"


def _candidates(role: str, exported: kdedge.ExportResult, x1: np.ndarray, calls: dict, meta: dict) -> None:
    """A call per (artifact, settings) at batch 1: ONNX files at their tuned onnxruntime settings, edge artifacts at 1 and 2 threads."""
    for a in exported.artifacts:
        path = exported.out / a.path
        if a.format == "onnx":
            best = tune_onnx(path, x1).best
            name = f"{role} {a.format}-{a.precision} {best['intra_op_threads']}t"
            calls[name] = settings_call(path, x1, best)
            meta[name] = {"role": role, "artifact": f"{a.format}-{a.precision}", "settings": best, "accuracy": (a.accuracy or {}).get("accuracy")}
        elif a.format in RUNTIMES:
            for threads in (1, 2):
                name = f"{role} {a.format}-{a.precision} {threads}t"
                calls[name] = EdgeRunner(a.format, path, precision=a.precision, threads=threads).prepare(x1)
                meta[name] = {"role": role, "artifact": f"{a.format}-{a.precision}", "settings": {"threads": threads},
                              "accuracy": (a.accuracy or {}).get("accuracy")}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    keep = Path(argv[0])
    env = capture_environment()
    print(f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | cores {env['cpu'].get('usable_cores')} | "
          f"torch {torch.__version__} | onnxruntime {env['versions'].get('onnxruntime')}", flush=True)
    data = kdedge.load_dataset("fashion-mnist")
    x1 = data.test.inputs(slice(0, 1)).numpy()
    teacher = kdedge.resolve_teacher("resnet", data.spec)
    fp32, qat = kdedge.load_checkpoint(keep / "fp32"), kdedge.load_checkpoint(keep / "qat")
    calls: dict = {}
    meta: dict = {}
    with tempfile.TemporaryDirectory(prefix="kdedge-frontier-") as work:
        t_exp = kdedge.export_model(teacher.model, Path(work) / "teacher", data=data, model_name="resnet",
                                    config=ExportConfig(formats=("onnx", *RUNTIMES), evaluate=False))
        s_exp = kdedge.export_model(fp32.model, Path(work) / "student", data=data, model_name=fp32.spec.name, int8_model=qat.model,  # type: ignore[arg-type]
                                    config=ExportConfig(formats=("onnx", "onnx-int8", *RUNTIMES, *(f"{r}-int8" for r in RUNTIMES))))
        teacher_acc = evaluate(teacher.model, data.test).accuracy
        _candidates("teacher", t_exp, x1, calls, meta)
        _candidates("student", s_exp, x1, calls, meta)
        print(f"timing {len(calls)} candidates interleaved", flush=True)
        screen = measure_interleaved(calls, rounds=10, block_s=0.05)

        def best(role: str, precision: str | None = None) -> str:
            names = [n for n in calls if meta[n]["role"] == role and (precision is None or meta[n]["artifact"].endswith(precision))]
            return min(names, key=lambda n: screen[n].p50_ms)

        finals = {"teacher": best("teacher"), "student INT8": best("student", "int8"), "student FP32": best("student", "fp32")}
        head = measure_interleaved({k: calls[n] for k, n in finals.items()}, rounds=20, block_s=0.1)
    print("\n| candidate | screen p50 µs | accuracy |\n|---|---:|---:|")
    for n in sorted(calls, key=lambda n: (meta[n]["role"], screen[n].p50_ms)):
        acc = meta[n]["accuracy"] if meta[n]["role"] == "student" else teacher_acc
        print(f"| {n} | {1e3 * screen[n].p50_ms:.1f} | {acc:.4f} |")
    print("\n| model | best runtime and settings | head-to-head p50 µs | speedup vs teacher | test accuracy |\n|---|---|---:|---:|---:|")
    for k, n in finals.items():
        acc = meta[n]["accuracy"] if k != "teacher" else teacher_acc
        print(f"| {k} | {n.split(' ', 1)[1]} | {1e3 * head[k].p50_ms:.1f} | {head['teacher'].p50_ms / head[k].p50_ms:.1f}x | {acc:.4f} |")
    per_runtime = {}
    for r in ("onnx", *RUNTIMES):  # INT8 vs FP32 of the student, each runtime at its faster setting (screen run)
        p = {prec: min((screen[n].p50_ms for n in calls if meta[n]["role"] == "student" and meta[n]["artifact"] == f"{r}-{prec}"), default=None)
             for prec in ("fp32", "int8")}
        per_runtime[r] = p
    print("\n| runtime | student FP32 p50 µs | student INT8 p50 µs | INT8 / FP32 |\n|---|---:|---:|---:|")
    for r, p in per_runtime.items():
        if p["fp32"] and p["int8"]:
            print(f"| {r} | {1e3 * p['fp32']:.1f} | {1e3 * p['int8']:.1f} | {p['int8'] / p['fp32']:.2f} |")
    out = RESULTS / f"int8_frontier_{fp32.spec.name}_{keep.name}.json"
    out.write_text(json.dumps({"env": env, "student": fp32.spec.name, "teacher_test_accuracy": teacher_acc,
                               "candidates": {n: meta[n] | {"screen_p50_ms": screen[n].p50_ms} for n in calls},
                               "head_to_head": {k: {"candidate": n, "p50_ms": head[k].p50_ms, "speedup_vs_teacher": head["teacher"].p50_ms / head[k].p50_ms,
                                                    "accuracy": meta[n]["accuracy"] if k != "teacher" else teacher_acc} for k, n in finals.items()},
                               "student_int8_vs_fp32_p50_ms": per_runtime}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
