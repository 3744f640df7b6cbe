"""PTQ vs quantization-aware distillation (QAD), per runtime, for one student.

    python benchmarks/qat.py                       # tiny_cnn distilled from the shipped teacher, then PTQ and QAD INT8 in every runtime
    python benchmarks/qat.py --student dw_cnn --epochs 15 --qat-epochs 4 --seed 1
    python benchmarks/qat.py --student dw_cnn --per-tensor --keep runs/dw0   # one weight scale per tensor, PTQ and QAD alike

Distills ``--student`` from the shipped teacher (the distill recipe, ``--epochs``) on Fashion-MNIST
with a 10 % validation split, exports it (FP32 ONNX; PTQ INT8 in ONNX Runtime, ExecuTorch, LiteRT
and OpenVINO, each calibrated on 1,024 training images), then fine-tunes it with
``kdedge.qat_distill`` (``--qat-epochs``, teacher: the shipped one) and exports the QAT model to the
same runtimes with its learned scales. Every accuracy is the artifact run in its own runtime on the
10,000 test images. Appends a row to benchmarks/results/qat.json and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import kdedge
from kdedge.bench.env import capture_environment
from kdedge.config import ExportConfig, QATConfig, is_factory_ref
from kdedge.data.sources import hold_out
from kdedge.metrics import evaluate
from kdedge.models import ModelSpec, create_model

RESULTS = Path(__file__).resolve().parent / "results"
RECORD = RESULTS / "qat.json"
FORMATS = ("onnx-int8", "executorch-int8", "litert-int8", "openvino-int8")


def _flags() -> str:
    env = capture_environment(1)
    return f"CPU: {env['cpu'].get('model')} | flags: {' '.join(env['cpu'].get('flags', []))} | torch {torch.__version__}"


def _accuracies(result: kdedge.ExportResult) -> dict[str, float]:
    return {f"{a.format}-{a.precision}": a.accuracy["accuracy"] for a in result.artifacts}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="tiny_cnn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--qat-epochs", type=int, default=4)
    ap.add_argument("--qat-lr", type=float, default=0.005)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-tensor", action="store_true", help="INT8 weights with one scale per tensor (PTQ in every runtime and the QAT "
                                                                "scheme xnnpack-per-tensor), as accelerators without per-channel scales need.")
    ap.add_argument("--keep", type=Path, help="Keep the distilled FP32 student (DIR/fp32) and the QAT student (DIR/qat) as run directories; "
                                              "an FP32 student already in DIR/fp32 is reused.")
    args = ap.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    print(_flags(), flush=True)
    data = hold_out(kdedge.load_dataset("fashion-mnist"), 0.1)
    teacher = kdedge.resolve_teacher("resnet", data.spec)
    # A zoo name (tiny_cnn, dw_cnn@0.5, net:...) or a factory of the user's own (path/to/file.py:make, run as code: trusted here).
    arch, width = (args.student, 1.0) if is_factory_ref(args.student) else kdedge.models.zoo.parse_model_name(args.student)
    spec = ModelSpec(arch, width, data.spec.num_classes, tuple(data.spec.input_shape))
    t0 = time.perf_counter()
    fp32_epoch_s: list[float] = []
    if args.keep is not None and (args.keep / "fp32" / "model.safetensors").is_file():
        fp32_model = kdedge.load_checkpoint(args.keep / "fp32", trust_code=True).model
    else:
        torch.manual_seed(args.seed)
        run = kdedge.distill(create_model(spec), teacher.model, data.train, data.test, val_data=data.val,
                             config=kdedge.DistillConfig(epochs=args.epochs, seed=args.seed), student_spec=spec, teacher_name="resnet",
                             progress=False, out=args.keep / "fp32" if args.keep else None)
        fp32_model, fp32_epoch_s = run.model, [e["seconds"] for e in run.history]
    fp32_test = evaluate(fp32_model, data.test).accuracy
    t_fp32 = time.perf_counter() - t0
    print(f"fp32 student: test {fp32_test:.4f} ({t_fp32:.0f} s)", flush=True)
    # Every artifact is kept and scored even when it disagrees with its reference: a broken INT8 conversion is a result here.
    export_cfg = ExportConfig(formats=FORMATS, allow_mismatch=True, per_channel=not args.per_tensor)
    with tempfile.TemporaryDirectory() as work:
        ptq = kdedge.export_model(fp32_model, Path(work) / "ptq", data=data, config=dataclasses.replace(export_cfg, formats=("onnx", *FORMATS)))
        t1 = time.perf_counter()
        qat = kdedge.qat_distill(fp32_model, teacher.model, data.train, data.test, val_data=data.val,
                                 config=QATConfig(epochs=args.qat_epochs, lr=args.qat_lr, seed=args.seed,
                                                  qat_scheme="xnnpack-per-tensor" if args.per_tensor else "xnnpack"), student_spec=spec, progress=False,
                                 out=args.keep / "qat" if args.keep else None)
        t_qat = time.perf_counter() - t1
        print(f"qat: fake-quant test {qat.test.accuracy:.4f} ({t_qat:.0f} s)", flush=True)
        qad = kdedge.export_model(qat.model, Path(work) / "qat", data=data, config=export_cfg)
    p, q = _accuracies(ptq), _accuracies(qad)
    # PTQ: against the FP32 model; QAD: against the QAT model's INT8 graph (the check), and against its fake quantization (recorded)
    agreement = {kind: {f"{a.format}-{a.precision}": a.parity["outputs"][0]["argmax_agreement"] for a in res.artifacts} for kind, res in (("ptq", ptq), ("qad", qad))}
    agreement["qad_vs_fake_quant"] = {f"{a.format}-{a.precision}": a.parity["fake_quant"] for a in qad.artifacts if "fake_quant" in a.parity}
    row = {"student": args.student, "weights": "per tensor" if args.per_tensor else "per channel", "seed": args.seed, "epochs": args.epochs,
           "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr,
           "fp32_test": fp32_test, "qat_fake_quant_test": qat.test.accuracy, "ptq": p, "qad": q, "argmax_agreement": agreement,
           "fp32_epoch_s": fp32_epoch_s, "qat_epoch_s": [e["seconds"] for e in qat.history], "seconds": {"fp32": t_fp32, "qat": t_qat},
           "env": _flags()}
    rec = json.loads(RECORD.read_text()) if RECORD.is_file() else {"runs": []}
    rec["runs"].append(row)
    RESULTS.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(rec, indent=1) + "\n")
    print(f"\n{args.student} ({row['weights']} INT8 weights), seed {args.seed}: FP32 (PyTorch) {fp32_test:.4f}; QAT fake-quant (PyTorch) {qat.test.accuracy:.4f}\n")
    print("| runtime | FP32 ONNX | PTQ INT8 | QAD INT8 | PTQ − FP32 (pt) | QAD − FP32 (pt) | argmax agreement: PTQ vs FP32 / QAD vs its INT8 graph / "
          "QAD vs fake-quant (max steps) |")
    print("|---|---:|---:|---:|---:|---:|---|")
    nan = float("nan")
    for fmt in FORMATS:
        pa, qa = p.get(fmt, nan), q.get(fmt, nan)
        print(f"| {fmt.removesuffix('-int8')} | {p['onnx-fp32']:.4f} | {pa:.4f} | {qa:.4f} | {100 * (pa - p['onnx-fp32']):+.2f} | {100 * (qa - p['onnx-fp32']):+.2f} | "
              f"{agreement['ptq'].get(fmt, nan):.4f} / {agreement['qad'].get(fmt, nan):.4f} / "
              f"{agreement['qad_vs_fake_quant'].get(fmt, {}).get('argmax_agreement', nan):.4f} "
              f"({agreement['qad_vs_fake_quant'].get(fmt, {}).get('max_abs_diff_steps', nan):.0f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
