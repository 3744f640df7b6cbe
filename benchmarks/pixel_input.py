"""Preprocessing in the graph: what uint8-pixel artifacts compute and cost, per runtime, against the float-input ones.

    python benchmarks/pixel_input.py RUN_DIR [--input-format uint8-nhwc] [--rounds 10]

RUN_DIR is a trained Fashion-MNIST student (``kdedge distill --out RUN_DIR``: the default student).
It is exported twice with the same settings — ``--input-format float`` (the caller normalizes) and
``uint8-nhwc`` (the artifact takes the decoded pixels; scale, mean/std and layout in its graph) — to
ONNX Runtime, ExecuTorch, LiteRT, OpenVINO and the ORT format, FP32 and PTQ INT8. On the 10,000 test
images, each pixel artifact in its own runtime is compared with the float model in PyTorch fed the
same images preprocessed as the manifest says (max |Δ| of the logits, argmax agreement), and with the
float-input artifact of the same runtime and precision (agreement, accuracy). Then every artifact is
timed at batch 1, one thread, all interleaved in one run: the pixel artifact's p50 over the float
one's is what the preprocessing costs inside the graph (the float artifact's caller still has to do
it outside; that cost is not counted). Prints the table and the CPU flags; writes
benchmarks/results/pixel_input_<student>.json.
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
from kdedge.bench.runners import EdgeRunner, OrtRunner
from kdedge.bench.timing import measure_interleaved
from kdedge.config import ExportConfig
from kdedge.data.pixels import input_format

EDGE = ("executorch", "litert", "openvino", "ort")
RESULTS = Path(__file__).resolve().parent / "results"


def _runner(fmt: str, path: Path, precision: str):
    return OrtRunner(path, precision=precision, threads=1) if fmt == "onnx" else EdgeRunner(fmt, path, precision=precision, threads=1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--input-format", default="uint8-nhwc", choices=["uint8-nhwc", "uint8-nchw"])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    args = parser.parse_args(argv)
    env = capture_environment(1)
    print(f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | torch {torch.__version__}", flush=True)
    ckpt = kdedge.load_checkpoint(args.run)
    model = ckpt.model.eval()
    data = kdedge.load_dataset("fashion-mnist")
    x = data.test.inputs().numpy()  # (10000, 1, 28, 28): the manifest's preprocessing of the stored pixels
    labels = data.test.labels.numpy()
    pixels = input_format(args.input_format, data.spec).feed(x)  # the same images as decoded (uint8)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    formats = ("onnx", "onnx-int8", *(f for r in EDGE for f in (r, f"{r}-int8")))
    rows, calls = [], {}
    with tempfile.TemporaryDirectory(prefix="kdedge-pixels-") as work:
        exports = {name: kdedge.export_model(model, Path(work) / name, data=data, model_name=ckpt.spec.name,
                                             config=ExportConfig(formats=formats, input_format=name, evaluate=False))
                   for name in ("float", args.input_format)}
        for a in exports[args.input_format].artifacts:
            key = f"{a.format}-{a.precision}"
            raw = _runner(a.format, exports[args.input_format].out / a.path, a.precision)
            flt = _runner(a.format, exports["float"].out / a.path, a.precision)
            batch = min(500, getattr(raw, "max_batch", 500), getattr(flt, "max_batch", 500))
            out_raw, out_flt = raw.predict(pixels, batch_size=batch), flt.predict(x, batch_size=batch)
            rows.append({"artifact": key, "runtime": getattr(raw, "runtime_version", f"onnxruntime {a.format}"),
                         "max_abs_diff_vs_torch_fp32": float(np.abs(out_raw - reference).max()),
                         "agreement_vs_torch_fp32": float((out_raw.argmax(1) == reference.argmax(1)).mean()),
                         "max_abs_diff_vs_float_artifact": float(np.abs(out_raw - out_flt).max()),
                         "agreement_vs_float_artifact": float((out_raw.argmax(1) == out_flt.argmax(1)).mean()),
                         "accuracy": float((out_raw.argmax(1) == labels).mean()), "float_artifact_accuracy": float((out_flt.argmax(1) == labels).mean())})
            calls[f"{key} {args.input_format}"] = raw.prepare(pixels[:1])
            calls[f"{key} float"] = flt.prepare(x[:1])
            print(f"{key}: max |Δ| vs PyTorch {rows[-1]['max_abs_diff_vs_torch_fp32']:.2e}", flush=True)
        # What a float artifact's caller does per image instead (numpy, as predict.py does it): timed beside the artifacts.
        one, spec = pixels[:1], data.spec
        mean, std = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (spec.mean, spec.std))
        chw = args.input_format == "uint8-nhwc"
        calls["caller numpy preprocessing"] = lambda: np.ascontiguousarray(((one.transpose(0, 3, 1, 2) if chw else one).astype(np.float32)
                                                                           * np.float32(spec.scale) - mean) / std)
        print(f"timing {len(calls)} calls interleaved, batch 1, 1 thread", flush=True)
        stats = measure_interleaved(calls, rounds=args.rounds, block_s=0.05)
    torch_acc = float((reference.argmax(1) == labels).mean())
    print(f"\n{ckpt.spec.name}: PyTorch FP32 test {100 * torch_acc:.2f} % (10,000 images); pixel artifacts take {args.input_format}\n")
    print("| artifact | max |Δ| vs PyTorch FP32 | agree vs PyTorch | agree vs float artifact | test % (pixels / float) | p50 µs pixels / float | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p_raw, p_flt = stats[f"{r['artifact']} {args.input_format}"].p50_ms, stats[f"{r['artifact']} float"].p50_ms
        r |= {"p50_ms": p_raw, "float_p50_ms": p_flt, "p50_ratio": p_raw / p_flt}
        print(f"| {r['artifact']} | {r['max_abs_diff_vs_torch_fp32']:.2e} | {100 * r['agreement_vs_torch_fp32']:.2f} % | "
              f"{100 * r['agreement_vs_float_artifact']:.2f} % | {100 * r['accuracy']:.2f} / {100 * r['float_artifact_accuracy']:.2f} | "
              f"{1e3 * p_raw:.1f} / {1e3 * p_flt:.1f} | {p_raw / p_flt:.2f} |")
    caller = stats["caller numpy preprocessing"].p50_ms
    print(f"\nThe float artifacts' caller-side preprocessing of one image in numpy (cast, scale, mean/std, layout): p50 {1e3 * caller:.1f} µs")
    out = RESULTS / f"pixel_input_{ckpt.spec.name}.json"
    out.write_text(json.dumps({"env": env, "student": ckpt.spec.name, "run": str(args.run), "input_format": args.input_format,
                               "torch_fp32_accuracy": torch_acc, "caller_numpy_preprocessing_p50_ms": caller, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
