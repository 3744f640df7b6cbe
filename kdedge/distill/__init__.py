"""Distillation: losses, the frozen teacher and its logit cache, the loop and metrics."""

from kdedge.distill.augment import augment_batch
from kdedge.distill.losses import HintonLoss, LossParts, kd_kl_divergence
from kdedge.distill.loop import fit
from kdedge.distill.metrics import Evaluation, evaluate, evaluation_from_predictions, predict_logits
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, logit_cache_key, teacher_logits

__all__ = [
    "Evaluation",
    "FrozenTeacher",
    "HintonLoss",
    "LossParts",
    "TeacherLogits",
    "augment_batch",
    "evaluate",
    "evaluation_from_predictions",
    "fit",
    "kd_kl_divergence",
    "logit_cache_key",
    "predict_logits",
    "teacher_logits",
]
