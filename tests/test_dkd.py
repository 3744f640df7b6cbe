"""Decoupled KD: hand-computed golden values and the decomposition KD = TCKD + (1 − p_t)·NCKD."""

from __future__ import annotations

import math

import pytest
import torch

from kdedge.distill.losses import DKDLoss, dkd_terms, kd_kl_divergence
from kdedge.errors import ConfigError


def test_golden_values_by_hand():
    # Student uniform over 3 classes; teacher p = [1/5, 3/5, 1/5]; true class 0; T = 1.
    s = torch.zeros(1, 3)
    t = torch.tensor([[0.0, math.log(3.0), 0.0]])
    tckd, nckd, p_t = dkd_terms(s, t, torch.tensor([0]), 1.0)
    # Binary split: teacher [0.2, 0.8] vs student [1/3, 2/3].
    assert tckd.item() == pytest.approx(0.2 * math.log(0.2 / (1 / 3)) + 0.8 * math.log(0.8 / (2 / 3)), abs=1e-6)
    # Non-target classes renormalized: teacher [3/4, 1/4] vs student [1/2, 1/2].
    assert nckd.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert p_t.item() == pytest.approx(0.2)
    # A teacher that agrees with the student on the non-target classes has NCKD = 0.
    _, nckd0, _ = dkd_terms(s, torch.tensor([[math.log(2.0), 0.0, 0.0]]), torch.tensor([0]), 1.0)
    assert nckd0.item() == pytest.approx(0.0, abs=1e-7)


def test_decomposition_identity_on_random_logits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(64, 10, generator=g) * 3, torch.randn(64, 10, generator=g) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    for temperature in (1.0, 2.0, 4.0):
        tckd, nckd, p_t = dkd_terms(s, t, y, temperature)
        kd = kd_kl_divergence(s, t, temperature)  # batch mean of the per-sample KL
        assert (tckd + (1 - p_t) * nckd).mean().item() == pytest.approx(kd.item(), rel=1e-5, abs=1e-6)
        assert (tckd >= -1e-6).all() and (nckd >= -1e-6).all()


def test_confident_models_stay_finite():
    s = torch.tensor([[60.0, 0.0, -60.0]])
    t = torch.tensor([[80.0, -5.0, 3.0]])
    tckd, nckd, _ = dkd_terms(s, t, torch.tensor([0]), 1.0)
    assert torch.isfinite(tckd).all() and torch.isfinite(nckd).all()


def test_dkd_loss_parts_and_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(8, 5, generator=g, requires_grad=True)
    t, y = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    loss = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0)
    parts = loss(s, y, t)  # ramp 1 until the loop reports progress
    tckd, nckd, _ = dkd_terms(s, t, y, 4.0)
    assert parts.kd.item() == pytest.approx(16 * (tckd.mean() + 8 * nckd.mean()).item(), rel=1e-6)
    assert parts.total.item() == pytest.approx(parts.task.item() + parts.kd.item(), rel=1e-6)
    parts.total.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    loss.set_progress(0.25)  # a quarter into the 1-epoch warm-up: a quarter of the DKD term
    quarter = loss(s, y, t)
    assert quarter.total.item() == pytest.approx(quarter.task.item() + 0.25 * quarter.kd.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        DKDLoss(beta=-1)


def test_distill_with_dkd_via_cli(tmp_path, capsys):
    import json

    from conftest import make_idx_dir

    from kdedge.cli import main
    from kdedge.data import load_dataset
    from kdedge.models import ModelSpec, create_model, save_checkpoint

    data_dir = make_idx_dir(tmp_path / "data", n_train=120, n_test=40)
    spec = load_dataset(str(data_dir)).spec
    teacher = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, create_model(ModelSpec("mlp", 1.0, 3, (1, 8, 8))), ModelSpec("mlp", 1.0, 3, (1, 8, 8)), spec)
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(teacher), "--student", "mlp@0.25", "--data", str(data_dir), "--loss", "dkd", "--dkd-beta", "2",
                 "--epochs", "1", "--cache", "memory", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "loss: dkd" in (out / "config.yaml").read_text() and "dkd_beta: 2.0" in (out / "config.yaml").read_text()
    assert json.loads((out / "metrics.json").read_text())["history"][0]["train_kd_loss"] > 0
    assert main(["distill", "--loss", "fitnet", "--out", str(tmp_path / "bad")]) == 2
    assert "loss must be one of hinton, dkd" in capsys.readouterr().err
