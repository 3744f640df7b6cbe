"""Classification metrics from a confusion matrix: accuracy, macro precision/recall/F1."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge._modes import evaluating
from kdedge.data.spec import ImageDataset

__all__ = ["ChanceCheck", "Evaluation", "evaluate", "evaluation_from_confusion", "evaluation_from_predictions", "predict_logits"]


@dataclass
class Evaluation:
    """Test-set quality of a classifier.

    Macro averages weigh every class equally (a class never predicted has precision 0), as in
    scikit-learn's ``average="macro"``. ``confusion[i][j]`` counts samples of class i predicted j.
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    num_samples: int
    confusion: list[list[int]]

    def to_dict(self) -> dict:
        return asdict(self)


def evaluation_from_predictions(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> Evaluation:
    """Metrics for integer ``predictions`` against ``targets`` (both ``(N,)``)."""
    return evaluation_from_confusion(_confusion(predictions, targets, num_classes))


def _confusion(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    predictions = predictions.to(torch.int64).cpu()
    targets = targets.to(torch.int64).cpu()
    return torch.bincount(targets * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def evaluation_from_confusion(confusion: torch.Tensor) -> Evaluation:
    """Metrics from a ``(K, K)`` confusion matrix (rows: true class, columns: prediction)."""
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    n = int(confusion.sum())
    return Evaluation(
        accuracy=float(tp.sum() / max(n, 1)),
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        num_samples=n,
        confusion=confusion.tolist(),
    )


_BATCH_BYTES = 128 << 20  # float inputs per evaluation batch


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 1000, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and labels ``(N,)`` of ``model`` over ``data``, in eval mode."""
    outputs, labels = [], []
    with evaluating(model):
        if isinstance(data, ImageDataset):
            batch_size = max(1, min(batch_size, _BATCH_BYTES // (4 * math.prod(data.spec.input_shape))))  # 224-px RGB: 222 per batch
            for x, y in data.chunks(batch_size, device=device):  # an image folder decodes in worker processes
                outputs.append(model(x).float().cpu())
                labels.append(y.cpu())
        else:
            loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
            for x, y in loader:
                outputs.append(model(x.to(device)).float().cpu())
                labels.append(torch.as_tensor(y).cpu())
    return torch.cat(outputs), torch.cat(labels)


def evaluate(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None, batch_size: int = 1000, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy, macro precision/recall/F1 and the confusion matrix of ``model`` on ``data``.

    Under DDP each rank scores a contiguous shard of an :class:`~kdedge.data.ImageDataset` and the confusion
    matrices are summed, so every rank returns the metrics of the whole set.
    """
    import kdedge.distributed as dist_

    ctx = dist_.context()
    if ctx.enabled and isinstance(data, ImageDataset):
        lo, hi = len(data) * ctx.rank // ctx.world_size, len(data) * (ctx.rank + 1) // ctx.world_size
        logits, labels = predict_logits(model, data.subset(torch.arange(lo, hi)), batch_size=batch_size, device=device)
        k = num_classes or data.spec.num_classes
        confusion = _confusion(logits.argmax(1) if len(logits) else torch.empty(0), labels, k)
        return evaluation_from_confusion(dist_.all_reduce_sum(confusion))
    logits, labels = predict_logits(model, data, batch_size=batch_size, device=device)
    k = num_classes or logits.shape[1]
    return evaluation_from_predictions(logits.argmax(1), labels, k)


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
        counts = [sum(row) for row in ev.confusion]
        recalls = [row[c] / n for c, (row, n) in enumerate(zip(ev.confusion, counts)) if n > 0]
        k = len(recalls)
        p = 1.0 / max(k, 1)
        se = (p * (1 - p) * sum(1.0 / n for n in counts if n > 0)) ** 0.5 / max(k, 1)
        return cls(sum(recalls) / max(k, 1), p, se, k)

    def at_chance(self, *, sigmas: float = 3.0, slack: float = 0.0) -> bool:
        """Within ``sigmas`` standard errors of chance, or within ``slack`` of the way from chance to 1."""
        return self.classes >= 2 and self.balanced_accuracy <= self.chance + max(sigmas * self.standard_error, slack * (1 - self.chance))
