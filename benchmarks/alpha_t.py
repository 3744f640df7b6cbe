"""Choose α and T on a validation split, then report the test accuracy once (issue 13, item 4).

    python benchmarks/alpha_t.py [--epochs 15] [--val-split 0.1] [--seed 0] [--grid 0.5:2 0.5:1 ...]

Holds out ``--val-split`` of Fashion-MNIST's training images (a fixed permutation, seed 0: the
same rows on every machine), distills the shipped teacher into ``tiny_cnn`` for each (α, T) of the
grid — the README's grid by default — and trains the same student from scratch, all with the same
seed, epochs and schedule on the remaining training images. The choice is the best validation
accuracy; the test split is read once per run, after training, and only reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kdedge  # noqa: E402
from kdedge.bench.env import capture_environment  # noqa: E402
from kdedge.config import DistillConfig, TrainConfig  # noqa: E402
from kdedge.models.zoo import ModelSpec, create_model, load_checkpoint, pretrained_path  # noqa: E402

GRID = ((0.9, 4.0), (0.5, 4.0), (0.7, 2.0), (0.5, 1.0), (0.5, 2.0))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--val-split", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-limit", type=int, default=None, help="quick look: first N training images before the hold-out")
    ap.add_argument("--grid", nargs="*", default=None, help="ALPHA:T pairs [default: the README's five]")
    args = ap.parse_args()
    grid = [tuple(map(float, g.split(":"))) for g in args.grid] if args.grid else list(GRID)
    env = capture_environment()
    print(f"{env['cpu']['model']}, {env['cpu'].get('usable_cores')} cores ({' '.join(env['cpu'].get('flags', []))}), torch {env['versions'].get('torch')}",
          flush=True)
    data = kdedge.load_dataset("fashion-mnist", train_limit=args.train_limit, val_split=args.val_split)
    teacher = load_checkpoint(pretrained_path("resnet", 1.0, "fashion-mnist")).model
    rows = []
    for alpha, temperature in [(None, None), *grid]:
        torch.manual_seed(args.seed)
        student = create_model(ModelSpec("tiny_cnn", 1.0, data.spec.num_classes, data.spec.input_shape))
        start = time.perf_counter()
        if alpha is None:
            r = kdedge.train(student, data.train, data.test, val_data=data.val, config=TrainConfig(epochs=args.epochs, seed=args.seed, out=None),
                             progress=False)
        else:
            cfg = DistillConfig(epochs=args.epochs, seed=args.seed, alpha=alpha, temperature=temperature, cache="disk", out=None)
            r = kdedge.distill(student, teacher, data.train, data.test, val_data=data.val, config=cfg, progress=False)
        rows.append({"alpha": alpha, "temperature": temperature, "val": r.val.accuracy, "test": r.test.accuracy, "seconds": time.perf_counter() - start})
        print(f"alpha {alpha} T {temperature}: val {r.val.accuracy:.4f} test {r.test.accuracy:.4f} ({rows[-1]['seconds']:.0f} s)", flush=True)
    best = max((r for r in rows if r["alpha"] is not None), key=lambda r: r["val"])
    print(f"\n{args.epochs} epochs, seed {args.seed}, {len(data.train):,} train / {len(data.val):,} validation / {len(data.test):,} test images")
    print("\n| α | T | validation acc % | test acc % (reported, not used to choose) |\n|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["alpha"] is not None, r["val"])):
        mark = "**" if r is best else ""
        name = ("scratch", "—") if r["alpha"] is None else (f"{r['alpha']:g}", f"{r['temperature']:g}")
        print(f"| {mark}{name[0]}{mark} | {mark}{name[1]}{mark} | {mark}{100 * r['val']:.2f}{mark} | {100 * r['test']:.2f} |")
    print(f"\nchosen on validation: α = {best['alpha']:g}, T = {best['temperature']:g}")
    out = Path(__file__).parent / "results" / "alpha_t.json"
    out.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows, "chosen": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
