"""The model zoo on Fashion-MNIST's input shape: parameters, FLOPs and shipped weights.

    python benchmarks/zoo.py

FLOPs are counted by torch.utils.flop_counter for one 1x28x28 image (1 multiply-add = 2 FLOPs).
"""

from __future__ import annotations

import sys

from kdedge.models import MODELS, ModelSpec, count_flops, count_parameters, create_model, pretrained_path

SHAPE = (1, 28, 28)


def main() -> int:
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
    assert set(MODELS) == {"resnet", "tiny_cnn", "dw_cnn", "mlp"}, "add new architectures to this table"
    return 0


if __name__ == "__main__":
    sys.exit(main())
