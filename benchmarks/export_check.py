"""Export acceptance: parity, INT8 accuracy and export time for the default student and the teacher.

    python benchmarks/export_check.py [--student RUN_DIR] [--methods minmax,entropy,percentile]

Without --student it distills the default student first (`kdedge distill`, 15 epochs, ~4 min).
For each model it runs `kdedge.export_model` (FP32 + static INT8, 512 calibration images, parity on
1,000 test images at batch 1 and N) and prints parity, INT8 accuracy on the full test set per
calibration method, and wall times. It also times the whole `kdedge export` command for the student.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.config import DistillConfig, ExportConfig  # noqa: E402
from kdedge.data import load_dataset  # noqa: E402
from kdedge.exporters import export_model  # noqa: E402
from kdedge.models.zoo import load_checkpoint, pretrained_path  # noqa: E402
from kdedge.runs import run_distill  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="run directory or checkpoint of the distilled student (default: distill one now)")
    ap.add_argument("--methods", default="minmax,entropy,percentile")
    ap.add_argument("--slim", action="store_true", help="also report onnxslim's effect on the FP32 graph")
    args = ap.parse_args()

    student_path = args.student
    if student_path is None:
        print("distilling the default student (15 epochs) ...", flush=True)
        student_path = str(run_distill(DistillConfig(out=tempfile.mkdtemp(prefix="kdedge-student-") + "/run"), progress=False).out)
    data = load_dataset("fashion-mnist")
    ckpts = {"student": load_checkpoint(student_path), "teacher": load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist"))}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; student {student_path}\n")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ckpt in ckpts.items():
            for i, method in enumerate(args.methods.split(",")):
                config = ExportConfig(formats=("onnx", "onnx-int8"), calibration_method=method, parity_samples=1000, slim=args.slim and i == 0)
                start = time.perf_counter()
                result = export_model(ckpt.model, Path(tmp) / f"{name}-{method}", data=data, config=config, model_name=ckpt.spec.name, source_sha256=ckpt.sha256)
                wall = time.perf_counter() - start
                fp32, int8 = result.artifact("model.onnx"), result.artifact("model.int8.onnx")
                s = result.manifest["seconds"]
                rows.append((name, method, fp32, int8, wall, s))
                if args.slim and i == 0:
                    print(f"{name}: onnxslim nodes {fp32.details['nodes_before_slim']} -> {fp32.details['nodes']}")

        print(f"{'model':<8} {'calib':<10} {'fp32 max|Δ|':>11} {'argmax':>7} {'fp32 acc':>9} {'int8 acc':>9} {'drop pt':>8} {'int8 argmax':>11} "
              f"{'KiB fp32→int8':>15} {'export s':>9} {'parity s':>9} {'int8 s':>7} {'total s':>8}")
        for name, method, fp32, int8, wall, s in rows:
            p = fp32.parity["outputs"][0]
            print(f"{name:<8} {method:<10} {p['max_abs_diff']:>11.2e} {p['argmax_agreement']:>7.2%} {fp32.accuracy['accuracy']:>9.4f} "
                  f"{int8.accuracy['accuracy']:>9.4f} {int8.accuracy['drop_vs_fp32_pt']:>8.2f} {int8.parity['outputs'][0]['argmax_agreement']:>11.2%} "
                  f"{fp32.bytes / 1024:>7.0f}→{int8.bytes / 1024:<6.0f} {s['export_fp32']:>9.2f} {s['parity_fp32']:>9.2f} {s['quantize_int8']:>7.2f} {wall:>8.2f}")
        print("(total s includes measuring FP32 and INT8 accuracy on all 10,000 test images)")

        # The whole command, as a user runs it: process start, imports, data, export, parity, INT8 (no accuracy pass).
        out = Path(tmp) / "cli"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kdedge", "export", student_path, "--format", "onnx,onnx-int8", "--no-evaluate", "--out", str(out)],
                       check=True, capture_output=True)
        cli_s = time.perf_counter() - start
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kdedge", "export", student_path, "--format", "onnx,onnx-int8", "--out", str(out) + "-eval"],
                       check=True, capture_output=True)
        cli_eval_s = time.perf_counter() - start
    print(f"\n`kdedge export STUDENT --format onnx,onnx-int8`: {cli_eval_s:.1f} s wall (with accuracy on 10k test images), "
          f"{cli_s:.1f} s with --no-evaluate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
