"""Image folders against the in-memory IDX path, and memory against dataset size (issue 13).

    python benchmarks/folders.py [--epochs 3] [--work DIR]            # accuracy + epoch time, folder vs IDX
    python benchmarks/folders.py --rss [--work DIR]                   # peak RSS distilling from 50 k vs 200 k images

Part 1 writes Fashion-MNIST (60 k train / 10 k test) as a PNG folder (``DIR/train/<class>/``),
then distills the shipped teacher into ``tiny_cnn`` three ways with the same seed, epochs and
settings: from the IDX files, from the folder with the IDX normalization (the same inputs: PNG is
lossless, so the runs should agree to the last bit), and from the folder with the mean/std kdedge
measures on 1 000 of its training images (what a user gets). It reports test accuracy, the median
epoch time (epochs after the first, whose time includes the teacher's logit pass), the ratio
folder ÷ IDX with the default DataLoader workers, and the teacher's pass over the folder in
images/s. The runs alternate IDX, folder, IDX, folder so that machine drift hits both alike.

Part 2 (``--rss``) writes 200 k PNGs (Fashion-MNIST images repeated), hard-links the first 50 k
into a second folder, and distills one epoch from each in a fresh process (teacher ``tiny_cnn``,
untrained, so the run measures the data path rather than a large teacher's forward), reading the
peak RSS of the process and of its DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import kdedge  # noqa: E402
from kdedge.bench.env import capture_environment  # noqa: E402
from kdedge.config import DistillConfig  # noqa: E402
from kdedge.data import load_dataset, load_folder  # noqa: E402
from kdedge.data.folders import default_workers, write_image_folder  # noqa: E402
from kdedge.models.zoo import ModelSpec, create_model, load_checkpoint, pretrained_path  # noqa: E402

CLASS_DIRS = tuple(f"{i}_{name.split('/')[0].replace(' ', '_').lower()}" for i, name in enumerate(
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")))


def write_fmnist_folder(root: Path, *, repeat_to: int | None = None) -> Path:
    """Fashion-MNIST as PNG files under ``root`` (written once; a ``.done`` marker makes it reusable)."""
    if (root / ".done").is_file():
        return root
    data = load_dataset("fashion-mnist")
    start = time.perf_counter()
    for split, ds in (("train", data.train), ("test", data.test)):
        images, labels = ds.images[:, 0].numpy(), ds.labels.numpy()
        if split == "train" and repeat_to:
            reps = -(-repeat_to // len(images))
            images, labels = np.concatenate([images] * reps)[:repeat_to], np.concatenate([labels] * reps)[:repeat_to]
        write_image_folder(root, split, images, labels, CLASS_DIRS)
    (root / ".done").write_text("")
    print(f"wrote {root} in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def _distill(data: kdedge.DataSplits, epochs: int, seed: int = 0) -> dict:
    teacher = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
    torch.manual_seed(seed)  # the same initial student for every run
    student = create_model(ModelSpec("tiny_cnn", 1.0, data.spec.num_classes, data.spec.input_shape))
    config = DistillConfig(epochs=epochs, seed=seed, cache="disk", out=None)
    start = time.perf_counter()
    result = kdedge.distill(student, teacher, data.train, data.test, config=config, progress=False)
    wall = time.perf_counter() - start
    seconds = [row["seconds"] for row in result.history]
    cache = result.metrics.get("teacher_cache") or {}
    return {"accuracy": result.test.accuracy, "epoch_seconds": seconds, "median_epoch_s": statistics.median(seconds[1:] or seconds),
            "teacher_cache_s": cache.get("seconds"), "teacher_cache_hit": cache.get("hit"), "train_images": len(data.train), "wall_s": wall}


def part1(work: Path, epochs: int) -> dict:
    root = write_fmnist_folder(work / "fmnist-png")
    idx = load_dataset("fashion-mnist")
    same = load_folder(root, norm=(idx.spec.mean, idx.spec.std))
    own = load_folder(root)
    streamed = load_folder(root, norm=(idx.spec.mean, idx.spec.std), decode_cache=False)

    runs: dict[str, list[dict]] = {"idx": [], "folder (IDX mean/std)": [], "folder (own mean/std)": [], "folder, decoded every epoch": []}
    order = (("idx", idx), ("folder (IDX mean/std)", same), ("idx", idx), ("folder (own mean/std)", own), ("idx", idx),
             ("folder, decoded every epoch", streamed))
    for name, data in order:
        os.environ["KDEDGE_CACHE"] = tempfile.mkdtemp(prefix="kdedge-folders-cache-")
        print(f"distilling from {name} ({epochs} epochs, {same.train.workers} workers for folders)", flush=True)
        runs[name].append(_distill(data, epochs))
    idx_epoch = statistics.median(r["median_epoch_s"] for r in runs["idx"])  # the IDX runs bracket the folder runs
    table = []
    for name, rs in runs.items():
        r = rs[-1]
        table.append({"data": name, "test_accuracy": r["accuracy"], "median_epoch_s": r["median_epoch_s"], "vs_idx": r["median_epoch_s"] / idx_epoch,
                      "wall_s": r["wall_s"],
                      "teacher_pass_images_per_s": r["train_images"] / r["teacher_cache_s"] if r["teacher_cache_s"] else None,
                      "delta_vs_idx_pt": 100 * (r["accuracy"] - runs["idx"][0]["accuracy"])})
    print(f"\nown mean/std measured on the folder: {own.spec.mean[0]:.6f} / {own.spec.std[0]:.6f} (IDX built-in: {idx.spec.mean[0]} / {idx.spec.std[0]})")
    print(f"\n| data ({epochs} epochs, seed 0, default workers {same.train.workers}) | test acc | Δ vs IDX (pt) | median epoch (s) | epoch ÷ IDX "
          "| teacher pass (images/s) | whole run (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in table:
        tp = f"{row['teacher_pass_images_per_s']:,.0f}" if row["teacher_pass_images_per_s"] else "–"
        print(f"| {row['data']} | {row['test_accuracy']:.4f} | {row['delta_vs_idx_pt']:+.2f} | {row['median_epoch_s']:.1f} | {row['vs_idx']:.2f}× | {tp} "
              f"| {row['wall_s']:.0f} |")
    print("IDX runs (same seed): " + ", ".join(f"{r['accuracy']:.4f}" for r in runs["idx"]))
    return {"epochs": epochs, "workers": same.train.workers, "runs": runs, "table": table}


_CHILD = r"""
import json, resource, sys, time
import kdedge
from kdedge.config import DistillConfig
from kdedge.data import load_dataset
from kdedge.models.zoo import ModelSpec, create_model
data = load_dataset(sys.argv[1])
teacher = create_model(ModelSpec("tiny_cnn", 2.0, 10, (1, 28, 28)))
student = create_model(ModelSpec("tiny_cnn", 1.0, 10, (1, 28, 28)))
start = time.perf_counter()
r = kdedge.distill(student, teacher, data.train, data.test, config=DistillConfig(epochs=1, sanity_checks=False, out=None), progress=False)
print(json.dumps({"images": len(data.train), "seconds": time.perf_counter() - start,
                  "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "workers_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def part2(work: Path) -> dict:
    big = write_fmnist_folder(work / "fmnist-png-200k", repeat_to=200_000)
    small = work / "fmnist-png-50k"
    if not (small / ".done").is_file():
        files = sorted((big / "train").rglob("*.png"))[::4]  # every 4th file: 50 k, all classes
        for f in files:
            dest = small / "train" / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dest)
        for f in (big / "test").rglob("*.png"):
            dest = small / "test" / f.parent.name / f.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, dest)
        (small / ".done").write_text("")
    rows = []
    for root in (small, big, small, big):  # alternated: page cache and drift hit both alike
        env = dict(os.environ, KDEDGE_CACHE=tempfile.mkdtemp(prefix="kdedge-rss-cache-"))
        out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{rows[-1]['images']:>7} images: peak RSS {rows[-1]['self_kib'] / 1024:.0f} MiB (largest worker {rows[-1]['workers_kib'] / 1024:.0f} MiB), "
              f"{rows[-1]['seconds']:.0f} s", flush=True)
    peak = {n: max(r["self_kib"] for r in rows if r["images"] == n) for n in {r["images"] for r in rows}}
    n_small, n_big = sorted(peak)
    print(f"\n| train images | peak RSS (MiB) | largest worker (MiB) |\n|---:|---:|---:|")
    for n in (n_small, n_big):
        print(f"| {n:,} | {peak[n] / 1024:.0f} | {max(r['workers_kib'] for r in rows if r['images'] == n) / 1024:.0f} |")
    print(f"\nratio 200 k ÷ 50 k: {peak[n_big] / peak[n_small]:.3f}")
    return {"rows": rows, "ratio": peak[n_big] / peak[n_small]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "kdedge-folders")
    ap.add_argument("--rss", action="store_true", help="measure peak RSS at 50 k vs 200 k images instead")
    args = ap.parse_args()
    env = capture_environment()
    print(f"{env['cpu']['model']}, {env['cpu'].get('usable_cores')} cores ({' '.join(env['cpu'].get('flags', []))}), "
          f"torch {env['versions'].get('torch')}, default workers {default_workers()}", flush=True)
    result = part2(args.work) if args.rss else part1(args.work, args.epochs)
    out = Path(__file__).parent / "results" / f"folders{'-rss' if args.rss else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"env": env, **result}, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
