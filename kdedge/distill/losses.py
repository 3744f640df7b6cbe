"""Distillation losses. A loss is an ``nn.Module`` returning its named parts for logging."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdedge.errors import ConfigError

__all__ = ["LossParts", "HintonLoss", "kd_kl_divergence"]


class LossParts(NamedTuple):
    """``total`` is what the optimizer minimizes; the others are for logging."""

    total: torch.Tensor
    task: torch.Tensor  # cross-entropy with the labels
    kd: torch.Tensor  # T² · KL(teacher ‖ student), before the α weighting


def kd_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t/T) ‖ softmax(s/T))``, summed over classes and averaged over the batch.

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``.
        temperature: ``T``, which softens both distributions.
    """
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q); "batchmean" sums
    # over classes and divides by B — the mathematical KL averaged over samples.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


class HintonLoss(nn.Module):
    """Hinton et al. (2015): ``L = (1−α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``.

    The T² factor keeps the soft targets' gradient magnitude independent of T. With
    ``alpha=0`` this is plain supervised training and no teacher is needed.

    Args:
        alpha: Weight of the distillation term, in ``[0, 1]``.
        temperature: Softmax temperature ``T > 0``.
        label_smoothing: Passed to the cross-entropy term.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)

    @property
    def needs_teacher(self) -> bool:
        return self.alpha > 0

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> LossParts:
        task = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        if not self.needs_teacher:
            return LossParts(task, task.detach(), torch.zeros((), device=task.device))
        if teacher_logits is None:
            raise ValueError("HintonLoss with alpha > 0 needs teacher_logits")
        kd = self.temperature**2 * kd_kl_divergence(student_logits, teacher_logits, self.temperature)
        total = (1.0 - self.alpha) * task + self.alpha * kd
        return LossParts(total, task.detach(), kd.detach())
