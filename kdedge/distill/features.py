"""Feature distillation: FitNets hints and attention transfer, on features taken with forward hooks.

Intermediate features are read with forward hooks registered by module name (``stages.1``,
``features.2``): the models' ``forward`` methods are never changed. A feature loss pairs one
student layer with one teacher layer and adds its term to a logit loss (Hinton or DKD)::

    L = logit_loss(s, y, t) + γ · feature_term(f_s, f_t)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdedge.distill.losses import DistillLoss, LossParts
from kdedge.errors import ConfigError

__all__ = ["FeatureHooks", "FitNetsHint", "AttentionTransfer", "FeatureDistillLoss", "attention_map"]


class FeatureHooks:
    """Capture the outputs of named submodules on every forward pass.

    Raises:
        ConfigError: A name is not a submodule (the message lists the names that are).
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            available = [n for n in modules if n]
            raise ConfigError(f"no layer named {', '.join(map(repr, missing))} in {type(model).__name__}; layers: {', '.join(available)}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Resize the student map to the teacher's H x W (average-pool down, bilinear up)."""
    if student.shape[-2:] == teacher.shape[-2:]:
        return student
    if student.shape[-2] >= teacher.shape[-2] and student.shape[-1] >= teacher.shape[-1]:
        return F.adaptive_avg_pool2d(student, teacher.shape[-2:])
    return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)


def _check_maps(student_shape: torch.Size, teacher_shape: torch.Size, what: str) -> None:
    if len(student_shape) != 4 or len(teacher_shape) != 4:
        raise ConfigError(f"{what} needs 4-D feature maps (B, C, H, W); the chosen layers give student {tuple(student_shape)} and teacher "
                          f"{tuple(teacher_shape)}; pick convolutional layers")


class FitNetsHint(nn.Module):
    """FitNets (Romero et al., 2015): regress the teacher's hint layer from the student's guided layer.

    A learned 1x1 convolution (the regressor) maps the student's channels to the teacher's; the
    term is the mean squared error. Built from the two shapes by :meth:`build`.
    """

    name = "fitnets"

    def __init__(self) -> None:
        super().__init__()
        self.adapter: nn.Module | None = None

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        _check_maps(student_shape, teacher_shape, "FitNets")
        self.adapter = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1, bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            raise RuntimeError("FitNetsHint.build() must be called with the feature shapes first")
        return F.mse_loss(self.adapter(_match_spatial(student.float(), teacher)), teacher.float())


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention ``Q = mean_c |A_c|^p``, flattened and L2-normalized per sample: ``(B, H·W)``."""
    return F.normalize(features.float().abs().pow(p).mean(1).flatten(1), dim=1)


class AttentionTransfer(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, 2017): match normalized spatial attention maps.

    The term is the mean squared difference of :func:`attention_map` of student and teacher
    (channel counts may differ; spatial sizes are matched by pooling the larger map).
    """

    name = "at"

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        self.p = p

    def build(self, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
        _check_maps(student_shape, teacher_shape, "attention transfer")

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if student.shape[-2:] != teacher.shape[-2:]:
            small = min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1])
            student, teacher = F.adaptive_avg_pool2d(student, small), F.adaptive_avg_pool2d(teacher, small)
        return (attention_map(student, self.p) - attention_map(teacher, self.p)).pow(2).mean()


class FeatureDistillLoss(nn.Module):
    """A logit loss plus ``weight`` × a feature term between one student and one teacher layer.

    Args:
        logit_loss: Hinton or DKD (its parts are kept).
        term: :class:`FitNetsHint` or :class:`AttentionTransfer`.
        student_layer: Module name in the student whose output is the student feature.
        teacher_layer: Module name in the teacher.
        weight: γ, the feature term's weight.
    """

    needs_teacher = True
    needs_features = True

    def __init__(self, logit_loss: DistillLoss, term: FitNetsHint | AttentionTransfer, *, student_layer: str, teacher_layer: str, weight: float) -> None:
        super().__init__()
        if not weight >= 0:
            raise ConfigError(f"feature loss weight must be >= 0, got {weight}")
        self.logit_loss = logit_loss
        self.term = term
        self.student_layer, self.teacher_layer, self.weight = student_layer, teacher_layer, float(weight)

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                *, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> LossParts:
        parts = self.logit_loss(student_logits, targets, teacher_logits)
        feature = self.term(student_feature, teacher_feature.detach())
        return LossParts(parts.total + self.weight * feature, parts.task, parts.kd, feature.detach())
