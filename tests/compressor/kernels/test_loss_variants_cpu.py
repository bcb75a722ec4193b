"""The CPU path of dkd, ls and dist against the float64 reference: loss and gradient w.r.t. the student."""

from __future__ import annotations

import pytest
import torch

from compressor.kernels import resolve_impl, tempered_kl
from compressor.kernels.tempered_kl_reference import tempered_kl_reference
from compressor.kernels.tempered_kl_variants_cpu import tempered_kl_variants_cpu

VARIANTS = ("dkd", "ls", "dist")


def _case(n: int, c: int, k: int, seed: int, dtype=torch.float64, labels: str = "some"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64).mul_(3).to(dtype).requires_grad_()
    t = torch.randn(k, n, c, generator=g, dtype=torch.float64).mul_(4).to(dtype)
    y = None if labels == "none" else torch.randint(0, c, (n,), generator=g)
    if labels == "some":
        y[::3] = -1
    return s, t, y


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape,chunk", [((41, 1271, 3), None), ((41, 1271, 3), 7), ((1, 3, 1), None),
                                         ((130, 10, 5), 16)])
def test_matches_the_reference_in_float64(variant, shape, chunk):
    s, t, y = _case(*shape, seed=sum(shape))
    weights = torch.linspace(0.0, 1.0, shape[2], dtype=torch.float64) if shape[2] > 1 else None
    ref = tempered_kl_reference(s, t, y, 2.5, 0.7, weights, variant=variant, beta=6.0)
    ref.backward(torch.tensor(1.7, dtype=torch.float64))
    ref_grad, s.grad = s.grad.clone(), None
    got = tempered_kl_variants_cpu(s, t, y, 2.5, 0.7, weights, variant=variant, beta=6.0, chunk_rows=chunk)
    got.backward(torch.tensor(1.7, dtype=torch.float64))
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(s.grad, ref_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("labels,alpha,combine", [("none", 1.0, "arithmetic"), ("all", 0.0, "arithmetic"),
                                                  ("all", 0.5, "geometric"), ("some", 0.9, "geometric")])
def test_labels_alpha_and_combine(variant, labels, alpha, combine):
    s, t, y = _case(23, 17, 2, seed=3, labels=labels)
    ref = tempered_kl_reference(s, t, y, 4.0, alpha, combine=combine, variant=variant)
    ref.backward()
    ref_grad, s.grad = s.grad.clone(), None
    got = tempered_kl_variants_cpu(s, t, y, 4.0, alpha, combine=combine, variant=variant)
    got.backward()
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(s.grad, ref_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("variant", VARIANTS)
def test_float32_inputs_stay_close_and_the_gradient_keeps_the_students_dtype(variant):
    s, t, y = _case(300, 100, 3, seed=5, dtype=torch.float32)
    ref = tempered_kl_reference(s.double(), t.double(), y, 2.0, 0.8, variant=variant)
    got = tempered_kl_variants_cpu(s, t, y, 2.0, 0.8, variant=variant)
    got.backward()
    assert got.dtype == torch.float32 and s.grad.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)


def test_tempered_kl_routes_the_variants():
    s, t, y = _case(8, 6, 2, seed=1)
    for impl in ("cpu", "reference", "auto"):
        assert torch.allclose(tempered_kl(s, t, y, 2.0, 0.5, variant="dkd", impl=impl),
                              tempered_kl_reference(s, t, y, 2.0, 0.5, variant="dkd"))
    assert resolve_impl("auto", "cpu", elements=10 ** 6) == "cpu"
    with pytest.raises(ValueError, match="runs in compressor.kernels.tempered_kl_cpu"):
        tempered_kl_variants_cpu(s, t, y, 2.0, 0.5, variant="kd")


def test_backward_twice_is_refused_with_the_fix():
    s, t, y = _case(4, 5, 1, seed=2)
    loss = tempered_kl_variants_cpu(s, t, y, 2.0, 0.5, variant="ls")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute the loss"):
        loss.backward()
