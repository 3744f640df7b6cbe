"""Accuracy, macro precision/recall/F1 and the confusion matrix against hand-computed values."""

import pytest
import torch

from kdedge.metrics import evaluation_from_predictions


def test_golden_macro_metrics():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    ev = evaluation_from_predictions(preds, targets, 3)
    assert ev.confusion == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert ev.accuracy == pytest.approx(4 / 6)
    # precision per class: 2/2, 1/2, 1/2 ; recall: 2/3, 1/2, 1/1
    assert ev.macro_precision == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert ev.macro_recall == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert ev.macro_f1 == pytest.approx(sum(f1) / 3)


def test_never_predicted_class_counts_as_zero():
    ev = evaluation_from_predictions(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    assert ev.macro_precision == pytest.approx(0.25)  # class 0: 1/2, class 1: never predicted -> 0
    assert ev.macro_recall == pytest.approx(0.5)
