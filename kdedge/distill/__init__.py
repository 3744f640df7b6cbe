"""Distillation: losses, the frozen teacher, its caches (logits, augmented views) and the training loop."""

from kdedge.distill.augment import apply_views, augment_batch, sample_views
from kdedge.distill.factory import make_loss
from kdedge.distill.loop import fit
from kdedge.distill.losses import DistillLoss, DKDLoss, HintonLoss, LossParts, dkd_terms, kd_kl_divergence
from kdedge.distill.teacher import FrozenTeacher, TeacherLogits, logit_cache_key, teacher_logits
from kdedge.distill.teacher_pass import TeacherPass, teacher_pass
from kdedge.distill.views import TeacherViews, ViewRecipe, teacher_views, view_cache_key

__all__ = [
    "DKDLoss",
    "DistillLoss",
    "FrozenTeacher",
    "HintonLoss",
    "LossParts",
    "TeacherLogits",
    "TeacherPass",
    "TeacherViews",
    "ViewRecipe",
    "apply_views",
    "augment_batch",
    "dkd_terms",
    "fit",
    "kd_kl_divergence",
    "logit_cache_key",
    "make_loss",
    "sample_views",
    "teacher_logits",
    "teacher_pass",
    "teacher_views",
    "view_cache_key",
]
