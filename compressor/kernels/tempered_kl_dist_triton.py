"""DIST's soft term (Huang et al. 2022) as Triton kernels: its class term correlates each class's probabilities over
the rows of the batch, so one launch cannot finish a row alone. Three launches over the same row tiles:

1. the class sums Σ_n p and Σ_n q (atomic adds into a (2, C) buffer), for the class means;
2. the centred class moments Σ a², Σ b², Σ a b (atomic adds into (3, C)) and each row's correlation over its classes
   with the two factors of its gradient (into (3, N));
3. the gradient, from the class correlations the host forms out of the moments (C numbers each), and each row's
   cross-entropy.

Each launch recomputes the mixture p and the student's q = softmax(s / T) from the logits (the member statistics of
:mod:`.tempered_kl_variant_tiles_triton`), so nothing of size (K, N, C) or (N, C) but the gradient is ever stored. The
gradient is :mod:`.tempered_kl_variants_cpu`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import PEARSON_EPS
from compressor.kernels.tempered_kl_triton import tl, triton
from compressor.kernels.tempered_kl_variant_tiles_triton import _hard, _member_stats, _mixture_tile, _student_lse


@triton.jit
def _tile_pq(s_ptr, t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats, lse_q, inv_t,
             GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column block ``start``: its columns and mask, the mixture's p and the student's q there (0 where masked),
    and the student's raw logits."""
    cols, mask, offs, log_p = _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                            inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.where(mask, tl.exp(s * inv_t - lse_q[:, None]), 0.0)
    return cols, mask, tl.where(mask, tl.exp(log_p), 0.0), q, s


@triton.jit
def _dist_kernel(s_ptr, t_ptr, w_ptr, y_ptr, sums_ptr, moments_ptr, rows_ptr, class_ptr, loss_ptr, grad_ptr, N, C, K,
                 member_stride, temperature, alpha, eps, PHASE: tl.constexpr, GEOMETRIC: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """PHASE 1: class sums; 2: centred class moments and row correlations; 3: gradient and cross-entropy."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * C
    row_off = row_start[:, None]
    inv_t = 1.0 / temperature
    stats = _member_stats(t_ptr, w_ptr, row_off, row_mask, C, K, member_stride, inv_t, GEOMETRIC, False, BLOCK_N,
                          BLOCK_C, BLOCK_K)
    ones = tl.full([BLOCK_N], 1.0, tl.float32)
    lse_q, lse_1 = _student_lse(s_ptr, row_off, row_mask, C, ones * 0.0, ones, inv_t, BLOCK_N, BLOCK_C)
    if PHASE == 3:
        _dist_gradient(s_ptr, t_ptr, w_ptr, y_ptr, rows_ptr, class_ptr, loss_ptr, grad_ptr, rows, row_mask, row_start,
                       N, C, K, member_stride, stats, lse_q, lse_1, temperature, alpha, GEOMETRIC, BLOCK_N, BLOCK_C,
                       BLOCK_K)
    else:
        dot = tl.zeros([BLOCK_N], tl.float32)
        norm_a = tl.zeros([BLOCK_N], tl.float32)
        norm_b = tl.zeros([BLOCK_N], tl.float32)
        for start in range(0, C, BLOCK_C):
            cols, mask, p, q, s = _tile_pq(s_ptr, t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                           lse_q, inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
            col_mask = cols < C
            if PHASE == 1:
                tl.atomic_add(sums_ptr + cols, tl.sum(p, axis=0), mask=col_mask)
                tl.atomic_add(sums_ptr + C + cols, tl.sum(q, axis=0), mask=col_mask)
            else:
                a = tl.where(mask, p - tl.load(class_ptr + cols, mask=col_mask, other=0.0)[None, :], 0.0)
                b = tl.where(mask, q - tl.load(class_ptr + C + cols, mask=col_mask, other=0.0)[None, :], 0.0)
                tl.atomic_add(moments_ptr + cols, tl.sum(a * a, axis=0), mask=col_mask)
                tl.atomic_add(moments_ptr + C + cols, tl.sum(b * b, axis=0), mask=col_mask)
                tl.atomic_add(moments_ptr + 2 * C + cols, tl.sum(a * b, axis=0), mask=col_mask)
                row_a = tl.where(mask, p - 1.0 / C, 0.0)  # a row's probabilities sum to 1: their mean is 1 / C
                row_b = tl.where(mask, q - 1.0 / C, 0.0)
                dot += tl.sum(row_a * row_b, axis=1)
                norm_a += tl.sum(row_a * row_a, axis=1)
                norm_b += tl.sum(row_b * row_b, axis=1)
        if PHASE == 2:
            product = tl.sqrt(norm_a) * tl.sqrt(norm_b)
            rho = dot / tl.maximum(product, eps)
            tl.store(rows_ptr + rows, rho, mask=row_mask)
            tl.store(rows_ptr + N + rows, 1.0 / tl.maximum(product, eps), mask=row_mask)
            tl.store(rows_ptr + 2 * N + rows, tl.where(product >= eps, rho / tl.maximum(norm_b, 1e-30), 0.0),
                     mask=row_mask)


@triton.jit
def _dist_gradient(s_ptr, t_ptr, w_ptr, y_ptr, rows_ptr, class_ptr, loss_ptr, grad_ptr, rows, row_mask, row_start,
                   N, C, K, member_stride, stats, lse_q, lse_1, temperature, alpha, GEOMETRIC: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Phase 3: g_q = −(∂ρ_n/∂q + (N/C) ∂ρ_c/∂q), g_x = q (g_q − Σ q g_q), written with the hard term; and the CE."""
    row_off = row_start[:, None]
    inv_t = 1.0 / temperature
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    has_label = y >= 0
    row_a = tl.load(rows_ptr + N + rows, mask=row_mask, other=0.0)
    row_b = tl.load(rows_ptr + 2 * N + rows, mask=row_mask, other=0.0)
    weighted = tl.zeros([BLOCK_N], tl.float32)
    for sweep in range(2):  # 0: Σ_c q g_q; 1: the gradient
        for start in range(0, C, BLOCK_C):
            cols, mask, p, q, s = _tile_pq(s_ptr, t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats,
                                           lse_q, inv_t, GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
            col_mask = cols < C
            mean_p = tl.load(class_ptr + cols, mask=col_mask, other=0.0)[None, :]
            mean_q = tl.load(class_ptr + C + cols, mask=col_mask, other=0.0)[None, :]
            class_a = tl.load(class_ptr + 2 * C + cols, mask=col_mask, other=0.0)[None, :]
            class_b = tl.load(class_ptr + 3 * C + cols, mask=col_mask, other=0.0)[None, :]
            row_grad = (p - 1.0 / C) * row_a[:, None] - (q - 1.0 / C) * row_b[:, None]
            class_grad = (p - mean_p) * class_a - (q - mean_q) * class_b
            g_q = tl.where(mask, -(row_grad + class_grad * (N / C)), 0.0)
            if sweep == 0:
                weighted += tl.sum(q * g_q, axis=1)
            else:
                g_x = q * (g_q - weighted[:, None])
                grad = (alpha * temperature * g_x + (1.0 - alpha) * _hard(s, lse_1, cols, y, has_label)) / N
                tl.store(grad_ptr + row_off + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)
    s_y = tl.load(s_ptr + row_start + tl.maximum(y, 0), mask=row_mask & has_label, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(has_label, lse_1 - s_y, 0.0), mask=row_mask)


def dist_fwd_triton(s: Tensor, t: Tensor, w: Tensor, y: Tensor, grad: Tensor, temperature: float, alpha: float,
                    geometric: bool, grid: tuple, shape: dict) -> Tensor:
    """The three launches; writes ``grad`` (N, C) and returns the mean loss (0-dim fp32)."""
    k, n, c = t.shape
    f32 = dict(dtype=torch.float32, device=s.device)
    sums = torch.zeros(2, c, **f32)
    moments = torch.zeros(3, c, **f32)
    row_terms = torch.zeros(3, n, **f32)
    class_terms = torch.zeros(4, c, **f32)
    ce = torch.zeros(n, **f32)

    def launch(phase: int) -> None:
        _dist_kernel[grid](s, t, w, y, sums, moments, row_terms, class_terms, ce, grad, n, c, k, n * c, temperature,
                           alpha, PEARSON_EPS, PHASE=phase, GEOMETRIC=geometric, **shape)

    launch(1)
    class_terms[:2] = sums / n  # the class means of p and q
    launch(2)
    norm_a, norm_b = moments[0].clamp_min(0).sqrt(), moments[1].clamp_min(0).sqrt()
    product = norm_a * norm_b
    rho_class = moments[2] / product.clamp_min(PEARSON_EPS)
    class_terms[2] = 1 / product.clamp_min(PEARSON_EPS)
    class_terms[3] = torch.where(product >= PEARSON_EPS, rho_class / moments[1].clamp_min(1e-30), 0.0)
    launch(3)
    soft = (1 - row_terms[0].mean()) + (1 - rho_class.mean())
    return alpha * temperature * temperature * soft + (1 - alpha) * ce.mean()
