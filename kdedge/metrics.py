"""Classification metrics from a confusion matrix: accuracy, macro precision/recall/F1."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge._modes import evaluating
from kdedge.data.spec import ImageDataset
from kdedge.errors import DataError

__all__ = ["CONFUSION_MAX_CLASSES", "ChanceCheck", "Evaluation", "class_counts", "confusion_matrix", "evaluate", "evaluation_from_confusion",
           "evaluation_from_counts", "evaluation_from_predictions", "predict_logits"]


#: Classes up to which the confusion matrix is kept (dense, ``K × K``) and written to ``metrics.json``:
#: 256² cells is ~300 KB of JSON. Above it only the per-class counts are kept (O(K) memory and time):
#: 20,000 classes would be a 3.2 GB matrix and a JSON file a person cannot read anyway.
CONFUSION_MAX_CLASSES = 256


@dataclass
class Evaluation:
    """Test-set quality of a classifier.

    Macro averages follow scikit-learn's ``average="macro"`` with its default labels: the mean over
    the classes that occur in the targets *or* the predictions. A class that never occurs in either
    says nothing about the model and is left out; a class that occurs but is never predicted has
    precision 0 (scikit-learn's ``zero_division=0``), one predicted but absent has recall 0.

    Attributes:
        support: ``(K,)`` samples of each true class.
        predicted: ``(K,)`` predictions of each class.
        correct: ``(K,)`` samples of each class predicted right (the confusion's diagonal).
        confusion: ``(K, K)`` counts of class i predicted j, kept for up to
            :data:`CONFUSION_MAX_CLASSES` classes; None above (the metrics come from the counts).
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    num_samples: int
    support: torch.Tensor
    predicted: torch.Tensor
    correct: torch.Tensor
    confusion: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return int(self.support.numel())

    @property
    def classes_present(self) -> int:
        """Classes in the targets or the predictions: what the macro averages are taken over."""
        return int(((self.support > 0) | (self.predicted > 0)).sum())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"accuracy": self.accuracy, "macro_precision": self.macro_precision, "macro_recall": self.macro_recall,
                             "macro_f1": self.macro_f1, "num_samples": self.num_samples, "num_classes": self.num_classes,
                             "macro_classes": self.classes_present}
        if self.confusion is not None:
            d["confusion"] = self.confusion.tolist()
        else:
            d["confusion"] = None
            d["confusion_omitted"] = (f"{self.num_classes} classes: a {self.num_classes}×{self.num_classes} matrix is above the "
                                      f"{CONFUSION_MAX_CLASSES}-class limit; support and correct are per class instead")
            d["support"] = self.support.tolist()
            d["correct"] = self.correct.tolist()
        return d


def _checked(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as flat int64 on the CPU, every value a class index below ``num_classes``."""
    predictions = predictions.to(torch.int64).cpu().reshape(-1)
    targets = targets.to(torch.int64).cpu().reshape(-1)
    for what, v in (("labels", targets), ("predictions", predictions)):
        if v.numel() and (int(v.min()) < 0 or int(v.max()) >= num_classes):
            raise DataError(f"{what} must be class indices in [0, {num_classes - 1}], found [{int(v.min())}, {int(v.max())}]; "
                            "the model's outputs or the data's labels do not match its number of classes")
    return predictions, targets


def class_counts(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(3, K)`` int64: per class its support (true samples), its predictions and its correct predictions. O(N + K)."""
    predictions, targets = _checked(predictions, targets, num_classes)
    hit = targets[predictions == targets]
    return torch.stack([torch.bincount(targets, minlength=num_classes), torch.bincount(predictions, minlength=num_classes),
                        torch.bincount(hit, minlength=num_classes)])


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64: row = true class, column = prediction. Dense: for small K only (see :data:`CONFUSION_MAX_CLASSES`)."""
    predictions, targets = _checked(predictions, targets, num_classes)
    return torch.bincount(targets * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def evaluation_from_predictions(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> Evaluation:
    """Metrics for integer ``predictions`` against ``targets`` (both ``(N,)``) over ``num_classes`` classes."""
    confusion = confusion_matrix(predictions, targets, num_classes) if num_classes <= CONFUSION_MAX_CLASSES else None
    return evaluation_from_counts(class_counts(predictions, targets, num_classes), confusion)


def evaluation_from_confusion(confusion: torch.Tensor) -> Evaluation:
    """Metrics from a ``(K, K)`` confusion matrix (rows: true class, columns: prediction)."""
    confusion = confusion.to(torch.int64).cpu()
    counts = torch.stack([confusion.sum(1), confusion.sum(0), confusion.diag()])
    return evaluation_from_counts(counts, confusion if confusion.shape[0] <= CONFUSION_MAX_CLASSES else None)


def evaluation_from_counts(counts: torch.Tensor, confusion: torch.Tensor | None = None) -> Evaluation:
    """Metrics from :func:`class_counts` ``(3, K)`` (support, predicted, correct), e.g. summed over DDP ranks."""
    support, predicted, correct = (c.to(torch.int64).cpu() for c in counts)
    present = (support > 0) | (predicted > 0)  # scikit-learn's labels: those in y_true or y_pred
    tp, sup, pred = correct.double(), support.double(), predicted.double()
    precision = torch.where(pred > 0, tp / pred.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(sup > 0, tp / sup.clamp_min(1), torch.zeros_like(tp))
    f1 = torch.where(sup + pred > 0, 2 * tp / (sup + pred).clamp_min(1), torch.zeros_like(tp))  # 2·TP / (2·TP + FP + FN)
    n = int(support.sum())
    k = max(int(present.sum()), 1)
    return Evaluation(
        accuracy=float(tp.sum() / max(n, 1)),
        macro_precision=float(precision[present].sum() / k),
        macro_recall=float(recall[present].sum() / k),
        macro_f1=float(f1[present].sum() / k),
        num_samples=n,
        support=support,
        predicted=predicted,
        correct=correct,
        confusion=confusion,
    )


_BATCH_BYTES = 128 << 20  # float inputs per evaluation batch


def _outputs(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int, device: torch.device | str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(logits, labels)`` of ``model`` batch by batch over ``data``, on the CPU; the caller holds eval mode and inference mode."""
    if isinstance(data, ImageDataset):
        batch_size = max(1, min(batch_size, _BATCH_BYTES // (4 * math.prod(data.spec.input_shape))))  # 224-px RGB: 222 per batch
        for x, y in data.chunks(batch_size, device=device):  # an image folder decodes in worker processes
            yield model(x).float().cpu(), y.cpu()
    else:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
        for x, y in loader:
            yield model(x.to(device)).float().cpu(), torch.as_tensor(y).cpu()


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 1000, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and labels ``(N,)`` of ``model`` over ``data``, in eval mode."""
    outputs, labels = [], []
    with evaluating(model):
        for logits, y in _outputs(model, data, batch_size=batch_size, device=device):
            outputs.append(logits)
            labels.append(y)
    return torch.cat(outputs), torch.cat(labels)


@torch.inference_mode()
def _predictions(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Predicted classes ``(N,)``, labels ``(N,)`` and the logits' width K; only the argmax of each batch is kept (not ``N × K`` logits)."""
    predictions, labels, width = [], [], 0
    with evaluating(model):
        for logits, y in _outputs(model, data, batch_size=batch_size, device=device):
            predictions.append(logits.argmax(1))
            labels.append(y)
            width = logits.shape[1]
    if not predictions:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), width
    return torch.cat(predictions), torch.cat(labels), width


def agreement(model: nn.Module, reference: torch.Tensor, data: Dataset | DataLoader, *, batch_size: int = 1000, device: torch.device | str = "cpu") -> float:
    """The share of ``data`` on which ``model`` predicts the class ``reference`` ``(N,)`` holds (e.g. the teacher's predictions)."""
    predictions, _, _ = _predictions(model, data, batch_size=batch_size, device=device)
    if len(predictions) != len(reference):
        raise ValueError(f"{len(reference)} reference predictions for {len(predictions)} samples")
    return float((predictions == reference.cpu()).float().mean()) if len(predictions) else 0.0


def evaluate(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None, batch_size: int = 1000, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy, macro precision/recall/F1 and per-class counts (the confusion matrix up to :data:`CONFUSION_MAX_CLASSES`) of ``model`` on ``data``.

    O(N + K) time and memory beyond the model's own batches. Under DDP each rank scores a
    contiguous shard of an :class:`~kdedge.data.ImageDataset` and the counts are summed, so every
    rank returns the metrics of the whole set.
    """
    import kdedge.distributed as dist_

    ctx = dist_.context()
    if ctx.enabled and isinstance(data, ImageDataset):
        lo, hi = len(data) * ctx.rank // ctx.world_size, len(data) * (ctx.rank + 1) // ctx.world_size
        predictions, labels, _ = _predictions(model, data.subset(torch.arange(lo, hi)), batch_size=batch_size, device=device)
        k = num_classes or data.spec.num_classes
        confusion = dist_.all_reduce_sum(confusion_matrix(predictions, labels, k)) if k <= CONFUSION_MAX_CLASSES else None
        return evaluation_from_counts(dist_.all_reduce_sum(class_counts(predictions, labels, k)), confusion)
    predictions, labels, width = _predictions(model, data, batch_size=batch_size, device=device)
    return evaluation_from_predictions(predictions, labels, num_classes or width)


@dataclass(frozen=True)
class ChanceCheck:
    """A classifier's balanced accuracy against what guessing scores.

    Balanced accuracy is the mean recall over the classes present in the test set; a model that
    answers one class (or guesses at random) scores ``1/K`` however imbalanced the classes are,
    where plain accuracy would credit it with the majority class's share.

    Attributes:
        balanced_accuracy: Mean per-class recall over the ``classes`` present.
        chance: ``1/classes``.
        standard_error: Of the balanced accuracy of a chance-level classifier on these class counts:
            ``sqrt(p(1−p)·Σ_c 1/n_c) / K`` with ``p = 1/K``.
        classes: Classes with at least one test sample.
    """

    balanced_accuracy: float
    chance: float
    standard_error: float
    classes: int

    @classmethod
    def of(cls, ev: Evaluation) -> ChanceCheck:
        present = ev.support > 0
        n = ev.support[present].double()
        recalls = ev.correct[present].double() / n
        k = int(present.sum())
        p = 1.0 / max(k, 1)
        se = math.sqrt(p * (1 - p) * float((1.0 / n).sum())) / max(k, 1)
        return cls(float(recalls.sum()) / max(k, 1), p, se, k)

    def at_chance(self, *, sigmas: float = 3.0, slack: float = 0.0) -> bool:
        """Within ``sigmas`` standard errors of chance, or within ``slack`` of the way from chance to 1."""
        return self.classes >= 2 and self.balanced_accuracy <= self.chance + max(sigmas * self.standard_error, slack * (1 - self.chance))
