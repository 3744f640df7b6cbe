"""Train the Fashion-MNIST teacher that ships inside kdedge (kdedge/models/weights/).

Seeded and committed so the shipped weights can be reproduced:

    python scripts/train_teacher.py                 # CUDA when available, else CPU (~1 hour on 2 cores)
    python scripts/train_teacher.py --device cpu --epochs 1 --train-limit 2000   # smoke run

The recipe (all through kdedge's own trainer): the zoo's ResNet (32-64-128 channels,
3-2-2 basic blocks), SGD + Nesterov momentum 0.9, lr 0.1, batch 128, weight decay 5e-4 (not on
biases/BN), 1 warm-up epoch then cosine to 0, random crop (±2 px, edge padding) + horizontal
flip, 30 epochs, seed 0, fp32, channels-last. The shipped file was trained this way on the
2-core CPU of the development machine (about 1 hour).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import kdedge
from kdedge.config import TrainConfig

WEIGHTS = Path(__file__).resolve().parents[1] / "kdedge" / "models" / "weights" / "resnet-fashion-mnist.safetensors"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--out", type=Path, default=WEIGHTS, help="where to write the weights")
    parser.add_argument("--run-dir", type=Path, default=None, help="also keep the full run directory here")
    args = parser.parse_args()

    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.backends.cudnn.benchmark = True
    config = TrainConfig(
        model="resnet",
        data="fashion-mnist",
        train_limit=args.train_limit,
        epochs=args.epochs,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        warmup_epochs=1.0 if args.epochs > 1 else 0.0,
        augment=True,
        random_erasing=0.0,
        seed=args.seed,
        device=args.device,
        precision=args.precision or ("bf16" if cuda else "fp32"),
        channels_last=True,
    )
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="kdedge-teacher-")) / "run"

    def log(row: dict) -> None:
        print(f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  train acc {row['train_accuracy']:.4f}  "
              f"test acc {row.get('test_accuracy', float('nan')):.4f}  {row['seconds']:.1f}s", flush=True)

    config = TrainConfig(**(config.to_dict() | {"out": str(run_dir)}))
    result = kdedge.run_train(config, progress=False, on_epoch=log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "model.safetensors", args.out)
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"teacher test accuracy {result.test.accuracy:.4f}  macro F1 {result.test.macro_f1:.4f}  -> {args.out} (sha256 {sha})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
