"""Per-layer INT8 sensitivity of a trained student, and what keeping layers in float buys and costs in each runtime.

    python benchmarks/keep_float.py RUN_DIR [--keep auto|N ...] [--max-drop PT]

RUN_DIR is a Fashion-MNIST student trained with 10 % of the training images held out (as
``benchmarks/qat.py --keep DIR`` leaves DIR/fp32): those 6,000 images are where sensitivity is
measured (:func:`kdedge.layer_sensitivity`: only one layer INT8 at a time, ExecuTorch's quantizer in
PyTorch) and where ``auto`` chooses. Then the student is exported with PTQ INT8 (calibrated on 512
training images) in ONNX Runtime, ExecuTorch, LiteRT and OpenVINO three ways — every layer INT8,
the ``--keep`` choices' float layers — each artifact scored on the 10,000 test images in its own
runtime and timed at batch 1, one thread, all interleaved in one run. Prints the tables and the
CPU flags; writes benchmarks/results/keep_float_<student>.json.
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
from kdedge.bench.runners import EdgeRunner
from kdedge.bench.timing import measure_interleaved
from kdedge.bench.tuning import settings_call
from kdedge.config import ExportConfig
from kdedge.sensitivity import choose_float_layers

RUNTIMES = ("executorch", "litert", "openvino")
RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--keep", nargs="+", default=["1", "auto"], help="float-layer choices besides all-INT8: a count or auto")
    parser.add_argument("--max-drop", type=float, default=0.0, help="auto's budget on the simulated INT8 drop, in points")
    args = parser.parse_args(argv)
    env = capture_environment()
    print(f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | torch {torch.__version__}", flush=True)
    data = kdedge.load_dataset("fashion-mnist", val_split=0.1)
    ckpt = kdedge.load_checkpoint(args.run)
    calibration = data.train.sample(512, seed=0).numpy()
    s = kdedge.layer_sensitivity(ckpt.model, data.val, calibration, log=print)
    print(f"\n{ckpt.spec.name}: validation FP32 {100 * s.fp32_accuracy:.2f} %, all-INT8 (PyTorch) {100 * s.int8_accuracy:.2f} % "
          f"({s.int8_drop_pt:+.2f} pt)\n\n| layer | only it INT8 (val %) | drop (pt) |\n|---|---:|---:|")
    for r in s.layers:
        print(f"| `{r.layer}` | {100 * r.accuracy:.2f} | {r.drop_pt:+.2f} |")
    choices: dict[str, tuple[str, ...]] = {"all INT8": ()}
    for keep in args.keep:
        kept = tuple(choose_float_layers(ckpt.model, data.val, calibration, s, keep if keep == "auto" else int(keep), max_drop=args.max_drop, log=print))
        if kept not in choices.values():  # the same float layers are exported once
            choices[f"keep {keep}: {', '.join(kept) or '-'}"] = kept
    x1 = data.test.inputs(slice(0, 1)).numpy()
    rows, calls = {}, {}
    with tempfile.TemporaryDirectory(prefix="kdedge-keepfloat-") as work:
        for label, kept in choices.items():
            formats = ("onnx", "onnx-int8", *(f"{r}-int8" for r in RUNTIMES)) if not kept else ("onnx-int8", *(f"{r}-int8" for r in RUNTIMES))
            exported = kdedge.export_model(ckpt.model, Path(work) / str(len(rows)), data=data, model_name=ckpt.spec.name,
                                           config=ExportConfig(formats=formats, keep_float=kept, allow_mismatch=True))
            for a in exported.artifacts:
                key = (label, a.format, a.precision)
                rows[key] = {"accuracy": (a.accuracy or {}).get("accuracy"), "bytes": a.bytes,
                             "parity_passed": bool(a.parity and a.parity["passed"])}
                path = exported.out / a.path
                calls[key] = (settings_call(path, x1, {"intra_op_threads": 1})
                              if a.format == "onnx" else EdgeRunner(a.format, path, precision=a.precision, threads=1).prepare(x1))
        print(f"timing {len(calls)} artifacts interleaved, batch 1, 1 thread", flush=True)
        stats = measure_interleaved({" | ".join(k): c for k, c in calls.items()}, rounds=10, block_s=0.05)
    fp32 = {f: r["accuracy"] for (label, f, p), r in rows.items() if p == "fp32"}
    fp32_p50 = {f: stats[" | ".join(k)].p50_ms for k in rows if k[2] == "fp32" for f in [k[1]]}
    print("\n| INT8 | runtime | test % | − FP32 (pt) | p50 µs (1 thread) | vs all-INT8 p50 |\n|---|---|---:|---:|---:|---:|")
    for (label, fmt, precision), r in rows.items():
        if precision != "int8":
            continue
        p50 = stats[" | ".join((label, fmt, precision))].p50_ms
        base = stats[" | ".join(("all INT8", fmt, precision))].p50_ms
        ref = fp32.get("onnx")
        print(f"| {label} | {fmt} | {100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - ref):+.2f} | {1e3 * p50:.1f} | {p50 / base:.2f} |")
    print(f"\nFP32 ONNX: test {100 * fp32['onnx']:.2f} %, p50 {1e3 * fp32_p50['onnx']:.1f} µs (onnxruntime, 1 thread)")
    out = RESULTS / f"keep_float_{ckpt.spec.name}.json"
    out.write_text(json.dumps({"env": env, "student": ckpt.spec.name, "run": str(args.run), "sensitivity": s.to_dict(),
                               "choices": {k: list(v) for k, v in choices.items()},
                               "artifacts": [{"choice": k[0], "format": k[1], "precision": k[2], **r, "p50_ms": stats[" | ".join(k)].p50_ms}
                                             for k, r in rows.items()]}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
