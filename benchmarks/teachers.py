"""The Fashion-MNIST teachers' test accuracy: the shipped one, the retrained one, flip averaging and their ensemble (issue 16).

    python benchmarks/teachers.py [--v2 benchmarks/results/teacher-v2]

* ``v1``: the shipped teacher (`resnet`, 30 epochs, crop + flip; `scripts/train_teacher.py --epochs 30
  --random-erasing 0 --precision fp32`).
* ``v2``: the same architecture retrained by `scripts/train_teacher.py` (100 epochs, crop + flip +
  random erasing 0.5, bf16 autocast on this CPU); its run directory is committed under
  `benchmarks/results/teacher-v2/`.
* ``+flip``: the mean of the log-probabilities on the image and on its mirror image (2 forward passes).
* ``v1+v2``: the mean of both teachers' log-probabilities (2 forward passes).

Prints test accuracy on the 10,000 test images and the FLOPs per image of each teacher function.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from kdedge.data import load_dataset
from kdedge.metrics import evaluate
from kdedge.models.zoo import count_flops
from kdedge.resolve import resolve_teacher


class MeanLogProb(nn.Module):
    """The mean log-probabilities of ``models`` on the image (and, with ``flip``, on its mirror image)."""

    def __init__(self, models: list[nn.Module], *, flip: bool = False) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.flip = flip

    @property
    def passes(self) -> int:
        """Forward passes per image."""
        return len(self.models) * (2 if self.flip else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, x.flip(-1)] if self.flip else [x]
        return torch.stack([m(v).log_softmax(1) for m in self.models for v in views]).mean(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--v2", default="benchmarks/results/teacher-v2")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist")
    v1 = resolve_teacher("resnet", data.spec).model.eval()
    v2 = resolve_teacher(args.v2, data.spec).model.eval()
    teachers = {"v1 (shipped)": v1, "v2": v2, "v2 + flip": MeanLogProb([v2], flip=True), "v1 + v2": MeanLogProb([v1, v2]),
                "v1 + v2 + flip": MeanLogProb([v1, v2], flip=True)}
    flops = count_flops(v1, tuple(data.spec.input_shape))
    print("| teacher | forward passes | MFLOPs / image | test accuracy % |")
    print("|---|---:|---:|---:|")
    for name, model in teachers.items():
        ev = evaluate(model, data.test)
        passes = getattr(model, "passes", 1)
        print(f"| {name} | {passes} | {passes * flops / 1e6:.1f} | {100 * ev.accuracy:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
