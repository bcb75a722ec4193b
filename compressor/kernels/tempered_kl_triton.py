"""The distillation loss as one fused Triton kernel: loss and gradient w.r.t. the student in the same launch.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531). The formula
and its float64-checkable specification live in :mod:`compressor.kernels.tempered_kl_reference`; per row

    loss = α · T² · KL(p_T ‖ softmax(s / T)) + (1 − α) · CE(softmax(s), y)        (CE is 0 where y = −1)

and the gradient of the mean over N rows w.r.t. the student logit s_c is

    [α · T · (q_c − p_c) + (1 − α) · (softmax(s)_c − 1[c = y]) · 1[y ≥ 0]] / N,      q = softmax(s / T).

Like Liger-Kernel's losses, the gradient is written during the forward pass ("gradient in the forward"), so the
backward only scales it by grad_output and no (K, N, C) intermediate is ever kept. One name runs through the
layers: ``_tempered_kl_fwd_kernel`` (the ``@triton.jit`` body) → :func:`tempered_kl_fwd_triton` (grid, warps,
buffers) → :class:`TemperedKLFunction` (autograd) → :func:`tempered_kl_triton` and
:func:`tempered_kl_triton_from_log_probs` (the public functions).

Each program owns a [BLOCK_N, BLOCK_C] tile: BLOCK_N rows at once, so small C still fills a GPU (and the
interpreter, whose cost grows with the number of programs, stays fast). When the whole row fits one block
(``SINGLE_BLOCK``) every input is read once; otherwise an online softmax over column blocks serves any C:
pass 1 accumulates running maxima and sums (student at T and at 1, and each teacher member at T — or the
weighted mean logits for the geometric mixture), pass 2 re-reads the blocks and writes loss terms and gradient.

This module imports triton at import time; it is imported lazily by the dispatcher, and without triton the
import fails with an ImportError naming the ``gpu`` extra. On CPU, Triton runs only in its interpreter:
``TRITON_INTERPRET=1`` must be set before triton is first imported.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import (COMBINES, _check_alpha, _check_shapes, _check_temperature,
                                                      ensemble_weights)

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("compressor/kernels/tempered_kl_triton.py needs triton, which is not installed; "
                      "install the gpu extra: pip install 'compressor[gpu]'") from exc

MAX_SINGLE_BLOCK_C = 8192  # rows up to this many classes are held in one block and read once
ONLINE_BLOCK_C = 4096  # column block of the two-pass online softmax for wider rows
TILE_ELEMENTS = {"cuda": 8192, "cpu": 1 << 16}  # BLOCK_N · BLOCK_C budget; the interpreter likes big tiles


@triton.jit
def _online_lse_update(m, d, x):
    """Fold a block x [BLOCK_N, BLOCK_C] (−inf where masked) into a running row max m and sum d [BLOCK_N]."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all −inf row so far: avoid −inf − (−inf)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
    return m_new, d


@triton.jit
def _pairwise_lse_update(big_m, big_s, a):
    """Elementwise running logsumexp over members: fold a [BLOCK_N, BLOCK_C] into (max, sum) tiles."""
    m_new = tl.maximum(big_m, a)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a zero-weight member has a = −inf everywhere
    big_s = big_s * tl.exp(big_m - m_safe) + tl.exp(a - m_safe)
    return m_new, big_s


@triton.jit
def _weighted_member_sum(t_ptr, w_ptr, offs, mask, K, member_stride, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ_k w_k t_k over one [BLOCK_N, BLOCK_C] tile of the (K, N, C) teacher logits: the geometric mixture's logits."""
    g = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    t_k = t_ptr
    for k in range(K):
        g += tl.load(w_ptr + k) * tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32)
        t_k += member_stride
    return g


@triton.jit
def _rows_in_one_block(
    s_ptr, t_ptr, w_ptr, grad_ptr, row_mask, row_off, y, has_label, C, K, member_stride, temperature, alpha,
    inv_n, GEOMETRIC: tl.constexpr, FROM_LOG_PROBS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The whole row fits one column block (BLOCK_C >= C): one read of every input, no online softmax. Writes the
    gradient of the block's rows and returns their KL (BLOCK_N,) and log-sum-exp of the untempered student."""
    inv_t = 1.0 / temperature
    neg_inf = float("-inf")
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask = row_mask[:, None] & (cols[None, :] < C)  # (BLOCK_N, BLOCK_C)
    offs = row_off + cols[None, :]
    s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m_q, d_q = _online_lse_update(tl.full([BLOCK_N], neg_inf, tl.float32), tl.zeros([BLOCK_N], tl.float32),
                                  tl.where(mask, s * inv_t, neg_inf))
    m_1, d_1 = _online_lse_update(tl.full([BLOCK_N], neg_inf, tl.float32), tl.zeros([BLOCK_N], tl.float32),
                                  tl.where(mask, s, neg_inf))
    if FROM_LOG_PROBS:
        log_p = tl.where(mask, tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32), neg_inf)
    elif GEOMETRIC:
        g = _weighted_member_sum(t_ptr, w_ptr, offs, mask, K, member_stride, BLOCK_N, BLOCK_C)
        z = tl.where(mask, g * inv_t, neg_inf)
        m_g, d_g = _online_lse_update(tl.full([BLOCK_N], neg_inf, tl.float32),
                                      tl.zeros([BLOCK_N], tl.float32), z)
        log_p = z - (m_g + tl.log(d_g))[:, None]
    else:
        big_m = tl.full([BLOCK_N, BLOCK_C], neg_inf, tl.float32)
        big_s = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        t_k = t_ptr
        for k in range(K):
            z = tl.where(mask, tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32) * inv_t, neg_inf)
            m_k, d_k = _online_lse_update(tl.full([BLOCK_N], neg_inf, tl.float32),
                                          tl.zeros([BLOCK_N], tl.float32), z)
            # log w_k + log softmax(t_k / T), folded into the running logsumexp over members
            big_m, big_s = _pairwise_lse_update(big_m, big_s, z + (tl.log(tl.load(w_ptr + k)) - m_k
                                                                   - tl.log(d_k))[:, None])
            t_k += member_stride
        log_p = big_m + tl.log(big_s)
    lse_q = m_q + tl.log(d_q)
    lse_1 = m_1 + tl.log(d_1)
    log_q = s * inv_t - lse_q[:, None]
    p = tl.exp(log_p)
    kl = tl.sum(tl.where(mask & (p > 0), p * (log_p - log_q), 0.0), axis=1)  # 0 · log 0 = 0
    hard = tl.where(has_label[:, None], tl.exp(s - lse_1[:, None])
                    - tl.where(cols[None, :] == y[:, None], 1.0, 0.0), 0.0)
    grad = (alpha * temperature * (tl.exp(log_q) - p) + (1.0 - alpha) * hard) * inv_n
    tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    return kl, m_1 + tl.log(d_1)


@triton.jit
def _rows_in_column_blocks(
    s_ptr, t_ptr, w_ptr, grad_ptr, row_mask, row_off, y, has_label, C, K, member_stride, temperature, alpha,
    inv_n, GEOMETRIC: tl.constexpr, FROM_LOG_PROBS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Rows wider than one column block: pass 1 runs the online softmax statistics over the blocks, pass 2 writes
    the soft target, loss terms and gradient block by block. Returns KL (BLOCK_N,) and the untempered lse."""
    inv_t = 1.0 / temperature
    neg_inf = float("-inf")
    kidx = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    # ---- pass 1: running max / sum over column blocks
    m_q = tl.full([BLOCK_N], neg_inf, tl.float32)
    d_q = tl.zeros([BLOCK_N], tl.float32)
    m_1 = tl.full([BLOCK_N], neg_inf, tl.float32)
    d_1 = tl.zeros([BLOCK_N], tl.float32)
    m_g = tl.full([BLOCK_N], neg_inf, tl.float32)
    d_g = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols[None, :] < C)
        offs = row_off + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_q, d_q = _online_lse_update(m_q, d_q, tl.where(mask, s * inv_t, neg_inf))
        m_1, d_1 = _online_lse_update(m_1, d_1, tl.where(mask, s, neg_inf))
        if GEOMETRIC and not FROM_LOG_PROBS:
            g = _weighted_member_sum(t_ptr, w_ptr, offs, mask, K, member_stride, BLOCK_N, BLOCK_C)
            m_g, d_g = _online_lse_update(m_g, d_g, tl.where(mask, g * inv_t, neg_inf))
    lse_q = m_q + tl.log(d_q)
    lse_1 = m_1 + tl.log(d_1)
    lse_g = m_g + tl.log(d_g)
    # arithmetic: b_k = log w_k − lse_k(t_k / T) per row, kept in a (BLOCK_N, BLOCK_K) register tile
    b_tile = tl.full([BLOCK_N, BLOCK_K], neg_inf, tl.float32)
    if not GEOMETRIC and not FROM_LOG_PROBS:
        t_k = t_ptr
        for k in range(K):
            m_k = tl.full([BLOCK_N], neg_inf, tl.float32)
            d_k = tl.zeros([BLOCK_N], tl.float32)
            for start in range(0, C, BLOCK_C):
                cols = start + tl.arange(0, BLOCK_C)
                mask = row_mask[:, None] & (cols[None, :] < C)
                z = tl.load(t_k + row_off + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_t
                m_k, d_k = _online_lse_update(m_k, d_k, tl.where(mask, z, neg_inf))
            b_k = tl.log(tl.load(w_ptr + k)) - (m_k + tl.log(d_k))  # (BLOCK_N,)
            b_tile = tl.where(kidx[None, :] == k, b_k[:, None], b_tile)
            t_k += member_stride

    # ---- pass 2: soft target, loss terms and gradient, block by block
    kl = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = row_mask[:, None] & (cols[None, :] < C)
        offs = row_off + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if FROM_LOG_PROBS:
            log_p = tl.where(mask, tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32), neg_inf)
        elif GEOMETRIC:
            g = _weighted_member_sum(t_ptr, w_ptr, offs, mask, K, member_stride, BLOCK_N, BLOCK_C)
            log_p = tl.where(mask, g * inv_t - lse_g[:, None], neg_inf)
        else:
            big_m = tl.full([BLOCK_N, BLOCK_C], neg_inf, tl.float32)
            big_s = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
            t_k = t_ptr
            for k in range(K):
                b_k = tl.max(tl.where(kidx[None, :] == k, b_tile, neg_inf), axis=1)  # (BLOCK_N,)
                z = tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32) * inv_t
                big_m, big_s = _pairwise_lse_update(big_m, big_s, tl.where(mask, z + b_k[:, None], neg_inf))
                t_k += member_stride
            log_p = big_m + tl.log(big_s)
        log_q = s * inv_t - lse_q[:, None]
        p = tl.exp(log_p)
        kl += tl.sum(tl.where(mask & (p > 0), p * (log_p - log_q), 0.0), axis=1)  # 0 · log 0 = 0
        hard = tl.where(has_label[:, None], tl.exp(s - lse_1[:, None])
                        - tl.where(cols[None, :] == y[:, None], 1.0, 0.0), 0.0)
        grad = (alpha * temperature * (tl.exp(log_q) - p) + (1.0 - alpha) * hard) * inv_n
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)

    return kl, lse_1


@triton.jit
def _tempered_kl_fwd_kernel(
    s_ptr,  # (N, C) student logits, any float dtype
    t_ptr,  # (K, N, C) teacher logits, or (N, C) teacher log-probs at T when FROM_LOG_PROBS
    w_ptr,  # (K,) fp32 member weights, normalised to sum to 1 (unused when FROM_LOG_PROBS)
    y_ptr,  # (N,) int64 labels, -1 = unlabeled
    loss_ptr,  # (N,) fp32 out: per-row loss (not yet averaged)
    grad_ptr,  # (N, C) out, student dtype: gradient of the mean loss w.r.t. the student logits
    N, C, K,
    member_stride,  # N · C: elements between consecutive teacher members
    temperature, alpha, inv_n,
    GEOMETRIC: tl.constexpr,  # mixture of members: False = arithmetic (probability space), True = geometric
    FROM_LOG_PROBS: tl.constexpr,  # t_ptr holds the mixture's log-probs, K is ignored
    SINGLE_BLOCK: tl.constexpr,  # BLOCK_C >= C: one read of every input, no online softmax
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,  # next power of two >= K: register tile of per-member log w_k − lse_k
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_mask = rows < N
    row_start = rows.to(tl.int64) * C  # (BLOCK_N,) int64: N · C may pass 2**31
    row_off = row_start[:, None]  # (BLOCK_N, 1)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)  # (BLOCK_N,)
    has_label = y >= 0
    s_y = tl.load(s_ptr + row_start + tl.maximum(y, 0), mask=row_mask & has_label, other=0.0).to(tl.float32)

    if SINGLE_BLOCK:
        kl, lse_1 = _rows_in_one_block(s_ptr, t_ptr, w_ptr, grad_ptr, row_mask, row_off, y, has_label, C, K,
                                       member_stride, temperature, alpha, inv_n, GEOMETRIC, FROM_LOG_PROBS, BLOCK_N,
                                       BLOCK_C, BLOCK_K)
    else:
        kl, lse_1 = _rows_in_column_blocks(s_ptr, t_ptr, w_ptr, grad_ptr, row_mask, row_off, y, has_label, C,
                                           K, member_stride, temperature, alpha, inv_n, GEOMETRIC, FROM_LOG_PROBS,
                                           BLOCK_N, BLOCK_C, BLOCK_K)

    ce = tl.where(has_label, lse_1 - s_y, 0.0)
    loss = alpha * temperature * temperature * kl + (1.0 - alpha) * ce
    tl.store(loss_ptr + rows, loss, mask=row_mask)


def tempered_kl_fwd_triton(student_logits: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float,
                           alpha: float, weights: Tensor | Sequence[float] | None = None,
                           combine: str = "arithmetic", *, from_log_probs: bool = False, block_c: int | None = None,
                           block_n: int | None = None, grad_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Launch the kernel: per-row losses (N,) fp32 and the gradient of their mean w.r.t. the student (N, C).

    ``teacher`` is (K, N, C) member logits, or with ``from_log_probs=True`` the mixture's (N, C) log-probs at
    ``temperature`` (then ``weights`` and ``combine`` must be left at their defaults). The gradient has the
    student's dtype. ``block_c`` / ``block_n`` (powers of two) override the tile; a ``block_c`` below C forces
    the two-pass online path. ``grad_out`` (N, C), student dtype, contiguous, receives the gradient in place of
    a fresh buffer (tests poison it with NaN to catch unwritten elements).
    """
    if from_log_probs:
        if weights is not None or combine != "arithmetic":
            raise ValueError("weights and combine describe how members mix; with teacher log-probs the mixture is "
                             "already made, so leave them unset")
        if teacher.ndim != 2 or teacher.shape != student_logits.shape:
            raise ValueError(f"teacher log-probs have shape {tuple(teacher.shape)} but student logits "
                             f"{tuple(student_logits.shape)}; expected both (N, C)")
        n, c = _check_shapes(student_logits, teacher[None], labels)
    else:
        n, c = _check_shapes(student_logits, teacher, labels)
        if combine not in COMBINES:
            raise ValueError(f"combine={combine!r} is not one of {', '.join(map(repr, COMBINES))}")
    _check_temperature(temperature)
    _check_alpha(alpha)
    device = student_logits.device
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("tempered_kl_triton got CPU tensors, but Triton runs on CPU only in its interpreter: set "
                         "TRITON_INTERPRET=1 before importing triton, or use the reference implementation")
    for name, tensor in (("student logits", student_logits), ("teacher", teacher)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} have dtype {tensor.dtype}; expected float32, bfloat16 or float16")

    k = 1 if from_log_probs else teacher.shape[0]
    s = student_logits.contiguous()  # (N, C)
    t = teacher.contiguous()  # (K, N, C) or (N, C)
    w = ensemble_weights(None if from_log_probs else weights, k, torch.empty(0, device=device))  # (K,) fp32
    w = w.to(torch.float32).contiguous()
    y = (torch.full((n,), -1, dtype=torch.int64, device=device) if labels is None
         else labels.to(torch.int64).contiguous())  # (N,)
    loss = torch.empty(n, dtype=torch.float32, device=device)  # (N,)
    if grad_out is None:
        grad = torch.empty_like(s)  # (N, C)
    else:
        if grad_out.shape != s.shape or grad_out.dtype != s.dtype or not grad_out.is_contiguous():
            raise ValueError(f"grad_out is {tuple(grad_out.shape)} {grad_out.dtype}; expected a contiguous "
                             f"{tuple(s.shape)} {s.dtype} buffer")
        grad = grad_out

    c_pow2 = triton.next_power_of_2(c)
    if block_c is None:
        block_c = c_pow2 if c_pow2 <= MAX_SINGLE_BLOCK_C else ONLINE_BLOCK_C
    if block_c < 1 or block_c & (block_c - 1):
        raise ValueError(f"block_c={block_c}: must be a power of two")
    block_c = min(block_c, c_pow2)
    if block_n is None:
        budget = TILE_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
        block_n = max(1, min(triton.next_power_of_2(n), budget // block_c))
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n}: must be a power of two")
    tile = block_n * block_c
    num_warps = 4 if tile <= 2048 else 8 if tile <= 8192 else 16

    grid = (triton.cdiv(n, block_n),)
    _tempered_kl_fwd_kernel[grid](
        s, t, w, y, loss, grad,
        n, c, k, n * c,
        float(temperature), float(alpha), 1.0 / n,
        GEOMETRIC=combine == "geometric", FROM_LOG_PROBS=from_log_probs, SINGLE_BLOCK=block_c >= c,
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_K=triton.next_power_of_2(k),
        num_warps=num_warps,
    )
    return loss, grad


class TemperedKLFunction(torch.autograd.Function):
    """Autograd wrapper: forward runs the fused kernel and keeps only the (N, C) student gradient.

    The backward returns that stored gradient times grad_output. Only the student logits get a gradient: the
    teacher logits (or log-probs), labels and weights get none (None), as teachers are frozen in distillation.
    """

    @staticmethod
    def forward(ctx, student_logits: Tensor, teacher: Tensor, labels: Tensor | None, temperature: float,
                alpha: float, weights: Tensor | Sequence[float] | None, combine: str,
                from_log_probs: bool) -> Tensor:
        loss, grad = tempered_kl_fwd_triton(student_logits, teacher, labels, temperature, alpha, weights, combine,
                                            from_log_probs=from_log_probs)
        ctx.save_for_backward(grad)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None, None, None, None


def tempered_kl_triton(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                       alpha: float, weights: Tensor | Sequence[float] | None = None,
                       combine: str = "arithmetic") -> Tensor:
    """The distillation loss (a 0-dim fp32 tensor) from (K, N, C) teacher logits; differentiable in the student.

    Same contract as :func:`~compressor.kernels.tempered_kl_reference.tempered_kl_reference`:
    ``student_logits`` (N, C), ``teacher_logits`` (K, N, C), ``labels`` (N,) with -1 for unlabeled rows or
    None, ``weights`` (K,) normalised to sum to 1 (None = uniform), ``combine`` "arithmetic" or "geometric".
    Teacher logits get no gradient.

    Example::

        loss = tempered_kl_triton(student(x), teacher_logits, y, temperature=4.0, alpha=0.9)
        loss.backward()
    """
    return TemperedKLFunction.apply(student_logits, teacher_logits, labels, temperature, alpha, weights, combine,
                                    False)


def tempered_kl_triton_from_log_probs(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None,
                                      temperature: float, alpha: float) -> Tensor:
    """The distillation loss from the ensemble's precomputed (N, C) log-probs at T; traffic independent of K.

    The mixture-input form, matching
    :func:`~compressor.kernels.tempered_kl_reference.tempered_kl_reference_from_log_probs`. Teacher log-probs
    get no gradient.
    """
    return TemperedKLFunction.apply(student_logits, teacher_log_probs, labels, temperature, alpha, None,
                                    "arithmetic", True)
