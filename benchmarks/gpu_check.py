"""GPU check: FP16 parity on CUDA through torch, CUDA-event latency of teacher vs student, exporters
and (when tensorrt imports) an engine build. Run by benchmarks/gpu_check.sh on a lent GPU machine;
with no GPU it runs the same steps on the CPU (to test the script) and says so.

    python benchmarks/gpu_check.py --student runs/distill-XXXX [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdedge.bench.timing import TimingPolicy, measure, measure_cuda  # noqa: E402
from kdedge.config import ExportConfig  # noqa: E402
from kdedge.data import load_dataset  # noqa: E402
from kdedge.exporters import export_model  # noqa: E402
from kdedge.models.zoo import count_flops, count_parameters, load_checkpoint, pretrained_path  # noqa: E402


def parity(model: torch.nn.Module, x_cpu: torch.Tensor, device: str, dtype: torch.dtype) -> dict:
    """max |Δlogit| and argmax agreement of ``model`` on ``device`` in ``dtype`` vs CPU FP32."""
    with torch.inference_mode():
        ref = model(x_cpu)
        m = copy.deepcopy(model).to(device=device, dtype=dtype)  # a copy: casting in place would round the weights
        out = torch.cat([m(x_cpu[i : i + 500].to(device, dtype)).float().cpu() for i in range(0, len(x_cpu), 500)])
    return {"max_abs_diff": float((out - ref).abs().max()), "argmax_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean())}


def accuracy(model: torch.nn.Module, data, device: str, dtype: torch.dtype) -> float:
    with torch.inference_mode():
        m = copy.deepcopy(model).to(device=device, dtype=dtype)
        x = data.test.inputs()
        pred = torch.cat([m(x[i : i + 1000].to(device, dtype)).argmax(1).cpu() for i in range(0, len(x), 1000)])
    return float((pred == data.test.labels).float().mean())


def latency(model: torch.nn.Module, x_cpu: torch.Tensor, batch: int, device: str, dtype: torch.dtype, policy: TimingPolicy) -> dict:
    m = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = x_cpu[:batch].to(device, dtype).contiguous()
    with torch.inference_mode():
        stats = (measure_cuda if device == "cuda" else measure)(lambda: m(x), policy)
    return {"p50_ms": stats.p50_ms, "p90_ms": stats.p90_ms, "mean_ms": stats.mean_ms, "n": stats.n, "throughput_per_s": batch / (stats.p50_ms / 1e3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="run directory or checkpoint of the distilled student")
    ap.add_argument("--batch-sizes", default="1,32,256,1024")
    ap.add_argument("--min-s", type=float, default=0.5, help="seconds of timed runs per measurement")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}
        torch.backends.cudnn.benchmark = True
    else:
        print("NOTE: no CUDA GPU visible; running every step on the CPU to test this script")
    print("env:", json.dumps(env))

    data = load_dataset("fashion-mnist")
    x = data.test.inputs()
    models = {
        "teacher": load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model.eval(),
        "student": load_checkpoint(args.student).model.eval(),
    }
    results: dict = {"env": env, "models": {}, "latency": [], "export": {}}

    print("\n== accuracy and FP16 parity (vs CPU FP32 torch, 1000 test images) ==")
    print(f"{'model':<8} {'params':>9} {'MFLOPs':>7} {'acc fp32':>9} {'acc fp16':>9} {'fp16 max|Δ|':>12} {'argmax':>8} {'fp32 max|Δ|':>12}")
    for name, model in models.items():
        info = {"params": count_parameters(model), "flops": count_flops(model, (1, 28, 28))}
        info["accuracy_fp32"] = accuracy(model, data, device, torch.float32)
        info["accuracy_fp16"] = accuracy(model, data, device, torch.float16)
        info["parity_fp16"] = parity(model, x[:1000], device, torch.float16)
        info["parity_fp32"] = parity(model, x[:1000], device, torch.float32)
        results["models"][name] = info
        print(f"{name:<8} {info['params']:>9,} {info['flops'] / 1e6:>7.2f} {info['accuracy_fp32']:>9.4f} {info['accuracy_fp16']:>9.4f} "
              f"{info['parity_fp16']['max_abs_diff']:>12.2e} {info['parity_fp16']['argmax_agreement']:>8.2%} {info['parity_fp32']['max_abs_diff']:>12.2e}")

    print(f"\n== latency on {device} ({'CUDA events' if device == 'cuda' else 'perf_counter'}; warm-up 10 iters + 0.2 s; >= 50 iters and {args.min_s} s) ==")
    policy = TimingPolicy(min_s=args.min_s)
    print(f"{'model':<8} {'dtype':<5} {'batch':>6} {'p50 ms':>9} {'p90 ms':>9} {'samples/s':>12}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for dtype in (torch.float32, torch.float16):
            row = {}
            for name, model in models.items():
                r = latency(model, x, batch, device, dtype, policy)
                row[name] = r
                results["latency"].append({"model": name, "dtype": str(dtype).split(".")[-1], "batch": batch} | r)
                print(f"{name:<8} {str(dtype).split('.')[-1]:<5} {batch:>6} {r['p50_ms']:>9.4f} {r['p90_ms']:>9.4f} {r['throughput_per_s']:>12,.0f}")
            print(f"{'':<8} {'':<5} {batch:>6} student speedup at p50: {row['teacher']['p50_ms'] / row['student']['p50_ms']:.2f}x")

    print("\n== exporters on this machine (ONNX FP32/INT8/FP16 + TensorRT if it imports) ==")
    try:
        import tensorrt

        print("tensorrt", tensorrt.__version__)
    except ImportError:
        print("tensorrt: not installed here; the TensorRT build is skipped (export records the reason)")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cfg = ExportConfig(formats=("onnx", "onnx-int8", "onnx-fp16", "tensorrt"), parity_samples=1000)
        result = export_model(models["student"], Path(tmp) / "student", data=data, config=cfg, model_name="tiny_cnn")
        results["export"] = {"seconds": time.perf_counter() - start, "skipped": result.skipped,
                             "artifacts": [{"path": a.path, "parity_passed": a.parity["passed"], "max_abs_diff": a.parity["outputs"][0]["max_abs_diff"],
                                            "accuracy": (a.accuracy or {}).get("accuracy")} for a in result.artifacts]}
    for a in results["export"]["artifacts"]:
        print(f"{a['path']:<22} parity {'ok' if a['parity_passed'] else 'FAILED'}  max|Δ| {a['max_abs_diff']:.2e}  acc {a['accuracy']}")
    print("skipped:", results["export"]["skipped"] or "nothing")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
