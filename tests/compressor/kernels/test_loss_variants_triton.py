"""The Triton kernels of dkd, ls and dist against the float64 reference: loss and gradient w.r.t. the student.

On the CPU they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without an NVIDIA device); the
same cases run on CUDA with ``-m gpu``. ``block_c`` below C sends a row through several column blocks."""

from __future__ import annotations


import pytest
import torch

from compressor.kernels import tempered_kl
from compressor.kernels.tempered_kl_reference import tempered_kl_reference
from compressor.kernels.tempered_kl_variants_triton import tempered_kl_variants_triton

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked-off lanes

# (N, C, K, combine, labels, weights, block_c, dtype)
CASES = [
    (41, 1271, 3, "arithmetic", "some", "random", 256, torch.float32),  # odd shape, five column blocks
    (7, 5, 1, "arithmetic", "all", None, None, torch.float32),
    (13, 37, 2, "geometric", "none", "zero", 8, torch.float32),
    (9, 37, 5, "arithmetic", "unlabeled", None, None, torch.bfloat16),
    (33, 10, 2, "geometric", "some", "random", 4, torch.float16),
]


def _inputs(n, c, k, labels, weights, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, c, generator=g) * 3).to(dtype)
    t = (torch.randn(k, n, c, generator=g) * 4).to(dtype)
    y = None if labels == "none" else torch.randint(0, c, (n,), generator=g)
    if labels == "some":
        y[::3] = -1
    elif labels == "unlabeled":
        y[:] = -1
    w = None if weights is None else torch.rand(k, generator=g) if weights == "random" else \
        torch.tensor([0.0] + [1.0] * (k - 1))
    move = (lambda x: None if x is None else x.to(device))  # noqa: E731
    return move(s), move(t), move(y), w


@pytest.mark.parametrize("variant", ["dkd", "ls", "dist"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case[0]}x{case[1]}-K{case[2]}-{case[3][:5]}-"
                                                         f"{case[4]}-bc{case[6]}-{str(case[7])[6:]}")
def test_matches_the_float64_reference(variant, case, device):
    n, c, k, combine, labels, weights, block_c, dtype = case
    s, t, y, w = _inputs(n, c, k, labels, weights, dtype, device, seed=n * c + k)
    reference_s = s.detach().cpu().double().requires_grad_()
    reference = tempered_kl_reference(reference_s, t.cpu().double(), None if y is None else y.cpu(), 2.5, 0.7,
                                      None if w is None else w.double(), combine, variant=variant, beta=6.0)
    reference.backward(torch.tensor(1.3, dtype=torch.float64))
    s.requires_grad_()
    got = tempered_kl_variants_triton(s, t, y, 2.5, 0.7, w, combine, variant=variant, beta=6.0, block_c=block_c)
    got.backward(torch.tensor(1.3, device=device))
    loose = dtype != torch.float32  # inputs and the gradient's output rounded to 16 bits
    rtol, atol = (1e-2, 1e-2) if loose else (1e-5, 2e-6)
    assert got.item() == pytest.approx(reference.item(), rel=rtol, abs=atol)
    scale = reference_s.grad.abs().max().item()
    torch.testing.assert_close(s.grad.cpu().double(), reference_s.grad, rtol=rtol, atol=atol * scale)


def test_the_dispatcher_sends_the_variants_to_triton(device):
    s, t, y, _ = _inputs(6, 9, 2, "some", None, torch.float32, device, seed=4)
    got = tempered_kl(s, t, y, 2.0, 0.5, variant="dkd", impl="triton")
    assert got.item() == pytest.approx(tempered_kl_reference(s.cpu(), t.cpu(), y.cpu(), 2.0, 0.5,
                                                             variant="dkd").item(), rel=1e-5)


def test_ls_needs_two_classes(device):
    s, t, y, _ = _inputs(3, 1, 1, "none", None, torch.float32, device, seed=1)
    with pytest.raises(ValueError, match="needs at least 2"):
        tempered_kl_variants_triton(s, t, y, 2.0, 0.5, variant="ls")
