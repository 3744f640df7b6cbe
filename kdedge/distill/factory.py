"""The distillation loss a config names."""

from __future__ import annotations

from kdedge.config import DistillConfig
from kdedge.distill.losses import DistillLoss, DKDLoss, HintonLoss

__all__ = ["make_loss"]


def make_loss(config: DistillConfig) -> DistillLoss:
    """``hinton`` (α, T), ``dkd`` (dkd_alpha, dkd_beta, T), or ``fitnets`` / ``at``: Hinton's loss plus a
    feature term between ``student_layer`` and ``teacher_layer`` weighted by ``feature_weight``
    (default 1 for FitNets, 1000 for AT, as in the papers)."""
    if config.loss in ("fitnets", "at"):
        from kdedge.distill.features import AttentionTransfer, FeatureDistillLoss, FitNetsHint

        term = FitNetsHint() if config.loss == "fitnets" else AttentionTransfer()
        weight = config.feature_weight if config.feature_weight is not None else (1.0 if config.loss == "fitnets" else 1000.0)
        logits = HintonLoss(alpha=config.alpha, temperature=config.temperature, label_smoothing=config.label_smoothing)
        return FeatureDistillLoss(logits, term, student_layer=config.student_layer, teacher_layer=config.teacher_layer, weight=weight)  # type: ignore[arg-type]
    if config.loss == "dkd":
        return DKDLoss(alpha=config.dkd_alpha, beta=config.dkd_beta, temperature=config.temperature, label_smoothing=config.label_smoothing,
                       warmup_epochs=config.dkd_warmup)
    return HintonLoss(alpha=config.alpha, temperature=config.temperature, label_smoothing=config.label_smoothing)
