"""Tests for compressor/specialists.py: the specialist ensembles of Hinton et al. 2015 §5 (subsets, the dustbin
correction, the two specialist forms and the per-input combination of generalist and specialists)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits
from torch import nn

from compressor.core.errors import CompressorError
from compressor.teachers.specialists import (
    ExpandedSpecialist,
    Specialist,
    check_metadata,
    dustbin_shift,
    find_subsets,
    parse_subsets,
    prediction_covariance,
    specialist_log_probs,
)

C = 10
TWO = [(0, 2, 4, 6), (5, 7, 9)]
THREE = [(0, 2, 4), (5, 7), (1, 8, 9)]
NAMES = ["ant", "Bee", "cat", "dog", "eel"]


def members(subsets, n=32, c=C, scale=3.0, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Random member logits (1 + M, n, c): a generalist then M specialists in expanded form (the logits of the
    classes outside a specialist's subset are free, so their softmax mass is its dustbin probability)."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(1 + len(subsets), n, c, generator=g, dtype=torch.float64)).to(dtype)


def outside_all(subsets, c=C) -> list[int]:
    """The classes in no subset."""
    inside = {k for s in subsets for k in s}
    return [k for k in range(c) if k not in inside]


def is_active(generalist_logits: np.ndarray, subset, top_n: int) -> bool:
    """Whether a specialist is active for one row: its subset holds one of the generalist's top-n classes."""
    top = np.argsort(-generalist_logits, kind="stable")[:top_n]
    return bool(set(top.tolist()) & set(subset))


def objective_parts(logits: np.ndarray, subsets, top_n: int):
    """For one row, logits (1 + M, C) in float64 → p_g (C,) and, per active specialist, (in-subset mask, p_m)."""
    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    p_g = softmax(logits[0])
    parts = []
    for m, subset in enumerate(subsets):
        if is_active(logits[0], subset, top_n):
            mask = np.zeros(logits.shape[1], dtype=bool)
            mask[list(subset)] = True
            parts.append((mask, softmax(logits[1 + m])))
    return p_g, parts


def objective(z: np.ndarray, p_g: np.ndarray, parts) -> tuple[float, np.ndarray]:
    """F(q) = KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m) for q = softmax(z), and its gradient with respect to z."""
    log_q = z - np.logaddexp.reduce(z)
    q = np.exp(log_q)

    def xlogx_over(p, log_p_over):  # Σ p (log p − log r), with 0 log 0 = 0
        keep = p > 0
        return float(np.sum(p[keep] * (np.log(p[keep]) - log_p_over[keep])))

    value = xlogx_over(p_g, log_q)
    grad_log_q = -p_g.copy()  # dF / d log q_c
    for mask, p_m in parts:
        log_outside = np.logaddexp.reduce(log_q[~mask])
        dustbin = p_m[~mask].sum()
        value += xlogx_over(p_m[mask], log_q[mask])
        if dustbin > 0:
            value += dustbin * (math.log(dustbin) - log_outside)
        grad_log_q[mask] -= p_m[mask]
        grad_log_q[~mask] -= dustbin * np.exp(log_q[~mask] - log_outside)
    grad_z = grad_log_q - q * grad_log_q.sum()  # log q = z − logsumexp(z)
    return value, grad_z


def scipy_solution(logits: np.ndarray, subsets, top_n: int) -> tuple[np.ndarray, float, tuple]:
    """The optimum q of one row (float64) by L-BFGS-B on free logits, from a uniform start, with the gradient."""
    p_g, parts = objective_parts(logits, subsets, top_n)
    with threadpool_limits(limits=1, user_api="blas"):  # threaded BLAS on 10-vectors is 70x slower on a busy machine
        result = minimize(objective, np.zeros(logits.shape[1]), args=(p_g, parts), jac=True, method="L-BFGS-B",
                          options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 20000, "maxcor": 30})
    z = result.x
    return np.exp(z - np.logaddexp.reduce(z)), float(result.fun), (p_g, parts)


# ------------------------------------------------------------------------------------------------------------------
# specialist_log_probs


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("top_n", [1, 2, 3])
@pytest.mark.parametrize("scale", [3.0, 50.0])
def test_the_combination_is_a_distribution(dtype, atol, top_n, scale):
    """exp(log q) sums to 1 with nothing NaN or infinite, for ordinary and extreme logits and a certain generalist."""
    x = members(TWO, n=64, scale=scale, seed=1, dtype=dtype)
    certain = x.clone()
    certain[0, :, :] = 0.0
    certain[0, torch.arange(64), torch.arange(64) % C] = 100.0  # the generalist is sure, of each class in turn
    for logits in (x, certain):
        out = specialist_log_probs(logits, TWO, top_n=top_n)
        assert out.shape == (64, C) and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert torch.allclose(out.exp().sum(dim=1), torch.ones(64, dtype=dtype), rtol=0, atol=atol)


@pytest.mark.parametrize("top_n", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_with_no_active_specialist_get_the_generalist_exactly(top_n, dtype):
    """A row whose generalist top-n classes lie outside every subset gets log_softmax of the generalist, bit for bit;
    the other rows in the same batch do not."""
    x = members(TWO, n=16, seed=2, dtype=dtype)
    free = outside_all(TWO)  # [1, 3, 8]
    x[0, :8, free[0]] += 20.0  # rows 0-7: top-1 is class 1 and top-2 is class 1 and class 3
    x[0, :8, free[1]] += 19.0
    x[0, 8:, 0] += 20.0  # rows 8-15: class 0's specialist is active
    out = specialist_log_probs(x, TWO, top_n=top_n)
    generalist = F.log_softmax(x[0], dim=-1)
    assert torch.equal(out[:8], generalist[:8])
    assert not torch.allclose(out[8:], generalist[8:], atol=1e-3)


def test_no_subsets_give_the_generalist_exactly():
    """With no specialists, the (1, N, C) input comes back as the generalist's log-probabilities."""
    x = members([], n=8, seed=3)
    assert torch.equal(specialist_log_probs(x, []), F.log_softmax(x[0], dim=-1))


@pytest.mark.parametrize("subsets", [TWO, THREE], ids=["two", "three"])
@pytest.mark.parametrize("top_n", [1, 2])
def test_the_combination_solves_its_objective(subsets, top_n):
    """Per row, the module's q is the minimiser of KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m) that an independent
    float64 optimiser (L-BFGS-B with the analytic gradient) finds: no worse objective and the same q to 1e-4."""
    x = members(subsets, n=32, seed=4, dtype=torch.float64)
    q_module = specialist_log_probs(x, subsets, top_n=top_n).exp().numpy()
    logits = x.numpy()
    checked = 0
    for n in range(x.shape[1]):
        q_scipy, f_scipy, (p_g, parts) = scipy_solution(logits[:, n], subsets, top_n)
        f_module, _ = objective(np.log(q_module[n]), p_g, parts)
        assert f_module <= f_scipy + 1e-9, (n, f_module, f_scipy)
        assert np.abs(q_module[n] - q_scipy).max() < 1e-4, (n, q_module[n], q_scipy)
        checked += len(parts) > 0
    assert checked >= 16  # most rows do combine specialists (top_n 2 activates two of them in many)


def test_the_objective_gradient_is_right():
    """The oracle's analytic gradient matches central finite differences (so the oracle is trustworthy)."""
    x = members(THREE, n=4, seed=5, dtype=torch.float64).numpy()
    p_g, parts = objective_parts(x[:, 0], THREE, 3)
    assert len(parts) >= 1
    z = np.random.default_rng(0).normal(size=C)
    _, grad = objective(z, p_g, parts)
    h = 1e-6
    numeric = np.array([(objective(z + h * e, p_g, parts)[0] - objective(z - h * e, p_g, parts)[0]) / (2 * h)
                        for e in np.eye(C)])
    assert np.allclose(grad, numeric, atol=1e-7)


def one_active(gap: float, dtype, n: int = 40, seed: int = 6) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Member logits for TWO where row n's generalist top-1 class is in TWO[n % 2], ``gap`` above its runner-up, so
    with top_n = 1 exactly one specialist is active per row; and each row's subset."""
    x = members(TWO, n=n, seed=seed, dtype=torch.float64)
    subset_of_row = [TWO[k % 2] for k in range(n)]
    for k, subset in enumerate(subset_of_row):
        x[0, k, subset[k % len(subset)]] = x[0, k].max() + gap
    return x.to(dtype), subset_of_row


def closed_form(x: torch.Tensor, subset_of_row) -> torch.Tensor:
    """The optimum with one active specialist, in float64: S's classes get (p_g + p_m)/2 and the others p_g scaled to
    hold (Σ_{c∉S} p_g + p_m(dustbin)) / 2."""
    p_g = F.softmax(x[0].double(), dim=-1)
    want = torch.empty_like(p_g)
    for n, subset in enumerate(subset_of_row):
        p_m = F.softmax(x[1 + TWO.index(subset), n].double(), dim=-1)
        inside = torch.zeros(x.shape[-1], dtype=torch.bool)
        inside[list(subset)] = True
        g_out, dustbin = p_g[n, ~inside].sum(), p_m[~inside].sum()
        want[n, inside] = (p_g[n, inside] + p_m[inside]) / 2
        want[n, ~inside] = p_g[n, ~inside] * (g_out + dustbin) / (2 * g_out)
    return want


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_one_active_specialist_gives_the_closed_form(dtype, tol):
    """With one active specialist, S_m's classes get (p_g + p_m)/2 and the rest p_g scaled to hold
    (Σ_{c∉S} p_g + p_m(dustbin)) / 2."""
    x, subset_of_row = one_active(1.0, dtype)
    out = specialist_log_probs(x, TWO, top_n=1).exp()
    assert torch.allclose(out.double(), closed_form(x, subset_of_row), rtol=tol, atol=tol)


def test_one_active_specialist_with_a_confident_float32_generalist_gives_the_closed_form():
    """A confident generalist (top-1 logit 12 above the rest): the dustbin is still shared in proportion to p_g on
    the classes outside S, so q is the closed form to 1e-3 in probability."""
    x, subset_of_row = one_active(12.0, torch.float32)
    out = specialist_log_probs(x, TWO, top_n=1).exp()
    assert (out.double() - closed_form(x, subset_of_row)).abs().max() < 1e-3


def test_the_combination_is_deterministic_and_row_independent():
    """Two calls agree bit for bit, and a row's result is the same in a batch as alone."""
    x = members(THREE, n=24, seed=7)
    first = specialist_log_probs(x, THREE, top_n=2)
    assert torch.equal(first, specialist_log_probs(x, THREE, top_n=2))
    alone = torch.cat([specialist_log_probs(x[:, n:n + 1], THREE, top_n=2) for n in range(24)])
    assert torch.allclose(first, alone, rtol=1e-6, atol=1e-6)
    reversed_rows = specialist_log_probs(x.flip(1), THREE, top_n=2).flip(0)
    assert torch.allclose(first, reversed_rows, rtol=1e-6, atol=1e-6)


class Combine(nn.Module):
    """Stacked member logits → the specialist combination, as an ensemble's forward would call it."""

    def forward(self, generalist: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return specialist_log_probs(torch.stack([generalist, first, second]), TWO, top_n=2)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape check is a constant of the trace
def test_the_combination_traces():
    """torch.jit.trace records the fixed number of steps; the traced module agrees with eager on new inputs."""
    example = members(TWO, n=6, seed=8)
    traced = torch.jit.trace(Combine(), tuple(example), check_trace=False)
    for seed in (9, 10):
        fresh = members(TWO, n=11, seed=seed)
        assert torch.allclose(traced(*fresh), Combine()(*fresh), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape, subsets", [
    ((2, 4, C), TWO),  # one specialist short
    ((4, 4, C), TWO),  # one too many
    ((3, 4, C), []),  # specialists with no subsets
    ((4, C), TWO[:1]),  # no member dimension
])
def test_member_logits_of_the_wrong_shape_are_refused(shape, subsets):
    """The first dimension must be 1 + len(subsets) and the input three-dimensional."""
    with pytest.raises(ValueError, match="expected"):
        specialist_log_probs(torch.zeros(shape), subsets)


# ------------------------------------------------------------------------------------------------------------------
# Specialist and ExpandedSpecialist


def specialist_pair(shift: float, seed: int = 11) -> tuple[nn.Linear, Specialist, ExpandedSpecialist]:
    """A Linear(4 → 6) base, its specialist on classes (1, 3) and the expanded form."""
    torch.manual_seed(seed)
    base = nn.Linear(4, 6)
    specialist = Specialist(base, (1, 3), 6, shift=shift)
    return base, specialist, ExpandedSpecialist(specialist, 6)


@pytest.mark.parametrize("shift", [0.0, 1.7, -0.6])
def test_specialist_reads_the_subset_and_a_dustbin(shift):
    """(N, 3): the subset's logits, then logsumexp of the other classes' logits plus the shift."""
    base, specialist, _ = specialist_pair(shift)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        z, out = base(x), specialist(x)
    assert out.shape == (9, 3)
    assert torch.equal(out[:, :2], z[:, [1, 3]])
    assert torch.allclose(out[:, 2], torch.logsumexp(z[:, [0, 2, 4, 5]], dim=1) + shift, atol=1e-6)


@pytest.mark.parametrize("shift", [0.0, 1.7])
def test_expanded_specialist_shares_the_dustbin_evenly(shift):
    """(N, C) whose softmax is the specialist's on the subset, and whose outside classes share its dustbin evenly."""
    _, specialist, expanded = specialist_pair(shift)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        p, wide = F.softmax(specialist(x), dim=1), F.softmax(expanded(x), dim=1)
    assert wide.shape == (9, 6)
    assert torch.allclose(wide[:, [1, 3]], p[:, :2], atol=1e-6)
    outside = wide[:, [0, 2, 4, 5]]
    assert torch.allclose(outside.sum(dim=1), p[:, 2], atol=1e-6)
    assert torch.allclose(outside, p[:, 2:] / 4, atol=1e-6)


def test_with_no_shift_a_specialist_predicts_what_its_base_does_with_the_rest_merged():
    """Shift 0: the specialist's softmax is the base's softmax over (1, 3, everything else)."""
    base, specialist, _ = specialist_pair(0.0)
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        p_base, p = F.softmax(base(x), dim=1), F.softmax(specialist(x), dim=1)
    merged = torch.stack([p_base[:, 1], p_base[:, 3], p_base[:, [0, 2, 4, 5]].sum(dim=1)], dim=1)
    assert torch.allclose(p, merged, atol=1e-6)


def test_both_specialist_forms_script():
    """torch.jit.script compiles both forms and the scripted modules give the eager outputs."""
    _, specialist, expanded = specialist_pair(0.9)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        for module in (specialist, expanded):
            scripted = torch.jit.script(module)
            assert torch.allclose(scripted(x), module(x), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# dustbin_shift


@pytest.mark.parametrize("f", [0.01, 0.2, 0.5, 0.9])
def test_dustbin_shift_at_half_is_the_log_odds_of_the_dustbin(f):
    """For t = ½, the shift is log((1 − f) / f); no shift when the subset already made half the rows."""
    assert dustbin_shift(f) == pytest.approx(math.log((1 - f) / f), abs=1e-12)
    assert dustbin_shift(f, 0.5) == pytest.approx(dustbin_shift(f), abs=1e-12)
    assert dustbin_shift(0.5) == pytest.approx(0.0, abs=1e-12)


def test_dustbin_shift_for_rare_subsets_is_the_papers_form_plus_log_two():
    """As f → 0 the shift tends to log(1 / f), within 1% at f = 0.001: the paper's log(½ / f) (the subset's
    oversampling) plus log 2 (the dustbin's undersampling from 1 − f to ½); so its relative gap to the paper's form
    shrinks with f but is still about 11% at f = 0.001."""
    f = 0.001
    assert abs(dustbin_shift(f) - math.log(1 / f)) / math.log(1 / f) < 0.01
    assert dustbin_shift(f) - math.log(0.5 / f) == pytest.approx(math.log(2 * (1 - f)), abs=1e-12)
    assert dustbin_shift(f) - math.log(0.5 / f) == pytest.approx(math.log(2), abs=2e-3)
    gaps = [abs(dustbin_shift(f) - math.log(0.5 / f)) / math.log(0.5 / f) for f in (0.1, 0.01, 0.001, 1e-6)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.06


@pytest.mark.parametrize("f, t", [(0.0, 0.5), (1.0, 0.5), (0.3, 0.0), (0.3, 1.0), (-0.1, 0.5)])
def test_dustbin_shift_refuses_fractions_outside_zero_one(f, t):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dustbin_shift(f, t)


def test_the_dustbin_shift_calibrates_an_oversampled_specialist():
    """A model that is the exact Bayes posterior under training priors with the subset oversampled to half the rows,
    read as a Specialist with dustbin_shift(f), predicts on naturally distributed rows a mean dustbin probability
    equal to the natural dustbin frequency; without the shift it overstates the subset."""
    num_classes, features, subset = 5, 6, (0, 1)
    prior = torch.tensor([0.06, 0.04, 0.3, 0.35, 0.25], dtype=torch.float64)  # natural priors π
    f = float(prior[list(subset)].sum())
    g = torch.Generator().manual_seed(16)
    likelihood = F.softmax(1.2 * torch.randn(num_classes, features, generator=g, dtype=torch.float64), dim=1)
    in_subset = torch.zeros(num_classes, dtype=torch.bool)
    in_subset[list(subset)] = True
    trained_prior = torch.where(in_subset, prior * 0.5 / f, prior * 0.5 / (1 - f))  # the subset makes half the rows
    assert float(trained_prior[in_subset].sum()) == pytest.approx(0.5)
    # The "trained" model: one-hot feature value → log P(x | c) + log π_train(c), the posterior's log-odds.
    model = nn.Linear(features, num_classes).double()
    with torch.no_grad():
        model.weight.copy_(likelihood.log())  # (C, features): x @ Wᵀ picks column x
        model.bias.copy_(trained_prior.log())
    labels = torch.multinomial(prior, 40000, replacement=True, generator=g)
    values = torch.multinomial(likelihood[labels], 1, generator=g).squeeze(1)
    rows = F.one_hot(values, features).double()
    natural_dustbin = float((~in_subset[labels]).double().mean())
    assert natural_dustbin == pytest.approx(1 - f, abs=0.01)
    marginal = prior @ likelihood  # (features,): P(x) under natural priors, for the exact expectation

    def dustbin_probability(shift: float) -> tuple[float, float]:
        specialist = Specialist(model, subset, num_classes, shift=shift).double()
        with torch.no_grad():
            sampled = float(F.softmax(specialist(rows), dim=1)[:, -1].mean())
            exact = float(marginal @ F.softmax(specialist(torch.eye(features, dtype=torch.float64)), dim=1)[:, -1])
        return sampled, exact

    sampled, exact = dustbin_probability(dustbin_shift(f))
    assert abs(sampled - natural_dustbin) < 0.01
    assert exact == pytest.approx(1 - f, abs=1e-6)  # the natural posterior (to the float32 shift buffer)
    sampled_raw, _ = dustbin_probability(0.0)
    assert natural_dustbin - sampled_raw > 0.03


# ------------------------------------------------------------------------------------------------------------------
# parse_subsets


def test_subsets_take_names_case_insensitively_and_indices():
    assert parse_subsets("ant,CAT;eel , dog", NAMES, 5) == [(0, 2), (3, 4)]
    assert parse_subsets("4,1; 0,3", None, 5) == [(1, 4), (0, 3)]
    assert parse_subsets("bee,2;4", NAMES, 5) == [(1, 2), (4,)]
    assert parse_subsets(" Ant , BEE ", NAMES, 5) == [(0, 1)]


@pytest.mark.parametrize("text, names, needles", [
    ("ant,fox", NAMES, ["unknown class 'fox'", "ant, Bee, cat, dog, eel"]),
    ("ant,bee", None, ["'ant'", "declares no class names", "0 to 4"]),
    ("ant,cat,ANT", NAMES, ["named twice in subset 1"]),
    ("0,1;2,1", None, ["subsets 1 and 2", "must not overlap"]),
    ("0,1,2,3,4", None, ["holds all 5 classes"]),
    ("ant,bee;;cat", NAMES, ["subset 2 is empty"]),
    ("0,1;", None, ["subset 2 is empty"]),
    ("0,5", None, ["class 5 is out of range", "0 to 4"]),
    ("-1,2", None, ["class -1 is out of range"]),
])
def test_bad_subsets_say_what_is_wrong(text, names, needles):
    with pytest.raises(CompressorError) as excinfo:
        parse_subsets(text, names, 5)
    assert all(needle in str(excinfo.value) for needle in needles), str(excinfo.value)


# ------------------------------------------------------------------------------------------------------------------
# prediction_covariance and find_subsets


def test_prediction_covariance_is_numpys():
    """The (C, C) covariance over rows, in float64, as numpy.cov of the transposed probabilities."""
    g = torch.Generator().manual_seed(17)
    probs = F.softmax(2.0 * torch.randn(50, 7, generator=g), dim=1)
    cov = prediction_covariance(probs)
    assert cov.dtype == torch.float64 and cov.shape == (7, 7)
    assert np.allclose(cov.numpy(), np.cov(probs.double().numpy().T), rtol=1e-12, atol=1e-15)


def confused_probs(n_per_class: int = 40, seed: int = 18) -> torch.Tensor:
    """Generalist probabilities (10 n_per_class, 10): rows of classes {0, 2, 4, 6} spread their mass over those
    four, rows of {5, 7, 9} over those three, rows of {1, 3, 8} are crisp; a little noise everywhere."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for c in range(C):
        group = next((s for s in TWO if c in s), (c,))
        for _ in range(n_per_class):
            p = 0.01 * torch.rand(C, generator=g, dtype=torch.float64)
            share = torch.rand(len(group), generator=g, dtype=torch.float64) + 0.5
            share[group.index(c)] += 0.5
            p[list(group)] += share / share.sum()
            rows.append(p / p.sum())
    return torch.stack(rows)


def test_find_subsets_finds_the_confused_groups():
    """K-means on the class similarity returns exactly the two planted confusable groups, most confused first."""
    probs = confused_probs()
    subsets, details = find_subsets(probs, 2, seed=0)
    assert set(subsets) == set(TWO)
    assert all(isinstance(s, tuple) for s in subsets)
    assert subsets[0] == (0, 2, 4, 6)  # four classes sharing mass share more of it
    assert np.array(details["covariance"]).shape == (C, C)
    assert np.allclose(details["covariance"], prediction_covariance(probs).numpy(), atol=1e-8)
    clustered = sorted(c for group in details["clusters"] for c in group["classes"])
    assert clustered == list(range(C))  # every class in one cluster
    assert [g["shared_probability"] for g in details["clusters"]] == \
        sorted((g["shared_probability"] for g in details["clusters"]), reverse=True)
    one, _ = find_subsets(probs, 1, seed=0)
    assert one == [(0, 2, 4, 6)]


@pytest.mark.parametrize("num_specialists, needle", [(0, "between 1 and 9"), (C, "between 1 and 9"),
                                                     (12, "between 1 and 9")])
def test_find_subsets_refuses_a_bad_number_of_specialists(num_specialists, needle):
    with pytest.raises(CompressorError, match=needle):
        find_subsets(confused_probs(n_per_class=5), num_specialists)


def test_find_subsets_refuses_fewer_clusters_than_specialists():
    with pytest.raises(CompressorError, match="fewer than --num-specialists"):
        find_subsets(confused_probs(n_per_class=5), 3, clusters=2)


@pytest.mark.parametrize("clusters, needle", [(None, "K-means with 3 clusters found only"),
                                               (C, "found only 0 groups of two or more classes")])
def test_find_subsets_says_when_too_few_classes_group_together(clusters, needle):
    """A crisp generalist (one-hot predictions) confuses nothing: K-means leaves too few groups of two or more."""
    probs = F.one_hot(torch.arange(C).repeat(5), C).double()
    with pytest.raises(CompressorError, match=needle) as excinfo:
        find_subsets(probs, 2, clusters=clusters)
    assert "lower --num-specialists" in str(excinfo.value)


# ------------------------------------------------------------------------------------------------------------------
# check_metadata


def test_check_metadata_returns_the_subsets():
    spec = {"subsets": [[0, 2, 4, 6], [5, 7, 9]], "top_n": 2}
    assert check_metadata(spec, 3, C, "ensemble.json") == TWO
    assert check_metadata({"subsets": [[1, 2]]}, 2, None, "x") == [(1, 2)]  # no class count: no range check


@pytest.mark.parametrize("spec, members_, needles", [
    ({"subsets": [[0, 1]]}, 3, ["1 specialist subsets for 2 specialists"]),
    ({"subsets": [[0, 1], [2, 3]]}, 2, ["2 specialist subsets for 1 specialists"]),
    ({"subsets": [[0, 1], [1, 3]]}, 3, ["overlap or name classes outside"]),
    ({"subsets": [[0, 10]]}, 2, ["overlap or name classes outside the 10"]),
    ({"subsets": [[-1, 2]]}, 2, ["overlap or name classes outside"]),
    ({"subsets": [[0, 1]], "top_n": 0}, 2, ["top_n must be at least 1"]),
])
def test_check_metadata_refuses_what_does_not_fit(spec, members_, needles):
    with pytest.raises(CompressorError) as excinfo:
        check_metadata(spec, members_, C, "teacher.json")
    message = str(excinfo.value)
    assert message.startswith("teacher.json: ") and all(needle in message for needle in needles), message
