"""Classification metrics from a confusion matrix: accuracy, macro precision/recall/F1."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from kdedge.data.spec import ArrayDataset

__all__ = ["Evaluation", "evaluate", "evaluation_from_confusion", "evaluation_from_predictions", "predict_logits"]


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


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 1000, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and labels ``(N,)`` of ``model`` over ``data``, in eval mode."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    try:
        if isinstance(data, ArrayDataset):
            for start in range(0, len(data), batch_size):
                index = slice(start, start + batch_size)
                outputs.append(model(data.inputs(index, device=device)).float().cpu())
                labels.append(data.labels[index].cpu())
        else:
            loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
            for x, y in loader:
                outputs.append(model(x.to(device)).float().cpu())
                labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def evaluate(model: nn.Module, data: Dataset | DataLoader, *, num_classes: int | None = None, batch_size: int = 1000, device: torch.device | str = "cpu") -> Evaluation:
    """Accuracy, macro precision/recall/F1 and the confusion matrix of ``model`` on ``data``.

    Under DDP each rank scores a contiguous shard of an :class:`ArrayDataset` and the confusion
    matrices are summed, so every rank returns the metrics of the whole set.
    """
    import kdedge.distributed as dist_

    ctx = dist_.context()
    if ctx.enabled and isinstance(data, ArrayDataset):
        lo, hi = len(data) * ctx.rank // ctx.world_size, len(data) * (ctx.rank + 1) // ctx.world_size
        logits, labels = predict_logits(model, ArrayDataset(data.images[lo:hi], data.labels[lo:hi], data.spec), batch_size=batch_size, device=device)
        k = num_classes or data.spec.num_classes
        confusion = _confusion(logits.argmax(1) if len(logits) else torch.empty(0), labels, k)
        return evaluation_from_confusion(dist_.all_reduce_sum(confusion))
    logits, labels = predict_logits(model, data, batch_size=batch_size, device=device)
    k = num_classes or logits.shape[1]
    return evaluation_from_predictions(logits.argmax(1), labels, k)
