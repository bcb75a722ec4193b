"""The later soft terms (decoupled KD, standardised logits, DIST) as Triton kernels: loss and gradient w.r.t. the
student written in the forward, for a weighted ensemble of K members, never a (K, N, C) intermediate.

The specification is :func:`.tempered_kl_reference.soft_term` (docs/kernels.md); the gradients are those of
:mod:`.tempered_kl_variants_cpu`. Each program owns BLOCK_N rows and walks their columns in blocks of BLOCK_C, so
any C is served; every pass re-reads the row (a row of C ≤ BLOCK_C is one block, read from cache after the first):

- ``dkd`` and ``ls``: one launch. Passes: (ls) each member's and the student's row mean and standard deviation;
  each member's log-sum-exp at T (the mixture's log p is then formed block by block, as the kd kernel does); the
  student's at T and at 1; (dkd) the mixture's argmax where a row has no label, then the target's p_y, q_y and the
  non-target log-sum-exps; (ls) Σ g and Σ g (s − μ) for the standardisation's backward; last, the loss terms and
  the gradient.
- ``dist``: its class term couples the rows, so three launches (:mod:`.tempered_kl_dist_triton`).

The tile helpers both share are in :mod:`.tempered_kl_variant_tiles_triton`.

Imported lazily by the dispatcher; needs triton (``TRITON_INTERPRET=1`` before the import on a CPU).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_dist_triton import dist_fwd_triton
from compressor.kernels.tempered_kl_reference import (COMBINES, _check_alpha, _check_shapes, _check_temperature,
                                                      check_variant, ensemble_weights)
from compressor.kernels.tempered_kl_triton import TILE_ELEMENTS, _online_lse_update, tl, triton
from compressor.kernels.tempered_kl_variant_tiles_triton import (_hard, _member_stats, _mixture_tile, _row_moments,
                                                                 _student_lse)

BLOCK_C_MAX = 4096  # column block; rows up to this many classes are one block
DKD, LS, DIST = 1, 2, 3  # the VARIANT constexpr
VARIANT_IDS = {"dkd": DKD, "ls": LS, "dist": DIST}


@triton.jit
def _dkd_target(t_ptr, w_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats, inv_t,
                GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The label, or the mixture's argmax where the row has none."""
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, C, BLOCK_C):
        cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                                inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
        top = tl.max(log_p, axis=1)
        at = tl.argmax(log_p, axis=1).to(tl.int32) + start
        arg = tl.where(top > best, at, arg)
        best = tl.maximum(best, top)
    return tl.where(has_label, y.to(tl.int32), arg)


@triton.jit
def _dkd_rows(s_ptr, t_ptr, w_ptr, grad_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats, lse_q,
              lse_1, temperature, alpha, beta, inv_n, GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Decoupled KD: writes the rows' gradient, returns their soft term without T² (BLOCK_N,)."""
    inv_t = 1.0 / temperature
    target = _dkd_target(t_ptr, w_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats, inv_t,
                         GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
    m_p = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_p = tl.zeros([BLOCK_N], tl.float32)
    m_q = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_q = tl.zeros([BLOCK_N], tl.float32)
    log_p_y = tl.zeros([BLOCK_N], tl.float32)
    log_q_y = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):  # the target's log p and log q, the rest's log-sum-exps
        cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                                inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
        log_q = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) * inv_t - lse_q[:, None]
        on = mask & (cols[None, :] == target[:, None])
        log_p_y += tl.sum(tl.where(on, log_p, 0.0), axis=1)
        log_q_y += tl.sum(tl.where(on, log_q, 0.0), axis=1)
        m_p, d_p = _online_lse_update(m_p, d_p, tl.where(mask & ~on, log_p, float("-inf")))
        m_q, d_q = _online_lse_update(m_q, d_q, tl.where(mask & ~on, log_q, float("-inf")))
    rest_p = m_p + tl.log(d_p)  # log(1 − p_y); −inf where the teachers put all mass on the target
    rest_q = m_q + tl.log(d_q)
    has_rest = rest_p > float("-inf")
    p_y = tl.exp(log_p_y)
    q_y = tl.exp(log_q_y)
    tckd = tl.where(p_y > 0, p_y * (log_p_y - log_q_y), 0.0) \
        + tl.where(has_rest, tl.exp(rest_p) * (rest_p - rest_q), 0.0)
    nckd = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):  # the non-target KL and the gradient
        cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                                inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        on = cols[None, :] == target[:, None]
        off_target = mask & ~on
        tilde_log_p = tl.where(off_target & has_rest[:, None], log_p - rest_p[:, None], float("-inf"))
        tilde_log_q = tl.where(off_target, s * inv_t - lse_q[:, None] - rest_q[:, None], float("-inf"))
        tilde_p = tl.exp(tilde_log_p)
        tilde_q = tl.exp(tilde_log_q)
        nckd += tl.sum(tl.where(tilde_p > 0, tilde_p * (tilde_log_p - tilde_log_q), 0.0), axis=1)
        gap = (q_y - p_y)[:, None]
        g_x = tl.where(on, gap, -gap * tilde_q + beta * tl.where(has_rest[:, None], tilde_q - tilde_p, 0.0))
        grad = (alpha * temperature * g_x + (1.0 - alpha) * _hard(s, lse_1, cols, y, has_label)) * inv_n
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return tckd + beta * nckd


@triton.jit
def _ls_rows(s_ptr, t_ptr, w_ptr, grad_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats, lse_q,
             lse_1, mean_s, inv_s, temperature, alpha, inv_n, GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """KD on standardised logits: writes the rows' gradient, returns their KL (BLOCK_N,)."""
    inv_t = 1.0 / temperature
    kl = tl.zeros([BLOCK_N], tl.float32)
    sum_g = tl.zeros([BLOCK_N], tl.float32)
    sum_gd = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):  # KL, Σ g and Σ g (s − μ), g = q − p
        cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                                inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
        d = tl.where(mask, tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean_s[:, None], 0.0)
        log_q = d * (inv_s * inv_t)[:, None] - lse_q[:, None]
        p = tl.exp(log_p)
        kl += tl.sum(tl.where(mask & (p > 0), p * (log_p - log_q), 0.0), axis=1)
        g = tl.where(mask, tl.exp(log_q) - p, 0.0)
        sum_g += tl.sum(g, axis=1)
        sum_gd += tl.sum(g * d, axis=1)
    sigma = 1.0 / inv_s - 1e-7  # std, from 1 / (std + STANDARDISE_EPS)
    back = tl.where(sigma > 0, sum_gd * inv_s * inv_s / ((C - 1) * sigma), 0.0)
    for start in range(0, C, BLOCK_C):  # the gradient, through the standardisation
        cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                                inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = s - mean_s[:, None]
        g = tl.exp(d * (inv_s * inv_t)[:, None] - lse_q[:, None]) - tl.exp(log_p)
        g_s = (g - (sum_g / C)[:, None]) * inv_s[:, None] - d * back[:, None]
        grad = (alpha * temperature * g_s + (1.0 - alpha) * _hard(s, lse_1, cols, y, has_label)) * inv_n
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return kl


@triton.jit
def _variant_fwd_kernel(s_ptr, t_ptr, w_ptr, y_ptr, loss_ptr, grad_ptr, N, C, K, member_stride, temperature, alpha,
                        beta, inv_n, VARIANT: tl.constexpr, GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """dkd or ls: per-row loss (N,) and the gradient of their mean w.r.t. the student (N, C)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * C
    row_off = row_start[:, None]
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    has_label = y >= 0
    s_y = tl.load(s_ptr + row_start + tl.maximum(y, 0), mask=row_mask & has_label, other=0.0).to(tl.float32)
    inv_t = 1.0 / temperature
    stats = _member_stats(t_ptr, w_ptr, row_off, row_mask, C, K, member_stride, inv_t, GEOMETRIC, VARIANT == LS,
                          BLOCK_N, BLOCK_C, BLOCK_K)
    mean_s = tl.zeros([BLOCK_N], tl.float32)
    inv_s = tl.full([BLOCK_N], 1.0, tl.float32)
    if VARIANT == LS:
        mean_s, inv_s = _row_moments(s_ptr, row_off, row_mask, C, BLOCK_N, BLOCK_C)
    lse_q, lse_1 = _student_lse(s_ptr, row_off, row_mask, C, mean_s, inv_s, inv_t, BLOCK_N, BLOCK_C)
    if VARIANT == DKD:
        soft = _dkd_rows(s_ptr, t_ptr, w_ptr, grad_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats,
                         lse_q, lse_1, temperature, alpha, beta, inv_n, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
    else:
        soft = _ls_rows(s_ptr, t_ptr, w_ptr, grad_ptr, row_off, row_mask, y, has_label, C, K, member_stride, stats,
                        lse_q, lse_1, mean_s, inv_s, temperature, alpha, inv_n, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
    ce = tl.where(has_label, lse_1 - s_y, 0.0)
    tl.store(loss_ptr + rows, alpha * temperature * temperature * soft + (1.0 - alpha) * ce, mask=row_mask)


def tempered_kl_variants_triton(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                                temperature: float, alpha: float, weights: Tensor | Sequence[float] | None = None,
                                combine: str = "arithmetic", *, variant: str, beta: float = 8.0,
                                block_c: int | None = None, block_n: int | None = None) -> Tensor:
    """The distillation loss with ``variant``'s soft term ("dkd", "ls" or "dist"), a 0-dim fp32 tensor averaged over
    all N rows; arguments as :func:`compressor.kernels.tempered_kl`. Differentiable in the student logits only.
    ``block_c`` / ``block_n`` (powers of two) override the tile (tests use a small ``block_c`` to cross blocks)."""
    n, c = _check_shapes(student_logits, teacher_logits, labels)
    _check_temperature(temperature)
    _check_alpha(alpha)
    check_variant(variant, beta)
    if variant not in VARIANT_IDS:
        raise ValueError(f"variant={variant!r}: this module has {', '.join(VARIANT_IDS)}; kd is tempered_kl_triton")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(map(repr, COMBINES))}")
    if variant == "ls" and c < 2:
        raise ValueError("variant='ls' standardises each row over its classes and needs at least 2 of them")
    if student_logits.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("tempered_kl_variants_triton got CPU tensors, but Triton runs on CPU only in its "
                         "interpreter: set TRITON_INTERPRET=1 before importing triton, or use impl='cpu'")
    return _VariantTriton.apply(student_logits, teacher_logits, labels, float(temperature), float(alpha), weights,
                                combine, variant, float(beta), (block_c, block_n))


class _VariantTriton(torch.autograd.Function):
    """Forward launches the kernels and keeps the (N, C) student gradient; backward scales it."""

    @staticmethod
    def forward(ctx, s, t, y, temperature, alpha, weights, combine, variant, beta, blocks):
        loss, grad = variant_fwd_triton(s, t, y, temperature, alpha, weights, combine, variant, beta, *blocks)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype),) + (None,) * 9


def launch_shape(n: int, c: int, k: int, device: torch.device, block_c: int | None, block_n: int | None) -> dict:
    """The tile (BLOCK_N, BLOCK_C, BLOCK_K), the grid and the warps for N rows of C classes and K members."""
    block_c = block_c or min(triton.next_power_of_2(c), BLOCK_C_MAX)
    block_n = block_n or max(1, min(triton.next_power_of_2(n), TILE_ELEMENTS[device.type if device.type == "cuda"
                                                                             else "cpu"] // block_c))
    for name, value in (("block_c", block_c), ("block_n", block_n)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name}={value}: must be a power of two")
    tile = block_n * block_c
    return {"grid": (triton.cdiv(n, block_n),), "BLOCK_N": block_n, "BLOCK_C": block_c,
            "BLOCK_K": triton.next_power_of_2(k), "num_warps": 4 if tile <= 2048 else 8 if tile <= 8192 else 16}


def variant_fwd_triton(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                       alpha: float, weights, combine: str, variant: str, beta: float, block_c: int | None = None,
                       block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """Launch: the mean loss (0-dim fp32) and its gradient w.r.t. the student (N, C, the student's dtype)."""
    k, n, c = teacher_logits.shape
    device = student_logits.device
    s, t = student_logits.contiguous(), teacher_logits.contiguous()
    w = ensemble_weights(weights, k, torch.empty(0, device=device)).to(torch.float32).contiguous()
    y = (torch.full((n,), -1, dtype=torch.int64, device=device) if labels is None
         else labels.to(torch.int64).contiguous())
    grad = torch.empty_like(s)
    shape = launch_shape(n, c, k, device, block_c, block_n)
    grid = shape.pop("grid")
    if variant == "dist":
        return dist_fwd_triton(s, t, w, y, grad, float(temperature), float(alpha), combine == "geometric", grid,
                               shape), grad
    loss = torch.empty(n, dtype=torch.float32, device=device)
    _variant_fwd_kernel[grid](s, t, w, y, loss, grad, n, c, k, n * c, float(temperature), float(alpha), float(beta),
                              1.0 / n, VARIANT=VARIANT_IDS[variant], GEOMETRIC=combine == "geometric", **shape)
    return loss.mean(), grad
