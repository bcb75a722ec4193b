"""Tests for compressor/kernels/tempered_kl_reference.py and the entry point compressor/kernels/__init__.py.

The oracle here is written out independently in float64 numpy, row by row, from the paper's formula;
it does not call the module's helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.kernels import (AUTO_CPU_MIN_ELEMENTS, IMPLS, ensemble_log_probs, resolve_impl, tempered_kl,
                                tempered_kl_reference)


# ---------------------------------------------------------------------------------------------- the oracle

def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def oracle_loss(s, t, y, temperature, alpha, weights, combine) -> float:
    """mean_n [ alpha T² Σ_c p_c (log p_c − log q_c) + (1 − alpha) (−log softmax(s_n)[y_n] if y_n >= 0) ]."""
    k_members, n_rows, _ = t.shape
    w = np.full(k_members, 1.0 / k_members) if weights is None else np.asarray(weights, float) / np.sum(weights)
    total = 0.0
    for n in range(n_rows):
        if combine == "arithmetic":
            p = sum(w[k] * np.exp(np_log_softmax(t[k, n] / temperature)) for k in range(k_members))
        else:
            p = np.exp(np_log_softmax(sum(w[k] * t[k, n] for k in range(k_members)) / temperature))
        log_q = np_log_softmax(s[n] / temperature)
        kl = sum(p[c] * (np.log(p[c]) - log_q[c]) for c in range(len(p)) if p[c] > 0)
        hard = -np_log_softmax(s[n])[y[n]] if y[n] >= 0 else 0.0
        total += alpha * temperature**2 * kl + (1 - alpha) * hard
    return total / n_rows


def random_case(rng, n, c, k, scale=1.0):
    s = rng.normal(size=(n, c)) * scale  # (N, C)
    t = rng.normal(size=(k, n, c)) * scale  # (K, N, C)
    y = rng.integers(-1, c, size=n)  # (N,)
    y[0] = -1  # at least one unlabeled row
    if n > 1:
        y[1] = c - 1  # and at least one labeled one
    return s, t, y


def as_torch(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# ------------------------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_matches_independent_float64_formula(rng, combine, k, temperature):
    for n, c in [(1, 2), (4, 1), (7, 3), (33, 11)]:
        for scale in (1.0, 100.0):
            s, t, y = random_case(rng, n, c, k, scale)
            for alpha in (0.0, 0.5, 1.0):
                for weights in (None, rng.uniform(0.1, 2.0, size=k)):
                    st, tt, yt = as_torch(s, t, y)
                    wt = None if weights is None else torch.from_numpy(weights)
                    got = tempered_kl_reference(st, tt, yt, temperature, alpha, wt, combine)
                    want = oracle_loss(s, t, y, temperature, alpha, weights, combine)
                    assert got.dtype == torch.float64 and got.ndim == 0
                    assert torch.isfinite(got)
                    assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-9 * scale), \
                        f"N={n} C={c} K={k} T={temperature} alpha={alpha} scale={scale} weights={weights}"


def test_labels_none_means_every_row_unlabeled(rng):
    s, t, y = random_case(rng, 9, 5, 3)
    st, tt, _ = as_torch(s, t, y)
    got = tempered_kl_reference(st, tt, None, 3.0, 0.4)
    want = oracle_loss(s, t, np.full(9, -1), 3.0, 0.4, None, "arithmetic")
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_odd_shape_float32_agrees_with_float64(rng):
    s, t, y = random_case(rng, 41, 1271, 3, scale=5.0)
    s64, t64, y64 = as_torch(s, t, y)
    loss64 = tempered_kl_reference(s64, t64, y64, 2.0, 0.7)
    loss32 = tempered_kl_reference(s64.float(), t64.float(), y64, 2.0, 0.7)
    assert loss32.dtype == torch.float32
    assert float(loss32) == pytest.approx(float(loss64), rel=1e-5)
    assert float(loss64) == pytest.approx(oracle_loss(s, t, y, 2.0, 0.7, None, "arithmetic"), rel=1e-9)


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_logits_times_100_stay_finite_in_float32(rng, combine):
    s, t, y = random_case(rng, 16, 10, 3, scale=100.0)
    st, tt, yt = as_torch(s, t, y)
    st, tt = st.float().requires_grad_(), tt.float().requires_grad_()
    loss = tempered_kl_reference(st, tt, yt, 1.0, 0.5, combine=combine)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(st.grad).all() and torch.isfinite(tt.grad).all()
    want = oracle_loss(s, t, y, 1.0, 0.5, None, combine)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)


def test_zero_teacher_probability_counts_as_zero(rng):
    """0 · log 0 = 0: a class the teacher rules out (logit -inf) adds nothing, and gradients stay finite."""
    s = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 4, 6, dtype=torch.float64)
    t[0, :, 2] = -float("inf")
    loss = tempered_kl_reference(s, t, None, 2.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    t_np = t.numpy().copy()
    assert float(loss.detach()) == pytest.approx(oracle_loss(s.detach().numpy(), t_np, np.full(4, -1), 2.0, 1.0, None,
                                                    "arithmetic"), rel=1e-10)


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_gradcheck_student_and_teacher(rng, combine):
    s, t, y = random_case(rng, 5, 4, 3, scale=2.0)
    st, tt, yt = as_torch(s, t, y)
    st.requires_grad_()
    tt.requires_grad_()
    weights = torch.from_numpy(rng.uniform(0.2, 1.0, size=3))
    assert torch.autograd.gradcheck(
        lambda a, b: tempered_kl_reference(a, b, yt, 2.5, 0.6, weights, combine), (st, tt))
    assert torch.autograd.gradgradcheck(
        lambda a: tempered_kl_reference(a, tt.detach(), yt, 2.5, 0.6, weights, combine), (st,))


def test_high_temperature_gradient_approaches_logit_matching(rng):
    """d/ds [T² KL(p_T ‖ q_T)] = T (q − p) → (s − t) / C per row as T grows, for zero-mean logits (paper §2.1)."""
    n, c = 6, 7
    s = torch.from_numpy(rng.normal(size=(n, c)))
    t = torch.from_numpy(rng.normal(size=(1, n, c)))
    s, t = s - s.mean(dim=1, keepdim=True), t - t.mean(dim=2, keepdim=True)
    limit = (s - t[0]) / (n * c)  # the loss is a mean over n rows

    def relative_error(temperature):
        s_ = s.clone().requires_grad_()
        tempered_kl_reference(s_, t, None, temperature, 1.0).backward()
        return float((s_.grad - limit).norm() / limit.norm())

    err_10, err_1000 = relative_error(10.0), relative_error(1000.0)
    assert err_1000 < err_10 / 50  # the error is O(1/T)
    assert err_1000 < 1e-2


# ------------------------------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_identical_teachers_equal_one_teacher(rng, combine):
    s, t, y = as_torch(*random_case(rng, 8, 5, 1))
    many = t.expand(4, -1, -1).contiguous()
    weights = torch.from_numpy(rng.uniform(0.1, 1.0, size=4))
    one = tempered_kl_reference(s, t, y, 3.0, 0.5, combine=combine)
    assert torch.allclose(tempered_kl_reference(s, many, y, 3.0, 0.5, combine=combine), one, rtol=1e-12)
    assert torch.allclose(tempered_kl_reference(s, many, y, 3.0, 0.5, weights, combine), one, rtol=1e-12)


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_weights_one_zero_select_first_teacher(rng, combine):
    s, t, y = as_torch(*random_case(rng, 8, 5, 2))
    first = tempered_kl_reference(s, t[:1], y, 2.0, 0.8, combine=combine)
    picked = tempered_kl_reference(s, t, y, 2.0, 0.8, torch.tensor([1.0, 0.0], dtype=torch.float64), combine)
    assert torch.allclose(picked, first, rtol=1e-12)
    # and weights are normalised: (3, 0) is the same as (1, 0)
    assert torch.allclose(tempered_kl_reference(s, t, y, 2.0, 0.8, [3.0, 0.0], combine), first, rtol=1e-12)


def test_soft_term_is_nonnegative_and_zero_when_student_matches(rng):
    for _ in range(20):
        s, t, y = as_torch(*random_case(rng, 6, 4, 3, scale=rng.uniform(0.1, 30.0)))
        assert float(tempered_kl_reference(s, t, y, float(rng.uniform(0.5, 10.0)), 1.0)) >= 0.0
    assert float(tempered_kl_reference(s, t[:1], y, 3.0, 1.0, combine="geometric")) >= 0.0
    assert float(tempered_kl_reference(t[0], t[:1], y, 3.0, 1.0)) == pytest.approx(0.0, abs=1e-12)


def test_unlabeled_rows_have_no_hard_term_but_count_in_the_mean(rng):
    s, t, y = as_torch(*random_case(rng, 10, 6, 2))
    labeled = y >= 0
    hard_sum = torch.nn.functional.cross_entropy(s[labeled], y[labeled], reduction="sum")
    assert torch.allclose(tempered_kl_reference(s, t, y, 2.0, 0.0), hard_sum / 10, rtol=1e-12)
    assert float(tempered_kl_reference(s, t, torch.full((10,), -1), 2.0, 0.0)) == 0.0


def test_ensemble_log_probs_is_a_distribution(rng):
    t = torch.from_numpy(rng.normal(size=(3, 5, 7)) * 50)
    for combine in ("arithmetic", "geometric"):
        log_p = ensemble_log_probs(t, 2.0, None, combine)
        assert log_p.shape == (5, 7)
        assert torch.allclose(log_p.exp().sum(dim=1), torch.ones(5, dtype=torch.float64))
    # one member: both combines are that member's tempered log-softmax
    for combine in ("arithmetic", "geometric"):
        assert torch.allclose(ensemble_log_probs(t[:1], 2.0, None, combine), torch.log_softmax(t[0] / 2.0, dim=1))


# ---------------------------------------------------------------------------------------------- bad input

def test_shape_errors_name_the_shapes():
    s, t, y = torch.zeros(4, 5), torch.zeros(2, 4, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(2, 4, 6\)"):
        tempered_kl_reference(s, t, y, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(2, 3, 5\).*\(4,\)"):
        tempered_kl_reference(s, torch.zeros(2, 3, 5), y, 2.0, 0.5)
    with pytest.raises(ValueError, match=r"labels \(3,\)"):
        tempered_kl_reference(s, torch.zeros(2, 4, 5), y[:3], 2.0, 0.5)
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        tempered_kl_reference(s, torch.zeros(4, 5), y, 2.0, 0.5)  # teacher without its K axis
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        ensemble_log_probs(torch.zeros(4, 5), 2.0)


def test_bad_arguments_raise():
    s, t, y = torch.zeros(4, 5), torch.zeros(2, 4, 5), torch.tensor([0, 1, -1, 4])
    for bad_temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            tempered_kl_reference(s, t, y, bad_temperature, 0.5)
    for bad_alpha in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            tempered_kl_reference(s, t, y, 2.0, bad_alpha)
    for bad_labels in (torch.tensor([0, 1, -2, 4]), torch.tensor([0, 1, 5, 4])):
        with pytest.raises(ValueError, match=r"\[-1, 5\)"):
            tempered_kl_reference(s, t, bad_labels, 2.0, 0.5)
    with pytest.raises(ValueError, match="dtype"):
        tempered_kl_reference(s, t, y.float(), 2.0, 0.5)
    with pytest.raises(ValueError, match="'arithmetic', 'geometric'"):
        tempered_kl_reference(s, t, y, 2.0, 0.5, combine="harmonic")


@pytest.mark.parametrize("weights, message", [
    ([1.0, -0.5], ">= 0"), ([1.0, float("nan")], ">= 0"), ([0.0, 0.0], "positive"), ([1.0, 1.0, 1.0], r"\(2,\)"),
])
def test_bad_weights_raise(weights, message):
    with pytest.raises(ValueError, match=message):
        ensemble_log_probs(torch.zeros(2, 4, 5), 2.0, torch.tensor(weights))


# ---------------------------------------------------------------------------------------------- entry point

def test_auto_resolves_once_per_device_and_every_impl_matches_the_reference(rng):
    assert IMPLS == ("auto", "reference", "cpu", "triton")
    assert resolve_impl("auto", torch.device("cpu")) == "cpu"
    assert resolve_impl("auto", "cpu", elements=AUTO_CPU_MIN_ELEMENTS) == "cpu"
    assert resolve_impl("auto", "cpu", elements=128 * 10 * 3) == "reference"  # a training batch: set-up dominates
    assert resolve_impl("auto", "cpu", teacher_requires_grad=True) == "reference"  # fused paths: student grad only
    assert resolve_impl("auto", "meta") == "reference"
    assert resolve_impl("reference", "cpu") == "reference"
    s, t, y = as_torch(*random_case(rng, 6, 4, 2))
    want = tempered_kl_reference(s, t, y, 4.0, 0.9, [0.3, 0.7], "geometric")
    assert torch.equal(tempered_kl(s, t, y, 4.0, 0.9, [0.3, 0.7], "geometric", impl="reference"), want)
    for impl in ("auto", "cpu"):
        got = tempered_kl(s, t, y, 4.0, 0.9, [0.3, 0.7], "geometric", impl=impl)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_unknown_impl_raises_naming_the_choices():
    with pytest.raises(ValueError, match="'auto', 'reference', 'cpu', 'triton'"):
        resolve_impl("fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="'auto', 'reference'"):
        tempered_kl(torch.zeros(2, 3), torch.zeros(1, 2, 3), None, 2.0, 0.5, impl="fast")
