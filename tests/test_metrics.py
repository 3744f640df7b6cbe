"""Accuracy, macro precision/recall/F1 and the confusion matrix against hand-computed values and scikit-learn."""

import json
import time

import pytest
import torch

from kdedge.metrics import CONFUSION_MAX_CLASSES, ChanceCheck, evaluate, evaluation_from_confusion, evaluation_from_predictions


def test_golden_macro_metrics():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    ev = evaluation_from_predictions(preds, targets, 3)
    assert ev.confusion.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
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


# (targets, predictions) -> (precision, recall, f1) from scikit-learn 1.9.1:
# precision_recall_fscore_support(y_true, y_pred, average="macro", zero_division=0), its default labels
# being those present in y_true or y_pred. Every case is scored here over K = 10 classes.
SKLEARN_MACRO = [
    (([0, 0, 1, 1], [0, 0, 1, 1]), (1.0, 1.0, 1.0)),  # issue 24 item 2: kdedge gave macro F1 0.2
    (([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]), (0.6666666666666666, 0.7222222222222222, 0.6555555555555556)),
    (([0, 1], [0, 0]), (0.25, 0.5, 0.3333333333333333)),  # a class present but never predicted
    (([0, 0, 1, 1], [0, 2, 1, 1]), (0.6666666666666666, 0.5, 0.5555555555555555)),  # a class predicted but absent
    (([3, 3, 3, 7, 7, 1, 1, 1, 1, 9], [3, 7, 3, 7, 1, 1, 1, 2, 1, 9]), (0.65, 0.5833333333333333, 0.61)),
]


@pytest.mark.parametrize("case, expected", SKLEARN_MACRO)
def test_macro_averages_match_scikit_learn(case, expected):
    targets, preds = (torch.tensor(v) for v in case)
    ev = evaluation_from_predictions(preds, targets, 10)
    assert (ev.macro_precision, ev.macro_recall, ev.macro_f1) == pytest.approx(expected, abs=1e-12)
    assert evaluation_from_confusion(ev.confusion).macro_f1 == pytest.approx(expected[2], abs=1e-12)  # the same from the matrix


def test_many_classes_cost_linear_time_and_no_dense_matrix():
    k, n = 20_000, 10_000  # a dense 20k x 20k confusion would be 3.2 GB
    targets = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    preds = torch.where(torch.arange(n) % 4 == 0, (targets + 1) % k, targets)
    start = time.perf_counter()
    ev = evaluation_from_predictions(preds, targets, k)
    text = json.dumps(ev.to_dict())
    seconds = time.perf_counter() - start
    assert ev.confusion is None and ev.accuracy == pytest.approx(0.75)
    assert ev.to_dict()["confusion"] is None and "20000 classes" in ev.to_dict()["confusion_omitted"]
    assert len(text) < 400_000 and seconds < 5  # was a K² bincount and a K² list: minutes and gigabytes
    assert ChanceCheck.of(ev).classes == int((ev.support > 0).sum())
    small = evaluation_from_predictions(preds % CONFUSION_MAX_CLASSES, targets % CONFUSION_MAX_CLASSES, CONFUSION_MAX_CLASSES)
    assert small.confusion is not None and small.to_dict()["confusion"] is not None  # at the limit it is still written


def test_evaluate_keeps_argmax_not_logits():
    class Wide(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 5000).float()

    x = torch.randint(0, 5000, (300, 1)).float()
    data = torch.utils.data.TensorDataset(x, x[:, 0].long())
    ev = evaluate(Wide(), data, batch_size=64)
    assert ev.accuracy == 1.0 and ev.macro_f1 == 1.0 and ev.num_classes == 5000 and ev.confusion is None
