"""Distillation losses. A loss is an ``nn.Module`` returning its named parts for logging."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kdedge.errors import ConfigError

__all__ = ["LossParts", "DistillLoss", "HintonLoss", "DKDLoss", "kd_kl_divergence", "dkd_terms"]


class LossParts(NamedTuple):
    """``total`` is what the optimizer minimizes; the others are for logging."""

    total: torch.Tensor
    task: torch.Tensor  # cross-entropy with the labels
    kd: torch.Tensor  # T² · KL(teacher ‖ student), before the α weighting
    feature: torch.Tensor | None = None  # a feature term (FitNets, AT), before its weight


class DistillLoss(Protocol):
    """What the training loop needs from a loss: whether it uses teacher logits, and its parts."""

    @property
    def needs_teacher(self) -> bool: ...

    def __call__(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> LossParts: ...


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
        """All four :class:`LossParts`: ``total``, ``task``, ``kd`` (zero when ``alpha=0``), and
        ``feature`` left ``None`` (a feature loss wrapping this one fills it)."""
        task = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        if not self.needs_teacher:
            return LossParts(task, task.detach(), torch.zeros((), device=task.device))
        if teacher_logits is None:
            raise ValueError("HintonLoss with alpha > 0 needs teacher_logits")
        kd = self.temperature**2 * kd_kl_divergence(student_logits, teacher_logits, self.temperature)
        total = (1.0 - self.alpha) * task + self.alpha * kd
        return LossParts(total, task.detach(), kd.detach())


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample ``(TCKD, NCKD, p_t)`` of decoupled KD (Zhao et al., CVPR 2022), without the T² factor.

    With ``p = softmax(z/T)`` and the true class ``y``:

    * TCKD = KL(b_teacher ‖ b_student) over the binary split ``b = [p_y, 1 − p_y]``;
    * NCKD = KL(p̂_teacher ‖ p̂_student) over the non-target classes renormalized, ``p̂_k = p_k / (1 − p_y)``;
    * ``p_t`` is the teacher's ``p_y``, so that classical KD = TCKD + (1 − p_t)·NCKD exactly.

    Everything is computed in log space (log-sum-exp over the non-target logits), so it stays
    finite when a model is certain (``p_y → 1``).

    Returns:
        Three ``(B,)`` tensors.
    """
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    target = F.one_hot(targets, s.shape[-1]).bool()  # (B, K)
    lse_s, lse_t = torch.logsumexp(s, -1), torch.logsumexp(t, -1)  # (B,)
    lse_nt_s = torch.logsumexp(s.masked_fill(target, float("-inf")), -1)  # log Σ_{k≠y} exp(z_k)
    lse_nt_t = torch.logsumexp(t.masked_fill(target, float("-inf")), -1)
    log_py_s, log_py_t = s[target] - lse_s, t[target] - lse_t  # log p_y
    log_pn_s, log_pn_t = lse_nt_s - lse_s, lse_nt_t - lse_t  # log (1 − p_y)
    tckd = log_py_t.exp() * (log_py_t - log_py_s) + log_pn_t.exp() * (log_pn_t - log_pn_s)
    log_hat_s, log_hat_t = s - lse_nt_s[:, None], t - lse_nt_t[:, None]  # log p̂ (target column is meaningless)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).masked_fill(target, 0.0).sum(-1)
    return tckd, nckd, log_py_t.exp()


class DKDLoss(nn.Module):
    """Decoupled knowledge distillation: ``L = w·CE(s, y) + T²·(α·TCKD + β·NCKD)``.

    Classical KD couples NCKD to the teacher's confidence through (1 − p_t); DKD weights the two
    terms independently. Defaults follow the paper's CIFAR-100 setting (α 1, β 8, T 4), including
    its linear warm-up of the DKD term: without it, T²·β = 128 times NCKD at full learning rate
    killed the default student here in the first epoch (loss 182, accuracy 10 %).

    Args:
        alpha: Weight of the target-class term TCKD.
        beta: Weight of the non-target-class term NCKD.
        temperature: Softmax temperature ``T > 0``.
        ce_weight: Weight ``w`` of the cross-entropy with the labels.
        label_smoothing: Passed to the cross-entropy term.
        warmup_epochs: The DKD term's weight rises linearly from 0 to 1 over this many epochs
            (the training loop reports progress through :meth:`set_progress`).
    """

    needs_teacher = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, *, ce_weight: float = 1.0, label_smoothing: float = 0.0,
                 warmup_epochs: float = 1.0) -> None:
        super().__init__()
        problems = [f"{n} must be >= 0, got {v}" for n, v in (("alpha", alpha), ("beta", beta), ("ce_weight", ce_weight)) if not v >= 0]
        if not temperature > 0:
            problems.append(f"temperature must be > 0, got {temperature}")
        if problems:
            raise ConfigError("invalid DKD loss: " + "; ".join(problems))
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.ce_weight, self.label_smoothing = float(ce_weight), float(label_smoothing)
        self.warmup_epochs = float(warmup_epochs)
        self.ramp = 1.0

    def set_progress(self, epochs_done: float) -> None:
        """Called by the loop before each step with the fractional number of epochs completed."""
        self.ramp = min(1.0, epochs_done / self.warmup_epochs) if self.warmup_epochs > 0 else 1.0

    def forward(self, student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> LossParts:
        if teacher_logits is None:
            raise ValueError("DKDLoss needs teacher_logits")
        task = F.cross_entropy(student_logits.float(), targets, label_smoothing=self.label_smoothing)
        tckd, nckd, _ = dkd_terms(student_logits, teacher_logits, targets, self.temperature)
        kd = self.temperature**2 * (self.alpha * tckd.mean() + self.beta * nckd.mean())
        return LossParts(self.ce_weight * task + self.ramp * kd, task.detach(), kd.detach())
