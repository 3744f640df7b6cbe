"""Distillation: losses, the frozen teacher and its logit cache, the loop and metrics."""

from kdedge.distill.augment import augment_batch
from kdedge.distill.losses import DistillLoss, DKDLoss, HintonLoss, LossParts, dkd_terms, kd_kl_divergence
from kdedge.distill.loop import fit
from kdedge.distill.metrics import Evaluation, evaluate, evaluation_from_predictions, predict_logits
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, logit_cache_key, teacher_logits

__all__ = [
    "DKDLoss",
    "DistillLoss",
    "Evaluation",
    "FrozenTeacher",
    "HintonLoss",
    "LossParts",
    "TeacherLogits",
    "augment_batch",
    "dkd_terms",
    "evaluate",
    "evaluation_from_predictions",
    "fit",
    "kd_kl_divergence",
    "logit_cache_key",
    "predict_logits",
    "teacher_logits",
]
