"""The distillation loss on the CPU: loss and analytic gradient in one chunked pass, no autograd graph.

Hinton et al. 2015 (arXiv:1503.02531); the specification is :func:`.tempered_kl_reference.tempered_kl_reference`:

    L = mean over rows of  α · T² · KL(p_T ‖ softmax(s / T))  +  (1 − α) · CE(softmax(s), y)

Why this is faster than eager PyTorch: eager code (the reference, or the formula a user writes by hand with
softmax, kl_div and cross_entropy) materialises several (K, N, C) and (N, C) tensors and autograd keeps them
for backward; on this CPU every fresh 82 MB buffer costs ~30 ms of page faults before any arithmetic. Here
the forward walks over chunks of rows whose temporaries stay in cache and are reused chunk after chunk, and
writes the gradient with respect to the student logits as it goes (the same design as the Triton kernel).
The only (N, C) tensor allocated is that gradient, which autograd adopts as ``.grad`` without a copy;
backward scales it by grad_output in place. Per row n, with q = softmax(s/T) and p the soft target:

    ∂L/∂s_c = [ α·T·(q_c − p_c) + (1 − α)·(softmax(s)_c − 1[c = y])·1[y ≥ 0] ] / N

Per chunk that is K + 3 transcendental passes over (rows, C) — one softmax call for all K members, log p,
softmax(s/T), softmax(s) — with the log-sum-exps read off the softmaxes (see _Pass.run) instead of extra
log_softmax/exp passes. The chunks are shared out to one worker thread per intra-op thread, each running
its ATen ops single-threaded (see _Workers for why not ATen's own intra-op parallelism).

Measured on the 2-core CPU, fp32, forward+backward, interleaved with the plain eager formula and the reference
in one process (benchmarks/RESULTS.md, 2026-12-02): 3.8-5.0x the eager formula at (N, C, K) = (4096, 1000, 5)
and 5.5-6.5x at (512, 32000, 3), 8-10x the reference, at 22.9 / 68.4 MiB peak against 156 / 375 MiB.

Teacher logits receive no gradient (they are targets; the returned gradient for them is None).
Inputs may be float64 (computed in float64), float32, bfloat16 or float16 (computed in float32); the
gradient comes back in the student's dtype.
"""

from __future__ import annotations

import itertools
import math
import os
import queue
import threading
from concurrent.futures import Future
from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import (COMBINES, _check_alpha, _check_shapes, _check_temperature,
                                                      ensemble_weights)

__all__ = ["CHUNK_ELEMENTS", "tempered_kl_cpu", "tempered_kl_cpu_from_log_probs"]

# Elements (rows · C) per chunk: the fastest of 48K-256K at both benchmark shapes (RESULTS.md); smaller chunks pay
# more per-op Python dispatch than they gain from cache.
CHUNK_ELEMENTS = 131072


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
    n, c = s.shape
    workers = _workers()
    if chunk_rows is not None:
        rows = max(1, min(n, int(chunk_rows)))
    else:  # and at least one chunk per worker, so that a small batch still uses every worker
        rows = max(1, min(default_chunk_rows(c), -(-n // (1 if workers is None else workers.size))))
    work = _Pass(s.detach(), t.detach(), y, temperature, alpha, w, combine, rows, need_grad)
    if workers is None:  # one intra-op thread, or not OpenMP: in the calling thread, ATen's threads as usual
        work.run()
    else:  # even a single chunk: a worker's single-threaded ops wait on no OpenMP barrier
        workers.run(work.run, min(workers.size, work.chunks))
    grad, work.grad = work.grad, None
    # Nothing but the caller may hold grad now: autograd then adopts it as x.grad instead of copying it (a
    # second (N, C) buffer, page faults and a copy: 7-30 ms at the benchmark shapes).
    return work.loss(), grad


class _Pass:
    """One forward: inputs, the (N,)-sized partial results and ∂L/∂s, shared by the workers that fill them.

    Each worker calls :meth:`run`, which takes the next unclaimed chunk of rows until none is left (dynamic,
    so a worker whose core is busy with another process simply takes fewer chunks), using scratch buffers of
    its own. Chunks write disjoint rows of ``grad``, ``s_max``, ``h_max`` and one entry of ``kl_parts``.
    """

    def __init__(self, s: Tensor, t: Tensor, y: Tensor | None, temperature: float, alpha: float, w: list[float],
                 combine: str, rows: int, need_grad: bool):
        k, n, c = t.shape
        self.s, self.t, self.temperature, self.alpha, self.combine, self.rows = s, t, temperature, alpha, combine, rows
        self.cd = cd = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # compute dtype
        self.soft = alpha > 0.0
        labeled = (y >= 0) if alpha < 1.0 and y is not None else None  # (N,) bool
        self.hard = labeled is not None and bool(labeled.any())  # all labels -1: no hard term at all
        self.grad = torch.empty(n, c, dtype=s.dtype) if need_grad else None  # (N, C), the only (N, C) allocation
        self.chunks = -(-n // rows)
        self._claimed = itertools.count()  # next() hands each chunk index to exactly one worker
        self.w_row = torch.tensor([w], dtype=cd)  # (1, K): the mixture is one (1, K) @ (K, r·C) product
        if combine == "geometric":
            self.w_row.mul_(1.0 / temperature)  # softmax(Σ_k w_k t_k / T): fold 1/T into the weights
        self.kl_parts = torch.zeros(self.chunks, dtype=cd) if self.soft else None  # Σ p (log p − log q) per chunk
        if self.hard:
            self.labeled = labeled
            self.y_col = y.long().clamp_min(0)[:, None]  # (N, 1) label, 0 on unlabeled rows (masked by coef)
            self.coef = labeled.to(cd).mul_((1.0 - alpha) / n)[:, None]  # (N, 1) hard-term grad weight, 0 at y = -1
            self.neg_coef = -self.coef  # (N, 1)
            self.s_max = torch.empty(n, dtype=cd)  # (N,) max_c s
            self.h_max = torch.empty(n, dtype=cd)  # (N,) max_c softmax(s) = 1 / Σ_c exp(s − max s)

    def run(self) -> None:
        """Process chunks until every chunk is claimed."""
        k, n, c = self.t.shape
        rows, cd, soft, hard, grad = self.rows, self.cd, self.soft, self.hard, self.grad
        temperature, alpha = self.temperature, self.alpha
        inv_t, soft_scale = 1.0 / temperature, alpha * temperature / n
        tiny = torch.finfo(cd).tiny  # log(p + tiny): 0 · log 0 becomes 0 · finite = 0, other p unchanged
        members_in_one = soft and self.combine == "arithmetic" and k > 1
        widen = grad is not None and grad.dtype != cd  # bf16/fp16 student: gradient computed in float32 first
        # Scratch, allocated once per worker and reused chunk after chunk, so it stays cache-resident. (Also
        # keeping it across calls, to spare its page faults, measured 1-3% faster: not worth holding on to.)
        # members is flat so that a short last chunk still gets a contiguous (K, r, C) view of it.
        members = torch.empty((k if members_in_one else 1) * rows * c, dtype=cd) if soft else None  # (K·R·C,)
        p_buf = torch.empty(rows, c, dtype=cd) if soft else None  # (R, C) soft target p
        x_buf = torch.empty(rows, c, dtype=cd)  # (R, C) s / T, then softmax(s)
        q_buf = torch.empty(rows, c, dtype=cd) if soft else None  # (R, C) q = softmax(s / T)
        g_buf = torch.empty(rows, c, dtype=cd) if widen else None  # (R, C) gradient before the narrowing copy

        for chunk in self._claimed:  # shared by the workers: count's next() is atomic under the GIL
            if chunk >= self.chunks:
                return
            i = chunk * rows
            j = min(i + rows, n)
            r = j - i
            x = x_buf[:r]  # (r, C)
            sc = self.s[i:j]  # (r, C) student dtype
            g = None if grad is None else g_buf[:r] if widen else grad[i:j]  # (r, C)
            if soft:
                p, q = p_buf[:r], q_buf[:r]  # (r, C)
                diff = members[:r * c].view(r, c)  # (r, C) log p − log q, where the members were
                probs = members[:k * r * c].view(k, r, c) if members_in_one else None  # (K, r, C)
                has_log_p = _soft_target(self.t[:, i:j], p, diff, probs, inv_t, self.w_row, self.combine)
                _scaled(sc, inv_t, x)  # (r, C) s / T
                # q by ATen's softmax (its exp is faster than torch.exp), and logsumexp(x) from two cheap max
                # reductions instead of a log_softmax pass: the largest q is 1 / Σ exp(x − max x) ≥ 1/C.
                lse = torch.amax(x, -1, keepdim=True)  # (r, 1) max x, then logsumexp x
                _softmax(x, q)  # (r, C) q
                lse.sub_(torch.amax(q, -1, keepdim=True).log_())
                if not has_log_p:
                    torch.add(p, tiny, out=diff).log_()  # (r, C) log p
                # log p − log q = log p − x + lse: small terms, so the fp32 dot below stays accurate
                diff.sub_(x).add_(lse)
                torch.dot(p.view(-1), diff.view(-1), out=self.kl_parts[chunk])
                if g is not None:
                    torch.sub(q, p, out=g).mul_(soft_scale)  # α·T·(q − p) / N
            if hard:
                h = x  # (r, C) s / T is no longer needed
                src = sc if sc.dtype == cd else h.copy_(sc)  # (r, C) s in the compute dtype
                # log softmax(s)_y = s_y − lse(s), lse(s) = max s − log max softmax(s), summed in loss()
                torch.amax(src, -1, out=self.s_max[i:j])
                _softmax(src, h)  # (r, C) softmax(s)
                torch.amax(h, -1, out=self.h_max[i:j])
                if g is not None:
                    if soft:
                        g.addcmul_(h, self.coef[i:j])  # + (1 − α)·softmax(s) / N on labeled rows
                    else:
                        torch.mul(h, self.coef[i:j], out=g)
                    g.scatter_add_(1, self.y_col[i:j], self.neg_coef[i:j])  # − (1 − α)·1[c = y] / N
            elif g is not None and not soft:
                g.zero_()  # α = 0 and no labeled row: the loss is 0
            if widen:
                grad[i:j].copy_(g)

    def loss(self) -> Tensor:
        """The mean per-row loss (0-dim, compute dtype), summed in double precision from the partial results."""
        n, temperature = self.s.shape[0], self.temperature
        total = torch.zeros((), dtype=torch.float64)
        if self.soft:
            total += self.alpha * temperature * temperature * self.kl_parts.double().sum()
        if self.hard:
            lse = self.s_max.double() - self.h_max.double().log()  # (N,) logsumexp_c s
            picked = self.s.gather(1, self.y_col)[:, 0].double()  # (N,) s_y
            total += (1.0 - self.alpha) * (lse - picked)[self.labeled].sum()
        return (total / n).to(self.cd)


class _Workers:
    """Persistent daemon threads whose ATen ops each run on a single intra-op thread.

    Why, measured on the 2-core CPU:

    - An ATen op called from a plain Python thread opens an OpenMP team of its own (torch's default thread
      count), so the previous design's two workers ran four spinning threads on two cores: a 64K-element
      softmax took 63 µs in such a worker against 16 µs in the main thread.
    - Every op in the calling thread on ATen's intra-op threads instead was about as fast on a quiet machine,
      but each op then ends in an OpenMP barrier that waits for whichever thread is descheduled: with another
      process busy on one core, a 25 µs softmax took 12 ms, and the whole loss at (4096, 1000, 5) 4.5 s
      against 44-76 ms single-threaded or with workers.

    So each worker sets its own OpenMP thread count to 1 and the workers share no barrier but the final
    join. Under the OpenMP backend torch.set_num_threads sets the calling thread's OpenMP (and MKL)
    thread count, plus the process-wide default that threads started later take up, which __init__ restores.
    """

    def __init__(self, size: int):
        self.size = size
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        started = threading.Barrier(size + 1)
        for _ in range(size):
            threading.Thread(target=self._serve, args=(started,), daemon=True, name="tempered-kl-cpu").start()
        started.wait()
        # torch.set_num_threads(1) in the workers also lowered the default that threads created later start
        # with; put it back (the calling thread's own setting is `size` already, so nothing else changes).
        torch.set_num_threads(size)

    def _serve(self, started: threading.Barrier) -> None:
        torch.get_num_threads()  # initialise this thread's OpenMP setting now, so it is not reset on first use
        torch.set_num_threads(1)
        started.wait()
        while (task := self._tasks.get()) is not None:
            fn, future = task
            try:
                future.set_result(fn())
            except BaseException as error:  # handed to the caller, which re-raises it
                future.set_exception(error)
            del task, fn, future  # while idle, keep no reference to the last call's tensors

    def run(self, fn, count: int) -> None:
        """Call ``fn()`` in ``count`` workers at once and wait for all of them; then re-raise the first error."""
        futures = [Future() for _ in range(count)]
        for future in futures:
            self._tasks.put((fn, future))
        errors = [future.exception() for future in futures]  # waits: no worker is still writing afterwards
        for error in errors:
            if error is not None:
                raise error

    def close(self) -> None:
        for _ in range(self.size):
            self._tasks.put(None)


_POOL: _Workers | None = None
_POOL_LOCK = threading.Lock()
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _workers() -> _Workers | None:
    """The worker pool sized to the caller's intra-op thread count, or None to run inline.

    None when there is one intra-op thread, or when ATen's parallel backend is not OpenMP (there
    torch.set_num_threads resizes one shared pool, so per-worker single-threading is not available).
    """
    global _POOL
    size = torch.get_num_threads()
    if size <= 1 or not _OPENMP:
        return None
    with _POOL_LOCK:
        if _POOL is None or _POOL.size != size:
            if _POOL is not None:
                _POOL.close()
            _POOL = _Workers(size)
        return _POOL


def _forget_pool_after_fork() -> None:
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()  # a forked child has none of the parent's threads


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def default_chunk_rows(c: int) -> int:
    """Rows per chunk for C classes: CHUNK_ELEMENTS // C, at least 1."""
    return max(1, CHUNK_ELEMENTS // c)


def _softmax(src: Tensor, out: Tensor) -> Tensor:
    """out = softmax(src) over the last dim (out may be src). Its largest entry is 1 / Σ exp(src − max src).

    ATen's fused kernel, except below 16 classes (one SIMD vector), where that kernel is slow per row: one
    thread, 409,600 elements, C = 8-15: 5.8-6.1 ms against 1.1-1.2 ms for the broadcast formula below; at
    C = 16-32 ATen's is 1.5-2.4x faster than the formula.
    """
    if src.shape[-1] >= 16:
        return torch._softmax(src, -1, False, out=out)
    torch.sub(src, src.amax(-1, keepdim=True), out=out).exp_()
    return out.div_(out.sum(-1, keepdim=True))


def _scaled(src: Tensor, scale: float, out: Tensor) -> Tensor:
    """out = src · scale, computed in out's dtype (a bf16/fp16 input is widened first, then scaled)."""
    if src.dtype == out.dtype:
        return torch.mul(src, scale, out=out)
    return out.copy_(src).mul_(scale)


def _soft_target(tc: Tensor, p: Tensor, log_p: Tensor, probs: Tensor | None, inv_t: float, w_row: Tensor,
                 combine: str) -> bool:
    """Write the soft target p (r, C) for a chunk of teacher logits tc (K, r, C); True if log_p holds log p too.

    ``probs`` (K, r, C) is scratch for the arithmetic mixture's member probabilities (None when K = 1 or for
    the other combines); ``w_row`` (1, K) the member weights (times 1/T for "geometric").
    """
    k, r, c = tc.shape
    if combine == "log_probs":  # tc is (1, r, C) log p already: no log pass needed
        if tc.dtype == p.dtype:
            torch.exp(tc[0], out=p)
            torch.clamp_min(tc[0], _log_tiny(p.dtype), out=log_p)
        else:
            log_p.copy_(tc[0])
            torch.exp(log_p, out=p)
            log_p.clamp_min_(_log_tiny(p.dtype))
        return True
    if combine == "geometric":  # softmax(Σ_k w_k t_k / T), the sum as one (1, K) @ (K, r·C) product
        if tc.dtype == p.dtype:
            torch.mm(w_row, tc.reshape(k, r * c), out=p.view(1, r * c))
        else:
            p.copy_(tc[0]).mul_(float(w_row[0, 0]))
            for m in range(1, k):
                p.add_(tc[m].to(p.dtype), alpha=float(w_row[0, m]))
        _softmax(p, p)
        return False
    # arithmetic: Σ_k w_k softmax(t_k / T). All K members in one scale op and one softmax call (ATen's fused,
    # max-subtracted kernel), then the weighted mean as one matrix-vector product.
    if k == 1:
        _softmax(_scaled(tc[0], inv_t, p), p)
        return False
    _scaled(tc, inv_t, probs)  # (K, r, C) t / T
    _softmax(probs, probs)
    torch.mm(w_row, probs.view(k, r * c), out=p.view(1, r * c))
    return False


def _log_tiny(dtype: torch.dtype) -> float:
    """log of the smallest normal number of ``dtype``: where a log p is below it, p · anything finite is ~0."""
    return math.log(torch.finfo(dtype).tiny)
