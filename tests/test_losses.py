"""Golden values of Hinton's loss, hand-computed on fixed tensors."""

import math

import pytest
import torch

from kdedge.distill import HintonLoss, kd_kl_divergence
from kdedge.errors import ConfigError

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -0.5, 0.0]])
T_LOGITS = torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
Y = torch.tensor([2, 0])

# Computed with plain Python floats (math.exp/log), independent of torch:
CE = 0.5439378175430576                 # mean over the batch of −log softmax(s)[y]
KL = {1.0: 1.099910502403514,           # Σ_k p_t (log p_t − log p_s) at temperature T,
      2.0: 0.3312321687124006,          # averaged over the 2 samples
      4.0: 0.08501364782329106}


def test_cross_entropy_golden():
    assert HintonLoss(alpha=0.0)(S, Y).total.item() == pytest.approx(CE, abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_golden(temperature):
    assert kd_kl_divergence(S, T_LOGITS, temperature).item() == pytest.approx(KL[temperature], abs=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_alpha_one_is_t_squared_kl(temperature):
    parts = HintonLoss(alpha=1.0, temperature=temperature)(S, Y, T_LOGITS)
    assert parts.total.item() == pytest.approx(temperature**2 * KL[temperature], abs=1e-5)
    assert parts.kd.item() == pytest.approx(temperature**2 * KL[temperature], abs=1e-5)
    assert parts.task.item() == pytest.approx(CE, abs=1e-6)


def test_alpha_zero_ignores_teacher():
    loss = HintonLoss(alpha=0.0, temperature=4.0)
    assert not loss.needs_teacher
    with_teacher = loss(S, Y, T_LOGITS)
    without = loss(S, Y)
    assert with_teacher.total.item() == pytest.approx(CE, abs=1e-6)
    assert without.total.item() == pytest.approx(CE, abs=1e-6)
    assert without.kd.item() == 0.0


def test_mixed_alpha_golden():
    # (1 − 0.3)·CE + 0.3·T²·KL at T = 2: 0.7·0.54394 + 0.3·4·0.33123 = 0.77824
    parts = HintonLoss(alpha=0.3, temperature=2.0)(S, Y, T_LOGITS)
    assert parts.total.item() == pytest.approx(0.7 * CE + 0.3 * 4.0 * KL[2.0], abs=1e-5)
    assert parts.total.item() == pytest.approx(0.778242, abs=1e-5)


def test_kl_is_batch_mean_not_sum():
    one = kd_kl_divergence(S[:1], T_LOGITS[:1], 2.0).item()
    two = kd_kl_divergence(S[1:], T_LOGITS[1:], 2.0).item()
    assert kd_kl_divergence(S, T_LOGITS, 2.0).item() == pytest.approx((one + two) / 2, abs=1e-7)


def test_identical_logits_have_zero_kd():
    assert kd_kl_divergence(S, S, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_gradient_scale_is_temperature_independent():
    # With the T² factor, the soft-target gradient magnitude is roughly T-independent for large T
    # (Hinton et al., §2.1): compare T = 8 and T = 16 on small logits.
    grads = []
    for temperature in (8.0, 16.0):
        s = (S * 0.1).clone().requires_grad_(True)
        HintonLoss(alpha=1.0, temperature=temperature)(s, Y, T_LOGITS * 0.1).total.backward()
        grads.append(s.grad.norm().item())
    assert grads[0] == pytest.approx(grads[1], rel=0.02)
    assert math.isfinite(grads[0]) and grads[0] > 0


@pytest.mark.parametrize("kwargs", [{"alpha": -0.1}, {"alpha": 1.5}, {"temperature": 0.0}])
def test_invalid_hyperparameters(kwargs):
    with pytest.raises(ConfigError):
        HintonLoss(**kwargs)


def test_alpha_positive_needs_teacher_logits():
    with pytest.raises(ValueError):
        HintonLoss(alpha=0.5)(S, Y)
