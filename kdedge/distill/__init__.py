"""Distillation: losses, the frozen teacher and its logit cache, the training loop."""

from kdedge.distill.augment import augment_batch
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit
from kdedge.distill.losses import DistillLoss, DKDLoss, HintonLoss, LossParts, dkd_terms, kd_kl_divergence
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, logit_cache_key, teacher_logits

__all__ = [
    "DKDLoss",
    "DistillLoss",
    "FrozenTeacher",
    "HintonLoss",
    "LossParts",
    "TeacherLogits",
    "augment_batch",
    "dkd_terms",
    "fit",
    "kd_kl_divergence",
    "logit_cache_key",
    "make_loss",
    "teacher_logits",
]
