"""The soft-target variants of the reference (dkd, ls, dist), each checked in float64 against a second, independent
formulation: an identity with Hinton's KL, the KD loss on inputs standardised by hand, numpy's correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.kernels.tempered_kl_reference import VARIANTS, tempered_kl_reference

T = 3.0


def _inputs(n: int = 41, c: int = 13, k: int = 3, seed: int = 0, unlabeled: bool = True):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(k, n, c, generator=g, dtype=torch.float64) * 4
    y = torch.randint(0, c, (n,), generator=g)
    if unlabeled:
        y[::4] = -1
    return s, t, y


def test_dkd_with_beta_one_minus_target_mass_is_hinton_kd():
    # KL(p ‖ q) = KL(b_p ‖ b_q) + (1 − p_t) · KL(p̃ ‖ q̃) (Zhao et al. 2022, eq. 3): one row at a time
    s, t, y = _inputs(n=6, unlabeled=False)
    for row in range(6):
        p = torch.softmax(t[:, row] / T, dim=-1).mean(dim=0)
        beta = float(1 - p[y[row]])
        args = (s[row:row + 1], t[:, row:row + 1], y[row:row + 1], T, 1.0)
        kd = tempered_kl_reference(*args)
        dkd = tempered_kl_reference(*args, variant="dkd", beta=beta)
        assert torch.allclose(dkd, kd, rtol=1e-10, atol=1e-12), row


def test_dkd_takes_the_teachers_argmax_as_target_where_a_row_is_unlabeled():
    s, t, y = _inputs(n=5, unlabeled=False)
    argmax = torch.log_softmax(t / T, dim=-1).exp().mean(0).argmax(-1)
    unlabeled = torch.full_like(y, -1)
    a = tempered_kl_reference(s, t, unlabeled, T, 1.0, variant="dkd")
    b = tempered_kl_reference(s, t, argmax, T, 1.0, variant="dkd")
    assert torch.allclose(a, b, rtol=1e-12)
    assert not torch.allclose(a, tempered_kl_reference(s, t, (argmax + 1) % s.shape[1], T, 1.0, variant="dkd"))


def test_ls_is_kd_on_logits_standardised_by_hand_with_the_hard_term_on_raw_logits():
    s, t, y = _inputs()
    std = lambda z: (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)  # noqa: E731
    soft = tempered_kl_reference(std(s), std(t), None, T, 1.0)
    hard = torch.nn.functional.cross_entropy(s, y, ignore_index=-1, reduction="sum") / len(y)
    expected = 0.7 * soft + 0.3 * hard
    assert torch.allclose(tempered_kl_reference(s, t, y, T, 0.7, variant="ls"), expected, rtol=1e-10)


def test_ls_does_not_move_when_every_logit_is_shifted_and_scaled():
    s, t, y = _inputs()
    a = tempered_kl_reference(s, t, None, T, 1.0, variant="ls")
    b = tempered_kl_reference(s * 5 + 2, t * 0.5 - 3, None, T, 1.0, variant="ls")
    assert torch.allclose(a, b, rtol=1e-6)


def test_dist_matches_numpys_correlations_row_by_row_and_class_by_class():
    s, t, y = _inputs(n=9, c=7)
    p = torch.softmax(t / T, dim=-1).mean(0).numpy()
    q = torch.softmax(s.detach() / T, dim=-1).numpy()
    inter = np.mean([np.corrcoef(p[i], q[i])[0, 1] for i in range(len(p))])
    intra = np.mean([np.corrcoef(p[:, c], q[:, c])[0, 1] for c in range(p.shape[1])])
    expected = T * T * ((1 - inter) + (1 - intra))
    got = tempered_kl_reference(s, t, y, T, 1.0, variant="dist")
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_dist_is_zero_when_the_student_is_the_only_teacher():
    s, _, y = _inputs(n=8, c=5)
    loss = tempered_kl_reference(s, s.detach()[None], y, T, 1.0, variant="dist")
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_finite_and_differentiable_on_odd_shapes_with_weights(variant):
    s, t, y = _inputs(n=41, c=1271, k=3)
    loss = tempered_kl_reference(s, t, y, T, 0.6, weights=[0.2, 0.0, 0.8], variant=variant, beta=8.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    small = s.detach()[:5, :7].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: tempered_kl_reference(x, t[:, :5, :7], y[:5].clamp(max=6), T, 0.6,
                                                                    variant=variant), (small,))


@pytest.mark.parametrize("variant", ["dkd", "ls", "dist"])
def test_alpha_zero_leaves_the_labels_alone_in_every_variant(variant):
    s, t, y = _inputs()
    assert torch.allclose(tempered_kl_reference(s, t, y, T, 0.0, variant=variant),
                          tempered_kl_reference(s, t, y, T, 0.0), rtol=1e-12)


def test_a_row_whose_teachers_put_all_mass_on_the_target_has_no_non_target_term():
    s = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[[-torch.inf, 5.0, -torch.inf], [1.0, 2.0, 3.0]]], dtype=torch.float64)
    loss = tempered_kl_reference(s, t, torch.tensor([1, 2]), T, 1.0, variant="dkd", beta=8.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_an_unknown_variant_or_a_negative_beta_is_refused():
    s, t, y = _inputs(n=2, c=3)
    with pytest.raises(ValueError, match="variant='crd' is not one of"):
        tempered_kl_reference(s, t, y, T, 0.5, variant="crd")
    with pytest.raises(ValueError, match="beta=-1"):
        tempered_kl_reference(s, t, y, T, 0.5, variant="dkd", beta=-1.0)
