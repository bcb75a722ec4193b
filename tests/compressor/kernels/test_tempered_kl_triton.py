"""Tests for compressor/kernels/tempered_kl_triton.py: the fused kernel against a float64 reference.

The oracle is :func:`tempered_kl_reference` (and its mixture-input form) evaluated in float64 on the same
inputs, with the gradient from autograd. Inputs are drawn fresh for every case (no fixed seed). On CPU the
kernel runs in Triton's interpreter (tests/conftest.py chooses it when there is no NVIDIA device); the same
tests run unchanged on CUDA with ``-m gpu``. The gradient buffer is poisoned with NaN before every launch, so
an element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import pytest
import torch

from compressor.kernels.tempered_kl_reference import (ensemble_log_probs, tempered_kl_reference,
                                                      tempered_kl_reference_from_log_probs)
from compressor.kernels.tempered_kl_triton import (tempered_kl_fwd_triton, tempered_kl_triton,
                                                   tempered_kl_triton_from_log_probs)

# The interpreter evaluates masked-off lanes too (−inf − −inf, log 0); their values are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Gradient tolerance, dtype -> (rtol, atol as a fraction of the largest reference element). The reference sees
# the same (rounded) inputs in float64, so what is left is fp32 accumulation and, for bf16/fp16, the rounding
# of the gradient to the input dtype on the way out.
TOL = {
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass(frozen=True)
class Case:
    n: int
    c: int
    k: int
    temperature: float
    combine: str = "arithmetic"
    scale: float = 1.0  # logits are randn · scale
    labels: str = "mixed"  # "mixed" (some −1), "none" (labels=None), "unlabeled" (all −1)
    weights: str | None = None  # None (uniform), "random", "zero" (one member weighted 0)
    dtype: torch.dtype = torch.float32
    alpha: float = 0.7
    block_c: int | None = None  # below C forces the two-pass online path
    block_n: int | None = None
    from_log_probs: bool = False

    def __str__(self) -> str:
        online = "" if self.block_c is None else f"-bc{self.block_c}"
        rows = "" if self.block_n is None else f"-bn{self.block_n}"
        mix = "logp" if self.from_log_probs else self.combine[:5]
        return (f"{self.n}x{self.c}-K{self.k}-T{self.temperature:g}-{mix}-x{self.scale:g}-{self.labels}"
                f"-w{self.weights}-{str(self.dtype)[6:]}-a{self.alpha:g}{online}{rows}")


# A sample of the full grid (shape × K × T × combine × scale × labels × weights × dtype × path), chosen so each
# value of each axis appears, rather than the product, which the interpreter could not run in a minute.
CASES = [
    # C smaller than one block and not a power of two, single-read path
    Case(41, 10, 1, 1.0),
    Case(41, 10, 2, 4.0, "geometric", labels="none"),
    Case(7, 37, 5, 20.0, weights="random", scale=100.0),
    Case(7, 37, 2, 4.0, "geometric", weights="random", dtype=torch.bfloat16),
    Case(9, 37, 5, 1.0, weights="zero", dtype=torch.float16, labels="unlabeled"),
    Case(41, 37, 2, 4.0, block_n=4),  # 11 programs, the last one partly past N
    Case(5, 300, 2, 1.0, scale=100.0, alpha=0.0),
    Case(5, 300, 5, 20.0, "geometric", scale=100.0, alpha=1.0),
    Case(41, 1271, 5, 4.0, "geometric", weights="zero", dtype=torch.float16),
    # C spanning several blocks: the online two-pass path
    Case(41, 1271, 2, 4.0, block_c=64),
    Case(5, 1271, 5, 20.0, "geometric", weights="random", block_c=128),
    Case(5, 1271, 1, 1.0, scale=100.0, block_c=256, dtype=torch.bfloat16),
    Case(6, 37, 5, 4.0, weights="zero", block_c=16, labels="none"),
    Case(6, 37, 2, 1.0, "geometric", scale=100.0, block_c=16, dtype=torch.float16),
    Case(41, 100, 2, 20.0, block_c=32, block_n=8),
    Case(7, 300, 5, 4.0, weights="random", scale=100.0, block_c=64, labels="unlabeled"),
    Case(3, 9000, 2, 4.0, scale=100.0),  # past MAX_SINGLE_BLOCK_C: the default heuristic picks the online path
    # the mixture-input form, both paths
    Case(41, 10, 1, 4.0, from_log_probs=True),
    Case(7, 1271, 1, 20.0, scale=100.0, from_log_probs=True, block_c=64),
    Case(7, 37, 1, 1.0, from_log_probs=True, dtype=torch.bfloat16, labels="none"),
    Case(7, 300, 1, 4.0, from_log_probs=True, block_c=64, dtype=torch.float16, scale=100.0),
]


def make_inputs(case: Case, device: str):
    """Fresh random inputs in the case's dtype, and the float64 reference loss and student gradient."""
    s = (torch.randn(case.n, case.c, dtype=torch.float64) * case.scale).to(case.dtype)  # (N, C)
    t = (torch.randn(case.k, case.n, case.c, dtype=torch.float64) * case.scale).to(case.dtype)  # (K, N, C)
    if case.labels == "none":
        y = None
    elif case.labels == "unlabeled":
        y = torch.full((case.n,), -1, dtype=torch.int64)
    else:
        y = torch.randint(-1, case.c, (case.n,))
    if case.weights == "random":
        w = (torch.rand(case.k) + 0.1).tolist()
    elif case.weights == "zero":
        w = (torch.rand(case.k) + 0.1).tolist()
        w[case.k // 2] = 0.0
    else:
        w = None

    s64 = s.double().requires_grad_()
    if case.from_log_probs:
        log_p = ensemble_log_probs(t.double(), case.temperature, w, case.combine)  # (N, C) float64
        teacher = log_p.to(case.dtype)
        ref = tempered_kl_reference_from_log_probs(s64, teacher.double(), y, case.temperature, case.alpha)
    else:
        teacher = t
        ref = tempered_kl_reference(s64, t.double(), y, case.temperature, case.alpha, w, case.combine)
    ref.backward()
    to = lambda x: None if x is None else x.to(device)
    return to(s), to(teacher), to(y), w, ref.detach(), s64.grad


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, temperature: float) -> None:
    """The loss is accumulated in fp32 for every input dtype; T² scales the absolute error of the KL term."""
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.to(torch.float64), rtol=3e-5,
                               atol=1e-6 * temperature**2, msg=lambda m: f"loss: {m}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    expected = expected.to(torch.float64)
    atol = atol * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_float64_reference(device, case):
    s, teacher, y, w, ref_loss, ref_grad = make_inputs(case, device)
    grad_out = torch.full_like(s, float("nan"))  # poisoned: an unwritten element stays NaN and fails
    loss, grad = tempered_kl_fwd_triton(s, teacher, y, case.temperature, case.alpha, w,
                                        "arithmetic" if case.from_log_probs else case.combine,
                                        from_log_probs=case.from_log_probs, block_c=case.block_c,
                                        block_n=case.block_n, grad_out=grad_out)
    assert grad.data_ptr() == grad_out.data_ptr() and grad.dtype == s.dtype
    assert loss.shape == (case.n,) and loss.dtype == torch.float32
    assert torch.isfinite(grad).all(), "gradient has NaN/inf: an element was not written or overflowed"
    assert_loss_close(loss.mean(), ref_loss, case.temperature)
    assert_close(grad, ref_grad, case.dtype, "gradient")


@pytest.mark.parametrize("from_log_probs", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_scales_stored_gradient_by_grad_output(device, from_log_probs, dtype):
    case = Case(9, 37, 3, 4.0, weights="random", dtype=dtype, from_log_probs=from_log_probs)
    s, teacher, y, w, ref_loss, ref_grad = make_inputs(case, device)
    student = s.clone().requires_grad_()
    teacher = teacher.clone().requires_grad_()
    if from_log_probs:
        loss = tempered_kl_triton_from_log_probs(student, teacher, y, case.temperature, case.alpha)
    else:
        loss = tempered_kl_triton(student, teacher, y, case.temperature, case.alpha, w, case.combine)
    (loss * 3.7).backward()  # grad_output = 3.7
    assert loss.ndim == 0
    assert student.grad.dtype == dtype
    assert teacher.grad is None, "teacher logits are frozen: the kernel gives them no gradient"
    assert_loss_close(loss, ref_loss, case.temperature)
    assert_close(student.grad, 3.7 * ref_grad, dtype, "gradient · 3.7")


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
@pytest.mark.parametrize("block_c", [None, 16])
def test_zero_teacher_probability_counts_as_zero(device, combine, block_c):
    """A −inf teacher logit in every member gives p_c = 0, and 0 · log 0 = 0 in loss and gradient."""
    n, c, k, temperature = 6, 37, 2, 4.0
    s = torch.randn(n, c) * 10
    t = torch.randn(k, n, c) * 10
    t[:, :, 5] = float("-inf")
    t[:, 2, 20:30] = float("-inf")
    y = torch.randint(-1, c, (n,))
    s64 = s.double().requires_grad_()
    ref = tempered_kl_reference(s64, t.double(), y, temperature, 0.5, None, combine)
    ref.backward()
    loss, grad = tempered_kl_fwd_triton(s.to(device), t.to(device), y.to(device), temperature, 0.5,
                                        combine=combine, block_c=block_c,
                                        grad_out=torch.full((n, c), float("nan"), device=device))
    assert_loss_close(loss.mean(), ref.detach(), temperature)
    assert_close(grad, s64.grad, torch.float32, "gradient")


def test_rejects_bad_inputs(device):
    s = torch.randn(4, 10, device=device)
    t = torch.randn(2, 4, 10, device=device)
    with pytest.raises(ValueError, match="shapes do not fit"):
        tempered_kl_triton(s, t[:, :3], None, 4.0, 0.5)
    with pytest.raises(ValueError, match="combine"):
        tempered_kl_triton(s, t, None, 4.0, 0.5, combine="harmonic")
    with pytest.raises(ValueError, match="alpha"):
        tempered_kl_triton(s, t, None, 4.0, 1.5)
    with pytest.raises(ValueError, match="temperature"):
        tempered_kl_triton(s, t, None, 0.0, 0.5)
    with pytest.raises(ValueError, match="labels range"):
        tempered_kl_triton(s, t, torch.tensor([0, 1, 10, -1], device=device), 4.0, 0.5)
    with pytest.raises(ValueError, match="log-probs have shape"):
        tempered_kl_triton_from_log_probs(s, t, None, 4.0, 0.5)
    with pytest.raises(ValueError, match="mixture is already made"):
        tempered_kl_fwd_triton(s, t[0], None, 4.0, 0.5, weights=[1.0], from_log_probs=True)
    with pytest.raises(ValueError, match="power of two"):
        tempered_kl_fwd_triton(s, t, None, 4.0, 0.5, block_c=48)
    with pytest.raises(ValueError, match="grad_out"):
        tempered_kl_fwd_triton(s, t, None, 4.0, 0.5, grad_out=torch.empty(4, 11, device=device))


def test_import_without_triton_names_the_gpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    monkeypatch.delitem(sys.modules, "compressor.kernels.tempered_kl_triton")
    with pytest.raises(ImportError, match=r"gpu.*extra|extra.*gpu"):
        importlib.import_module("compressor.kernels.tempered_kl_triton")

