"""Tests for compressor/losses.py: the three losses the training loop takes, one call signature."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from compressor.kernels import tempered_kl_reference
from compressor.training.losses import DistillationLoss, HardLabelLoss, LogitMatchingLoss


def batch(rng, b=12, c=5, k=3, scale=3.0):
    """Random float64 student (B, C), teacher (K, B, C) logits and labels (B,) with a few -1."""
    s = torch.from_numpy(rng.normal(size=(b, c)) * scale)
    t = torch.from_numpy(rng.normal(size=(k, b, c)) * scale)
    y = torch.from_numpy(rng.integers(0, c, size=b))
    y[::4] = -1
    return s, t, y


def test_distillation_loss_calls_the_kernel(rng):
    s, t, y = batch(rng)
    loss = DistillationLoss(temperature=3.0, alpha=0.7, combine="geometric", weights=(0.2, 0.3, 0.5))
    want = tempered_kl_reference(s, t, y, 3.0, 0.7, torch.tensor([0.2, 0.3, 0.5]), "geometric")
    assert torch.allclose(loss(s, t, y), want, rtol=1e-12)
    default = DistillationLoss()
    assert (default.temperature, default.alpha, default.combine, default.weights, default.impl) == \
        (4.0, 0.9, "arithmetic", None, "auto")
    assert torch.allclose(default(s, t, y), tempered_kl_reference(s, t, y, 4.0, 0.9), rtol=1e-12)


def test_distillation_with_alpha_zero_is_the_hard_label_loss(rng):
    s, t, y = batch(rng)
    y = y.clamp(min=0)  # every row labeled
    assert torch.allclose(DistillationLoss(alpha=0.0)(s, t, y), HardLabelLoss()(s, t, y), rtol=1e-12)


def test_hard_label_loss_ignores_unlabeled_rows(rng):
    s, t, y = batch(rng)
    keep = y >= 0
    want = F.cross_entropy(s[keep], y[keep])
    assert torch.allclose(HardLabelLoss()(s, None, y), want, rtol=1e-12)
    assert torch.allclose(HardLabelLoss()(s, t, y), want, rtol=1e-12)  # teacher logits are not used


def test_hard_label_loss_with_no_labels_is_zero_with_a_gradient(rng):
    s = torch.randn(6, 4, requires_grad=True)
    loss = HardLabelLoss()(s, None, torch.full((6,), -1))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(6, 4))


def test_logit_matching_is_half_mse_of_centred_logits(rng):
    s, t, y = batch(rng)
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    mean_t = (w[:, None, None] * t).sum(dim=0)  # (B, C)
    want = 0.5 * ((s - s.mean(1, keepdim=True)) - (mean_t - mean_t.mean(1, keepdim=True))).pow(2).mean()
    loss = LogitMatchingLoss(weights=(2.0, 1.0, 1.0))
    assert torch.allclose(loss(s, t, y), want, rtol=1e-12)
    # a per-row shift of either side's logits changes nothing (softmax ignores it too)
    shift = torch.from_numpy(rng.normal(size=(12, 1)) * 10)
    assert torch.allclose(loss(s + shift, t - 2 * shift, y), want, rtol=1e-10)
    assert float(LogitMatchingLoss()(t[0], t[:1], None)) == pytest.approx(0.0, abs=1e-14)


def test_logit_matching_gradient_is_the_high_temperature_limit_of_distillation(rng):
    """Paper §2.1: as T grows, the T²-scaled KL term's gradient tends to logit matching's, (s̃ − t̃) / (B C)."""
    s, t, y = batch(rng, k=1, scale=1.0)

    def grad(loss_fn):
        s_ = s.clone().requires_grad_()
        loss_fn(s_, t, y).backward()
        return s_.grad

    matching = grad(LogitMatchingLoss())
    err = [float((grad(DistillationLoss(temperature=T, alpha=1.0)) - matching).norm() / matching.norm())
           for T in (10.0, 1000.0)]
    assert err[1] < err[0] / 50 and err[1] < 1e-2  # the gap is O(1/T)


@pytest.mark.parametrize("loss_fn", [DistillationLoss(), HardLabelLoss(), LogitMatchingLoss()],
                         ids=["distillation", "hard-label", "logit-matching"])
def test_every_loss_takes_the_training_loop_call(rng, loss_fn):
    s, t, y = batch(rng, b=8, c=10, k=2)
    s = s.float().requires_grad_()
    loss = loss_fn(s, t.float(), y)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad.shape == (8, 10) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss_fn.impl = "reference"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "temperature"), (dict(temperature=-2.0), "temperature"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=-0.1), "alpha"), (dict(combine="median"), "'arithmetic', 'geometric'"),
    (dict(impl="cuda"), "'auto', 'reference'"), (dict(weights=(1.0, -1.0)), "weights"),
    (dict(weights=(0.0, 0.0)), "weights"),
])
def test_distillation_loss_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


def test_bad_calls_raise(rng):
    s, t, y = batch(rng, b=4, c=5, k=2)
    with pytest.raises(ValueError, match="teacher logits"):
        DistillationLoss()(s, None, y)
    with pytest.raises(ValueError, match="teacher logits"):
        LogitMatchingLoss()(s, None, y)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(2, 4, 4\)"):
        LogitMatchingLoss()(s, t[..., :4], y)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        DistillationLoss(weights=(1.0, 1.0, 1.0))(s, t, y)  # 3 weights, 2 members
    with pytest.raises(ValueError, match=r"\[-1, 5\)"):
        HardLabelLoss()(s, None, torch.tensor([0, 5, 1, 2]))
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(3,\)"):
        HardLabelLoss()(s, None, y[:3])
    with pytest.raises(ValueError, match="weights"):
        LogitMatchingLoss(weights=(float("nan"), 1.0))
