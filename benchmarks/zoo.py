"""The model zoo: parameters, FLOPs and shipped weights on Fashion-MNIST's input shape, then
parameters and FLOPs per input size, from 1x28x28 to 3x224x224.

    python benchmarks/zoo.py

FLOPs are counted by torch.utils.flop_counter for one image (1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import sys

from kdedge.errors import ModelError
from kdedge.models import MODELS, ModelSpec, count_flops, count_parameters, create_model, pretrained_path
from kdedge.models.architectures import LARGE_INPUT
from kdedge.models.zoo import model_cost

SHAPE = (1, 28, 28)
SIZES = ((1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 224, 224))
SIZED = ("resnet", "resnet_cifar", "resnet_cifar@0.5", "tiny_cnn", "dw_cnn", "mobilenet_v2", "mobilenet_v2@0.5", "mlp")


def fashion_mnist_table() -> None:
    teacher_flops = count_flops(create_model(ModelSpec("resnet", 1.0, 10, SHAPE)), SHAPE)
    print("| model | role | parameters | FLOPs / image | FLOPs vs resnet | shipped weights |")
    print("|---|---|---:|---:|---:|---|")
    roles = {"resnet": "teacher", "tiny_cnn": "default student", "dw_cnn": "student (depthwise-separable)", "mlp": "baseline (784-256-10)"}
    for name in ("resnet", "tiny_cnn", "dw_cnn", "mlp", "tiny_cnn@0.5", "dw_cnn@0.5"):
        arch, _, w = name.partition("@")
        width = float(w) if w else 1.0
        model = create_model(ModelSpec(arch, width, 10, SHAPE))
        flops = count_flops(model, SHAPE)
        shipped = pretrained_path(arch, width, "fashion-mnist")
        print(f"| `{name}` | {roles.get(name, 'width multiplier')} | {count_parameters(model):,} | {flops / 1e6:.2f} M | "
              f"1/{teacher_flops / flops:.1f} | {'fashion-mnist' if shipped else '—'} |")


def _si(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f}"


def sizes_table() -> None:
    heads = " | ".join("×".join(map(str, s)) for s in SIZES)
    print(f"| model (10 classes) | {heads} |")
    print("|---|" + "---:|" * len(SIZES))
    for name in SIZED:
        cells = []
        for shape in SIZES:
            try:
                cost = model_cost(name, 10, shape)
            except (ModelError, RuntimeError, ValueError) as exc:  # a model that cannot take this size says why
                cells.append(f"n/a ({str(exc).splitlines()[0][:60]})")
                continue
            cells.append(f"{_si(cost['params'])} / {_si(cost['flops'])}")
        print(f"| `{name}` | {' | '.join(cells)} |")
    print(f"\nEach cell: parameters / FLOPs per image. `resnet_cifar` and `mobilenet_v2` switch to ImageNet-style strides at "
          f"{LARGE_INPUT} px and up, so 3×224×224 can cost less than 3×64×64.")


def main() -> int:
    fashion_mnist_table()
    print()
    sizes_table()
    assert set(MODELS) == {"resnet", "resnet_cifar", "tiny_cnn", "dw_cnn", "mobilenet_v2", "mlp"}, "add new architectures to these tables"
    return 0


if __name__ == "__main__":
    sys.exit(main())
