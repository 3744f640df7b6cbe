"""What an epoch of augmented training costs: scratch, the teacher on every step, and cached teacher views (issue 16).

    python benchmarks/views.py [--views 10] [--erasing 0.25] [--rounds 3] [--teacher PATH] [--json benchmarks/results/views.json]

Three ways to train the default student (tiny_cnn) on 60,000 augmented Fashion-MNIST images (crop
±2 px, flip, random erasing), batch 128, 2 threads:

* ``scratch``: cross-entropy only (no teacher);
* ``per-step teacher``: Hinton KD with the teacher run on every augmented batch (kdedge before issue 16);
* ``cached views``: Hinton KD from K stored views per image (``--views K``): the teacher's pass over
  the K views is paid once (timed separately, with its runtime), every epoch after reads them.

Each round trains one epoch of each, in turn (this machine drifts ±25 % over seconds), from the same
initial weights; the table gives the median epoch time and its ratio to scratch, the one-off view
pass, the epochs after which the views have paid for themselves against the per-step teacher, and
the view cache's size on disk per 60k images × K views.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kdedge.bench.env import capture_environment
from kdedge.config import DistillConfig
from kdedge.data import load_dataset
from kdedge.distill import FrozenTeacher, fit
from kdedge.distill.factory import make_loss
from kdedge.distill.views import ViewRecipe, teacher_views
from kdedge.progress import Progress
from kdedge.resolve import resolve_student, resolve_teacher

MODES = {
    "scratch": {"alpha": 0.0, "augment": True, "cache": "off"},
    "per-step teacher": {"augment": True, "cache": "off"},
    "cached views": {"cache": "disk"},  # + views=K
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--erasing", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="resnet", help="the teacher (default: the shipped one)")
    ap.add_argument("--limit", type=int, default=None, help="first N training images (smoke test)")
    ap.add_argument("--json", default="benchmarks/results/views.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", train_limit=args.limit)
    teacher_net = resolve_teacher(args.teacher, data.spec).model
    cache = Path(tempfile.mkdtemp(prefix="kdedge-views-"))
    env = capture_environment(None)
    print(f"CPU: {env['cpu']['model']}, flags {' '.join(env['cpu']['flags'])}; {args.threads} threads", flush=True)

    # The one-off pass: K views of every training image, scored in the runtime teacher_pass chooses.
    teacher = FrozenTeacher(teacher_net, channels_last=True)
    recipe = ViewRecipe(views=args.views, erasing=args.erasing)
    with Progress(False) as bar:
        found = teacher_views(teacher, data.train, recipe, cache_dir=cache / "views", progress=bar)
    view_pass = {"seconds": found.seconds, "runtime": found.runtime, "bytes": found.nbytes,
                 "files_bytes": sum(p.stat().st_size for p in found.path.iterdir()), "views": args.views, "images": len(data.train)}
    print(f"view pass: {args.views} x {len(data.train)} views in {found.seconds:.1f} s ({found.runtime}), "
          f"{view_pass['files_bytes'] / 2**20:.1f} MiB on disk", flush=True)

    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode, overrides in MODES.items():
            config = DistillConfig(epochs=1, random_erasing=args.erasing, seed=r, threads=args.threads, device="cpu",
                                   **overrides, **({"views": args.views} if mode == "cached views" else {}))
            student, _spec = resolve_student("tiny_cnn", data.spec, r)
            history, _used = fit(student, data.train, config=config, loss=make_loss(config), teacher=teacher, cache_dir=cache, progress=False)
            seconds[mode].append(history[0]["seconds"])  # a cache hit adds nothing to the epoch
            print(f"  round {r + 1}: {mode:<17} {history[0]['seconds']:6.1f} s", flush=True)
    base = statistics.median(seconds["scratch"])
    step = statistics.median(seconds["per-step teacher"])
    views = statistics.median(seconds["cached views"])
    print(f"\n{len(data.train):,} images, tiny_cnn, batch 128, {args.threads} threads, median of {args.rounds} interleaved rounds\n")
    print("| training | s per epoch | × augmented scratch |")
    print("|---|---:|---:|")
    for mode, s in seconds.items():
        print(f"| {mode} | {statistics.median(s):.1f} | {statistics.median(s) / base:.2f} |")
    breakeven = found.seconds / max(step - views, 1e-9)
    print(f"\nview pass (once): {found.seconds:.1f} s in {found.runtime} = {found.seconds / base:.1f} scratch epochs; "
          f"paid back against the per-step teacher after {breakeven:.1f} epochs")
    print(f"view cache: {view_pass['files_bytes'] / 2**20:.1f} MiB for {len(data.train):,} images x {args.views} views "
          f"({view_pass['files_bytes'] / (len(data.train) * args.views):.0f} bytes per view)")
    if args.json and not args.limit:
        Path(args.json).write_text(json.dumps({"env": env, "erasing": args.erasing, "view_pass": view_pass, "epoch_seconds": seconds,
                                               "ratio_to_scratch": {m: statistics.median(s) / base for m, s in seconds.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
