"""Scaling: training samples/s for 1 vs N processes (DDP under torchrun), and the effect of mixed
precision and channels-last on the student's training step and on the teacher's forward pass.

    python benchmarks/scale.py [--device cpu|cuda] [--train-limit 20000] [--procs 1,2] [--out runs/scale.json]

Processes: ``kdedge distill`` (cached teacher logits, 2 epochs) under ``torchrun --nproc_per_node N``
with one thread per process, against one process with 1 and with all cores' threads; samples/s is
the training-set size over epoch 2's time (epoch 1 also pays for the logit cache, shared through
one disk cache). Precision × memory format: ``fit`` for one epoch of the student (teacher logits
cached in memory, their time excluded), and the teacher's forward pass at batch 256 under autocast.
CPU rows: fp32 and bf16; CUDA rows add fp16. Prints Markdown tables; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdedge.config import DistillConfig  # noqa: E402
from kdedge.data import load_dataset  # noqa: E402
from kdedge.distill.loop import fit  # noqa: E402
from kdedge.distill.teacher import FrozenTeacher, teacher_logits  # noqa: E402
from kdedge.distill import make_loss  # noqa: E402
from kdedge.resolve import resolve_student, resolve_teacher  # noqa: E402


def processes(procs: list[int], train_limit: int, cores: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"KDEDGE_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        common = ["distill", "--train-limit", str(train_limit), "--test-limit", "1000", "--epochs", "2", "--cache", "disk", "--quiet",
                  "--device", "cpu"]
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
        cases = [(1, 1), (1, cores)] + [(n, 1) for n in procs if n > 1]
        for n, threads in cases:
            out = Path(tmp) / f"run-{n}-{threads}"
            if n == 1:
                cmd = [sys.executable, "-m", "kdedge", *common, "--threads", str(threads), "--out", str(out)]
            else:
                cmd = [torchrun, "--standalone", "--nproc_per_node", str(n), "-m", "kdedge", *common, "--out", str(out)]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env | {"OMP_NUM_THREADS": str(threads)})
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"scale: {' '.join(cmd[:6])} ... failed")
            m = json.loads((out / "metrics.json").read_text())
            epoch2 = m["history"][1]["seconds"]
            rows.append({"processes": n, "threads_per_process": threads, "epoch_seconds": epoch2, "samples_per_s": train_limit / epoch2,
                         "wall_s": wall, "test_accuracy": m["test"]["accuracy"]})
            print(f"  {n} process(es) x {threads} thread(s): {train_limit / epoch2:,.0f} samples/s, accuracy {m['test']['accuracy']:.4f}", flush=True)
    base = rows[0]["samples_per_s"]
    for r in rows:
        r["speedup_vs_1x1"] = r["samples_per_s"] / base
    return rows


def _teacher_forward(teacher: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str, channels_last: bool, batch: int = 256) -> float:
    model = teacher.to(device).eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    x = x.to(device)
    with torch.inference_mode(), ctx:
        model(x[:batch].contiguous(memory_format=fmt))  # warm-up (cudnn autotune, oneDNN primitives)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i : i + batch].contiguous(memory_format=fmt))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - start)


def precision_matrix(device: torch.device, train_limit: int, teacher_samples: int) -> list[dict]:
    data = load_dataset("fashion-mnist", train_limit=train_limit, test_limit=1000)
    teacher = resolve_teacher("resnet", data.spec).model
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    rows = []
    frozen = FrozenTeacher(teacher, device=device)
    cached = teacher_logits(frozen, data.train)  # computed once; every student row reuses it (not timed)
    x_teacher = data.train.inputs(slice(0, teacher_samples))
    for precision in precisions:
        for channels_last in (False, True):
            config = DistillConfig(epochs=1, seed=0, precision=precision, channels_last=channels_last, device=device.type, cache="memory")
            student, _ = resolve_student("tiny_cnn", data.spec, 0)
            # Warm-up epoch on a slice, then the timed epoch on the whole training set.
            warm = DistillConfig(**(config.to_dict() | {"alpha": 0.0}))  # the same student steps, no teacher needed
            fit(student, data.train.take(2048), config=warm, loss=make_loss(warm), progress=False)
            student, _ = resolve_student("tiny_cnn", data.spec, 0)
            history, _ = _fit_with_cache(student, data, config, frozen, cached)
            row = history[0]
            student_sps = len(data.train) / (row["seconds"] - row["teacher_seconds"])
            teacher_sps = _teacher_forward(teacher, x_teacher, device, precision, channels_last)
            rows.append({"precision": precision, "channels_last": channels_last, "student_train_samples_per_s": student_sps,
                         "student_train_accuracy": row["train_accuracy"], "teacher_forward_samples_per_s": teacher_sps})
            print(f"  {precision:4s} channels_last={channels_last!s:5s}: student train {student_sps:,.0f}/s, teacher forward {teacher_sps:,.0f}/s", flush=True)
    base = rows[0]
    for r in rows:
        r["student_speedup"] = r["student_train_samples_per_s"] / base["student_train_samples_per_s"]
        r["teacher_speedup"] = r["teacher_forward_samples_per_s"] / base["teacher_forward_samples_per_s"]
    return rows


def _fit_with_cache(student, data, config, frozen, cached):
    # The logits are already in memory: fit's own cache lookup would recompute them (cache="memory"
    # keeps nothing between calls), so time the loop with a disk cache directory holding them.
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np

        np.save(Path(tmp) / f"{cached.key}.npy", cached.tensor().numpy(), allow_pickle=False)
        return fit(student, data.train, config=config, loss=make_loss(config), teacher=frozen, cache_dir=tmp, progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--train-limit", type=int, default=20000)
    ap.add_argument("--teacher-samples", type=int, default=5000)
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--skip-processes", action="store_true")
    ap.add_argument("--out", default="runs/scale.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("scale: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    cores = os.cpu_count() or 1
    hw = torch.cuda.get_device_name() if device.type == "cuda" else f"{cores} CPU cores"
    print(f"# scale: {hw}, torch {torch.__version__}")
    result: dict = {"device": args.device, "hardware": hw, "torch": torch.__version__, "train_limit": args.train_limit}
    if not args.skip_processes and device.type == "cpu":
        print("processes (gloo):", flush=True)
        result["processes"] = processes([int(p) for p in args.procs.split(",")], args.train_limit, cores)
    print("precision x memory format:", flush=True)
    result["precision"] = precision_matrix(device, args.train_limit, args.teacher_samples)

    if "processes" in result:
        print("\n| processes × threads | epoch (s) | samples/s | vs 1×1 | test accuracy |\n|---|---|---|---|---|")
        for r in result["processes"]:
            print(f"| {r['processes']} × {r['threads_per_process']} | {r['epoch_seconds']:.2f} | {r['samples_per_s']:,.0f} | "
                  f"{r['speedup_vs_1x1']:.2f}× | {r['test_accuracy']:.4f} |")
    print("\n| precision | channels-last | student train samples/s | vs fp32 | teacher forward samples/s | vs fp32 |\n|---|---|---|---|---|---|")
    for r in result["precision"]:
        print(f"| {r['precision']} | {'yes' if r['channels_last'] else 'no'} | {r['student_train_samples_per_s']:,.0f} | {r['student_speedup']:.2f}× | "
              f"{r['teacher_forward_samples_per_s']:,.0f} | {r['teacher_speedup']:.2f}× |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
