"""The distillation loss on the CPU: loss and analytic gradient in one chunked pass, no autograd graph.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531). Same loss
as :func:`compressor.kernels.tempered_kl_reference.tempered_kl_reference`, which is the specification:

    L = mean over rows of  α · T² · KL(p_T ‖ softmax(s / T))  +  (1 − α) · CE(softmax(s), y)

Why this is faster than eager PyTorch: the reference materialises several (K, N, C) and (N, C) tensors
and autograd keeps them for backward; on a CPU each fresh 82 MB buffer costs ~40 ms just to fault in.
Here the forward walks over chunks of rows, small enough that the (K, rows, C) temporaries stay in the
L2 cache and are reused chunk after chunk, and writes the gradient with respect to the student logits
as it goes (the same design as the Triton kernel). The only (N, C) tensor allocated is that gradient;
backward scales it by grad_output in place. Per row n, with q = softmax(s/T) and p the soft target:

    ∂L/∂s_c = [ α·T·(q_c − p_c) + (1 − α)·(softmax(s)_c − 1[c = y])·1[y ≥ 0] ] / N

Measured on a 2-core x86-64 CPU at (N, C, K) = (4096, 1000, 5) fp32, forward+backward
(benchmarks/RESULTS.md): eager reference 398 ms and 269 MiB peak; torch.compile 168 ms and 110 MiB after
a cold compile of ~40 s that recompiles whenever T, N or K change; this module 74 ms and 17 MiB. Its
building blocks are ATen's fused (log_)softmax kernels on cache-resident chunks, BLAS dot products for
the loss sums, and one worker thread per intra-op thread (see CHUNK_ELEMENTS and _loss_and_grad).

Teacher logits receive no gradient (they are targets; the returned gradient for them is None).
Inputs may be float64 (computed in float64), float32, bfloat16 or float16 (computed in float32); the
gradient comes back in the student's dtype.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import (COMBINES, _check_alpha, _check_shapes, _check_temperature,
                                                      ensemble_weights)

__all__ = ["CHUNK_ELEMENTS", "tempered_kl_cpu", "tempered_kl_cpu_from_log_probs"]

# Elements (rows · C) per chunk. Measured at (4096, 1000, 5) fp32 fwd+bwd on the 2-core CPU (busy, so
# medians are noisy): 8K elements 324 ms, 16K 181 ms, 32K 150 ms, 64K 72 ms, 256K 106 ms. At 64K each
# (rows, C) fp32 buffer is 256 KB; a worker's five of them fit its core's 2 MB L2.
CHUNK_ELEMENTS = 65536


def tempered_kl_cpu(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                    alpha: float, weights: Tensor | Sequence[float] | None = None, combine: str = "arithmetic",
                    *, chunk_rows: int | None = None) -> Tensor:
    """The distillation loss (a 0-dim tensor, float32 or float64), averaged over all N rows.

    ``student_logits`` (N, C) on the CPU; ``teacher_logits`` (K, N, C); ``labels`` (N,) int with -1 for
    unlabeled rows, or None. ``weights`` (K,) and ``combine`` as in the reference. Differentiable in the
    student logits only. ``chunk_rows`` overrides the number of rows per chunk (default: CHUNK_ELEMENTS // C).

    Example::

        loss = tempered_kl_cpu(student(x), teacher_logits, y, temperature=4.0, alpha=0.9)
        loss.backward()
    """
    _check_shapes(student_logits, teacher_logits, labels)
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(map(repr, COMBINES))}")
    _check_common(student_logits, temperature, alpha)
    w = ensemble_weights(weights, teacher_logits.shape[0], torch.empty(0, dtype=torch.float64)).tolist()
    return _TemperedKLCPU.apply(student_logits, teacher_logits, labels, float(temperature), float(alpha),
                                w, combine, chunk_rows)


def tempered_kl_cpu_from_log_probs(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None,
                                   temperature: float, alpha: float, *, chunk_rows: int | None = None) -> Tensor:
    """The same loss from the ensemble's tempered soft target given as (N, C) log-probabilities.

    ``teacher_log_probs`` is ``log p_T``, e.g. from :func:`ensemble_log_probs` (-inf allowed where p = 0);
    use this form when the mixture is cached or shared across steps. Differentiable in the student only.
    """
    if teacher_log_probs.ndim != 2:
        raise ValueError(f"teacher log-probabilities have shape {tuple(teacher_log_probs.shape)}; expected (N, C)")
    _check_shapes(student_logits, teacher_log_probs[None], labels)
    _check_common(student_logits, temperature, alpha)
    return _TemperedKLCPU.apply(student_logits, teacher_log_probs[None], labels, float(temperature), float(alpha),
                                [1.0], "log_probs", chunk_rows)


def _check_common(student_logits: Tensor, temperature: float, alpha: float) -> None:
    _check_temperature(temperature)
    _check_alpha(alpha)
    if student_logits.device.type != "cpu":
        raise ValueError(f"tempered_kl_cpu got inputs on {student_logits.device}; it runs on the CPU only — "
                         f"use tempered_kl(..., impl='auto') to pick the implementation for the device")


class _TemperedKLCPU(torch.autograd.Function):
    """Forward computes the loss and stores ∂L/∂s (N, C); backward scales that gradient by grad_output."""

    @staticmethod
    def forward(ctx, s, t, y, temperature, alpha, w, combine, chunk_rows):
        need_grad = ctx.needs_input_grad[0]
        loss, grad = _loss_and_grad(s, t, y, temperature, alpha, w, combine, chunk_rows, need_grad)
        ctx.grad = grad  # (N, C) student dtype, or None
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("tempered_kl_cpu: backward ran twice on the same loss; its stored gradient is "
                               "consumed by the first backward — recompute the loss instead of retain_graph=True")
        ctx.grad = None  # scaled in place and handed over: no second (N, C) allocation
        if not (grad_output.ndim == 0 and float(grad_output) == 1.0):
            grad.mul_(grad_output.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def _loss_and_grad(s: Tensor, t: Tensor, y: Tensor | None, temperature: float, alpha: float, w: list[float],
                   combine: str, chunk_rows: int | None, need_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Loss (0-dim, compute dtype) and ∂L/∂s (N, C, student dtype; None unless need_grad), chunk by chunk."""
    k, n, c = t.shape
    cd = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # compute dtype
    if chunk_rows is None:
        chunk_rows = CHUNK_ELEMENTS // c
    rows = max(1, min(n, int(chunk_rows)))
    if y is not None:
        y = y.long()
    grad = torch.empty(n, c, dtype=s.dtype) if need_grad else None  # (N, C)
    args = (s.detach(), t.detach(), y, grad, temperature, alpha, w, combine, rows, cd)
    # One worker thread per intra-op thread, each over its own contiguous rows and its own buffers. Measured
    # against ATen's own intra-op parallelism on the same chunks (one Python thread): that was 2.5-10x
    # slower here, because every small op then pays an OpenMP fork/join, and on a loaded machine a barrier
    # that waits for a descheduled thread.
    workers = min(torch.get_num_threads(), -(-n // rows))
    if workers <= 1:
        total = _rows_loss_and_grad(0, n, *args)
    else:  # contiguous row ranges, one per worker; ATen ops release the GIL
        bounds = [round(n * i / workers / rows) * rows for i in range(workers)] + [n]
        with ThreadPoolExecutor(workers) as pool:
            total = sum(pool.map(lambda i: _rows_loss_and_grad(bounds[i], bounds[i + 1], *args), range(workers)))
    return torch.tensor(total / n, dtype=cd), grad


def _rows_loss_and_grad(start: int, stop: int, s: Tensor, t: Tensor, y: Tensor | None, grad: Tensor | None,
                        temperature: float, alpha: float, w: list[float], combine: str, rows: int,
                        cd: torch.dtype) -> float:
    """Σ of the per-row loss over rows [start, stop), writing grad[start:stop] when grad is given."""
    k, n, c = t.shape
    inv_t, soft_w, hard_w = 1.0 / temperature, alpha, 1.0 - alpha
    soft = soft_w > 0.0
    hard = hard_w > 0.0 and y is not None
    if hard:
        labeled = y >= 0  # (N,)
        hard = bool(labeled[start:stop].any())
    tiny = torch.finfo(cd).tiny  # log(max(p, tiny)) turns 0 · log 0 into 0 · finite = 0

    # Per-chunk buffers, allocated once per worker and reused: they stay cache-resident across chunks.
    tk = torch.empty(rows, c, dtype=cd)  # (R, C) one member's probabilities; scratch
    p = torch.empty(rows, c, dtype=cd)  # (R, C) soft target
    logq = torch.empty(rows, c, dtype=cd)  # (R, C) log softmax(s/T), then q
    h = torch.empty(rows, c, dtype=cd) if hard else None  # (R, C) log softmax(s), then softmax(s)
    gbuf = None if grad is None or grad.dtype == cd else torch.empty(rows, c, dtype=cd)  # (R, C) for bf16/fp16
    total = 0.0  # Σ over rows of the per-row loss, accumulated in double precision

    for i in range(start, stop, rows):
        j = min(i + rows, stop)
        r = j - i
        pc, lq, scratch = p[:r], logq[:r], tk[:r]
        sc = s[i:j]  # (r, C) student dtype
        if soft:
            _soft_target(t[:, i:j], pc, scratch, inv_t, w, combine)  # (r, C)
            lq.copy_(sc).mul_(inv_t)
            torch._log_softmax(lq, -1, False, out=lq)  # (r, C) log q
            # Σ p (log p − log q), with 0 · log 0 = 0: log p from max(p, tiny).
            torch.clamp_min(pc, tiny, out=scratch).log_().sub_(lq)
            total += soft_w * temperature * temperature * float(torch.dot(pc.view(-1), scratch.view(-1)))
        if hard:
            hc, lab = h[:r], labeled[i:j]
            yc = y[i:j].clamp_min(0)[:, None]  # (r, 1)
            hc.copy_(sc)
            torch._log_softmax(hc, -1, False, out=hc)  # (r, C) log softmax(s)
            picked = hc.gather(1, yc)[:, 0]  # (r,) log softmax(s)[y]
            total -= hard_w * float(picked[lab].sum())
        if grad is None:
            continue
        g = grad[i:j] if gbuf is None else gbuf[:r]  # (r, C)
        if soft:
            lq.exp_()  # q
            torch.sub(lq, pc, out=g).mul_(soft_w * temperature / n)
        else:
            g.zero_()
        if hard:
            coef = lab.to(cd) * (hard_w / n)  # (r,) 0 on unlabeled rows
            g.addcmul_(hc.exp_(), coef[:, None])
            g.scatter_add_(1, yc, -coef[:, None])
        if gbuf is not None:
            grad[i:j].copy_(g)
    return total


def _soft_target(tc: Tensor, out: Tensor, tk: Tensor, inv_t: float, w: list[float], combine: str) -> None:
    """Write the soft target p (r, C) for a chunk of teacher logits tc (K, r, C) into ``out``; tk is scratch."""
    if combine == "log_probs":  # tc is (1, r, C) log p already
        torch.exp(tc[0], out=out) if tc.dtype == out.dtype else out.copy_(tc[0]).exp_()
        return
    if combine == "geometric":  # softmax(Σ_k w_k t_k / T)
        torch.mul(tc[0], w[0], out=out) if tc.dtype == out.dtype else out.copy_(tc[0]).mul_(w[0])
        for k in range(1, len(w)):
            out.add_(tc[k], alpha=w[k])
        out.mul_(inv_t)
        torch._softmax(out, -1, False, out=out)
        return
    # arithmetic: Σ_k w_k softmax(t_k / T), each member's softmax by ATen's fused, max-subtracted kernel.
    out.zero_()
    for k in range(len(w)):
        tk.copy_(tc[k]).mul_(inv_t)
        torch._softmax(tk, -1, False, out=tk)
        out.add_(tk, alpha=w[k])
