"""The later soft terms (decoupled KD, standardised logits, DIST) on the CPU: loss and analytic gradient w.r.t. the
student over chunks of rows, no autograd graph and no (K, N, C) temporary.

The specification is :func:`.tempered_kl_reference.soft_term` (docs/kernels.md has the formulas and papers). Like
:mod:`.tempered_kl_cpu`, each chunk of rows is worked on in cache-sized temporaries by the worker pool and writes its
rows of ∂L/∂s, the one (N, C) allocation, which autograd adopts as ``.grad``. Per row, with x = s / T (ŝ / T for
``ls``), q = softmax(x), p the ensemble's tempered mixture and the soft term's gradient w.r.t. x written g_x
(∂L/∂s = α · T · g_x / N, plus the hard term's (1 − α)(softmax(s) − 1[c = y]) / N on labelled rows):

- ``ls``: g_x = q − p on the standardised logits ŝ = (s − μ) / (σ + ε), then through the standardisation:
  ∂/∂s = (g − mean g) / (σ + ε) − (s − μ) · Σ g (s − μ) / ((C − 1) σ (σ + ε)²) (the second term 0 for a
  constant row, as autograd has it).
- ``dkd``: for the target y, g_x[y] = q_y − p_y and, off it, g_x = −(q_y − p_y) · q̃ + β (q̃ − p̃).
- ``dist``: its class term couples the rows, so a first pass sums each class's moments over the batch and a second
  writes the gradient: g_q = −T · (∂ρ_n/∂q_n / N + ∂ρ_c/∂q_:c / C), with ∂ρ/∂b = a / (|a||b|) − ρ b / |b|² for
  centred a (teacher), b (student), then g_x = q ⊙ (g_q − Σ_c q g_q).

The gradient is written straight into ∂L/∂s; the teacher logits get none.
"""

from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.kernels.tempered_kl_cpu import _workers, default_chunk_rows
from compressor.kernels.tempered_kl_reference import (COMBINES, PEARSON_EPS, STANDARDISE_EPS, _check_alpha,
                                                      _check_shapes, _check_temperature, check_variant,
                                                      ensemble_weights)

__all__ = ["tempered_kl_variants_cpu"]


def tempered_kl_variants_cpu(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None,
                             temperature: float, alpha: float, weights: Tensor | Sequence[float] | None = None,
                             combine: str = "arithmetic", *, variant: str, beta: float = 8.0,
                             chunk_rows: int | None = None) -> Tensor:
    """The distillation loss with ``variant``'s soft term ("dkd", "ls" or "dist"), averaged over all N rows, on the
    CPU; arguments as :func:`compressor.kernels.tempered_kl` (``beta``: dkd's β). Differentiable in the student
    logits only.

    Example::

        loss = tempered_kl_variants_cpu(student(x), teacher_logits, y, 4.0, 0.9, variant="dkd", beta=8.0)
        loss.backward()
    """
    _check_shapes(student_logits, teacher_logits, labels)
    _check_temperature(temperature)
    _check_alpha(alpha)
    check_variant(variant, beta)
    if variant == "kd":
        raise ValueError("variant='kd' runs in compressor.kernels.tempered_kl_cpu; this module has the others")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(map(repr, COMBINES))}")
    if variant == "ls" and student_logits.shape[1] < 2:
        raise ValueError("variant='ls' standardises each row over its classes and needs at least 2 of them")
    if student_logits.device.type != "cpu":
        raise ValueError(f"tempered_kl_variants_cpu got inputs on {student_logits.device}; it runs on the CPU only "
                         f"— use tempered_kl(..., impl='auto') to pick the implementation for the device")
    w = ensemble_weights(weights, teacher_logits.shape[0], torch.empty(0, dtype=torch.float64))
    return _VariantCPU.apply(student_logits, teacher_logits, labels, float(temperature), float(alpha), w, combine,
                             variant, float(beta), chunk_rows)


class _VariantCPU(torch.autograd.Function):
    """Forward computes the loss and stores ∂L/∂s (N, C); backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, s, t, y, temperature, alpha, w, combine, variant, beta, chunk_rows):
        work = _Pass(s.detach(), t.detach(), y, temperature, alpha, w, combine, variant, beta, chunk_rows,
                     ctx.needs_input_grad[0])
        loss = work.run()
        ctx.grad = work.grad
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("tempered_kl_variants_cpu: backward ran twice on the same loss; recompute the loss")
        if not (grad_output.ndim == 0 and float(grad_output) == 1.0):
            grad.mul_(grad_output.to(grad.dtype))
        return (grad,) + (None,) * 9


class _Pass:
    """One call: the inputs, per-row results and ∂L/∂s, filled chunk by chunk by the worker pool."""

    def __init__(self, s: Tensor, t: Tensor, y: Tensor | None, temperature: float, alpha: float, w: Tensor,
                 combine: str, variant: str, beta: float, chunk_rows: int | None, need_grad: bool):
        n, c = s.shape
        self.s, self.t, self.temperature, self.alpha, self.combine = s, t, temperature, alpha, combine
        self.variant, self.beta = variant, beta
        self.cd = cd = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        self.w = w.to(cd)
        self.y = None if y is None else y.long()
        self.grad = torch.empty(n, c, dtype=s.dtype) if need_grad else None
        self.soft_rows = torch.zeros(n, dtype=torch.float64)  # per-row soft term (dist: its row correlation)
        self.hard_rows = torch.zeros(n, dtype=torch.float64)  # per-row cross-entropy, 0 where unlabeled
        self.workers = workers = _workers()
        size = 1 if workers is None else workers.size
        self.rows = max(1, min(n, int(chunk_rows))) if chunk_rows is not None else \
            max(1, min(default_chunk_rows(c), -(-n // size)))
        self.chunks = -(-n // self.rows)
        self.moments = torch.zeros(self.chunks, 5, c, dtype=torch.float64) if variant == "dist" else None

    def run(self) -> Tensor:
        """Every chunk (dist: two passes); returns the mean loss (0-dim, compute dtype)."""
        n, c = self.s.shape
        if self.variant == "dist":
            self._over_chunks(self._dist_moments)
            self._class_terms()
        self._over_chunks(self._chunk)
        soft = self.soft_rows.sum() / n
        if self.variant == "dist":  # 1 − mean ρ over rows, 1 − mean ρ over classes
            soft = (1 - soft) + (1 - self.rho_class.mean())
        total = self.alpha * self.temperature ** 2 * soft + (1 - self.alpha) * self.hard_rows.sum() / n
        return total.to(self.cd)

    def _over_chunks(self, fn: Callable[[int, int, int], None]) -> None:
        claimed = itertools.count()  # next() hands each chunk to exactly one worker (atomic under the GIL)

        def work() -> None:
            for chunk in claimed:
                if chunk >= self.chunks:
                    return
                i = chunk * self.rows
                fn(chunk, i, min(i + self.rows, self.s.shape[0]))

        if self.workers is None:
            work()
        else:
            self.workers.run(work, min(self.workers.size, self.chunks))

    def _mixture(self, i: int, j: int, standardised: bool) -> tuple[Tensor, Tensor]:
        """Rows i:j's soft target p and its log (−inf where p underflows to 0): the arithmetic mixture in
        probability space, one softmax call over the K members and one (1, K) @ (K, r·C) product (a third of the
        passes of the log-space mixture, whose logsumexp over members allocates and exponentiates again)."""
        t = self.t[:, i:j].to(self.cd)
        scale = 1.0 / self.temperature
        if standardised:  # softmax ignores a row's shift, so (t − mean) / (std + eps) / T needs only the scale
            scale = t.std(dim=-1, keepdim=True).add_(STANDARDISE_EPS).reciprocal_().mul_(scale)
        if self.combine == "geometric":
            log_p = F.log_softmax(torch.einsum("k,krc->rc", self.w, t * scale), dim=-1)
            return log_p.exp(), log_p
        k, r, c = t.shape
        probs = torch.softmax(t * scale, dim=-1)
        p = torch.mm(self.w[None], probs.view(k, r * c)).view(r, c)
        return p, p.log()

    def _chunk(self, chunk: int, i: int, j: int) -> None:
        """Rows i:j: their soft and hard terms and their rows of ∂L/∂s."""
        n = self.s.shape[0]
        s = self.s[i:j].to(self.cd)
        inv_t = 1.0 / self.temperature
        if self.variant == "ls":
            centred = s - s.mean(-1, keepdim=True)
            sigma = centred.square().sum(-1, keepdim=True).div_(s.shape[1] - 1).sqrt_()
            scale = sigma + STANDARDISE_EPS
            (p, log_p), log_q = self._mixture(i, j, True), F.log_softmax(centred / scale * inv_t, dim=-1)
            q = log_q.exp()
            self.soft_rows[i:j] = _kl_rows(p, log_p, log_q).double()
            g_x = q - p
        else:
            (p, log_p), log_q = self._mixture(i, j, False), F.log_softmax(s * inv_t, dim=-1)
            q = log_q.exp()
            g_x = self._dkd(i, j, p, log_p, q, log_q) if self.variant == "dkd" else self._dist(i, j, p, q)
        g = None if self.grad is None else g_x.mul_(self.alpha * self.temperature / n)
        if g is not None and self.variant == "ls":  # back through the standardisation
            dot = (g * centred).sum(-1, keepdim=True)
            back = dot.div_((s.shape[1] - 1) * sigma * scale.square()).where(sigma > 0, 0.0)
            g = (g - g.mean(-1, keepdim=True)).div_(scale).sub_(centred * back)
        if self.alpha < 1 and self.y is not None:
            g = self._hard(i, j, s, g, n)
        if self.grad is not None:
            self.grad[i:j] = g

    def _hard(self, i: int, j: int, s: Tensor, g: Tensor | None, n: int) -> Tensor | None:
        """Adds rows i:j's cross-entropy (raw logits) to ``hard_rows`` and its gradient to ``g``."""
        y = self.y[i:j]
        labelled = y >= 0
        log_h = F.log_softmax(s, dim=-1)
        picked = log_h.gather(1, y.clamp_min(0)[:, None])[:, 0]
        self.hard_rows[i:j] = torch.where(labelled, -picked, 0.0).double()
        if g is None:
            return None
        coef = labelled.to(self.cd).mul_((1 - self.alpha) / n)[:, None]
        g.add_(log_h.exp_().mul_(coef))
        return g.scatter_add_(1, y.clamp_min(0)[:, None], -coef)

    def _dkd(self, i: int, j: int, p: Tensor, log_p: Tensor, q: Tensor, log_q: Tensor) -> Tensor:
        """Decoupled KD on rows i:j: writes the soft term, returns g_x (in q's buffer; p is zeroed on the target).

        With p and q zeroed on the target, 1 − p_y and 1 − q_y are sums of positive terms (no cancellation near
        p_y = 1), KL(p̃ ‖ q̃) = Σ_{c≠y} p (log p − log q) / (1 − p_y) − log((1 − p_y) / (1 − q_y)), and off the target
        g_x = (β − (q_y − p_y)) · q / (1 − q_y) − β · p / (1 − p_y): a few passes over the chunk, no renormalised
        copies."""
        y = log_p.argmax(-1) if self.y is None else torch.where(self.y[i:j] >= 0, self.y[i:j], log_p.argmax(-1))
        col = y[:, None]
        p_y, q_y = p.gather(1, col), q.gather(1, col)  # (r, 1)
        log_p_y, log_q_y = log_p.gather(1, col), log_q.gather(1, col)
        p.scatter_(1, col, 0.0)
        q.scatter_(1, col, 0.0)
        rest_p, rest_q = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)  # 1 − p_y, 1 − q_y
        has_rest = rest_p > 0  # some mass off the target (and C > 1)
        log_ratio = rest_p.log() - rest_q.log()
        off = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1, keepdim=True)  # Σ_{c≠y} p (log p − log q)
        tckd = torch.where(p_y > 0, p_y * (log_p_y - log_q_y), 0.0) + torch.where(has_rest, rest_p * log_ratio, 0.0)
        nckd = torch.where(has_rest, off / rest_p.clamp_min(torch.finfo(self.cd).tiny) - log_ratio, 0.0)
        self.soft_rows[i:j] = (tckd + self.beta * nckd)[:, 0].double()
        gap = q_y - p_y
        tiny = torch.finfo(self.cd).tiny
        g_x = q.mul_((self.beta - gap) / rest_q.clamp_min(tiny))
        g_x.addcmul_(p, torch.where(has_rest, -self.beta / rest_p.clamp_min(tiny), 0.0))
        return g_x.scatter_(1, col, gap)

    def _dist_moments(self, chunk: int, i: int, j: int) -> None:
        """First pass of dist: Σ p, Σ q, Σ p², Σ q², Σ p q per class over rows i:j (float64)."""
        p = self._mixture(i, j, False)[0]
        q = F.softmax(self.s[i:j].to(self.cd) / self.temperature, dim=-1)
        wide = torch.float64  # summed in double: the centred moments below subtract nearly equal sums
        self.moments[chunk] = torch.stack([p.sum(0, dtype=wide), q.sum(0, dtype=wide), p.square().sum(0, dtype=wide),
                                           q.square().sum(0, dtype=wide), (p * q).sum(0, dtype=wide)])

    def _class_terms(self) -> None:
        """From the moments: each class's ρ_c and the factors of ∂ρ_c/∂q (class_a, class_b, class_shift)."""
        n = self.s.shape[0]
        sp, sq, spp, sqq, spq = self.moments.sum(0)
        norm_a = (spp - sp * sp / n).clamp_min(0).sqrt()  # |p_:c − mean|
        norm_b = (sqq - sq * sq / n).clamp_min(0).sqrt()
        product = norm_a * norm_b
        self.rho_class = (spq - sp * sq / n) / product.clamp_min(PEARSON_EPS)
        # ∂ρ_c/∂q_:c = a / max(|a||b|, eps) − [|a||b| ≥ eps] ρ_c b / |b|², a = p − mean p, b = q − mean q:
        # class_a · p − class_b · q plus a per-class shift, the (N/C)-scaled shift folded in here once
        class_a = 1 / product.clamp_min(PEARSON_EPS)
        class_b = torch.where(product >= PEARSON_EPS, self.rho_class / norm_b.square().clamp_min(1e-300), 0.0)
        self.class_a, self.class_b = class_a.to(self.cd), class_b.to(self.cd)
        self.class_shift = ((class_b * sq - class_a * sp) / n * (n / self.s.shape[1])).to(self.cd)

    def _dist(self, i: int, j: int, p: Tensor, q: Tensor) -> Tensor:
        """Second pass of dist on rows i:j: writes their correlations over the classes, returns g_x (scaled so that
        _chunk's α · T / N gives ∂L/∂s: the row term's 1/N and the class term's 1/C become 1 and N/C)."""
        n, c = self.s.shape
        a, b = p - p.mean(-1, keepdim=True), q - q.mean(-1, keepdim=True)
        norm_b = b.norm(dim=-1, keepdim=True)
        product = a.norm(dim=-1, keepdim=True) * norm_b
        rho = (a * b).sum(-1, keepdim=True) / product.clamp_min(PEARSON_EPS)
        self.soft_rows[i:j] = rho[:, 0].double()
        if self.grad is None:
            return q  # the loss alone: the rows' correlations are all it needs from this pass
        # ∂(1 − ρ)/∂q = −(∂ρ_n/∂q + (N/C) ∂ρ_c/∂q), built in a's buffer with fused multiply-adds
        g_q = a.mul_(1.0 / product.clamp_min(PEARSON_EPS))
        g_q.addcmul_(b, torch.where(product >= PEARSON_EPS, rho / norm_b.square().clamp_min(torch.finfo(self.cd).tiny),
                                    0.0), value=-1.0)
        g_q.addcmul_(p, self.class_a, value=n / c).addcmul_(q, self.class_b, value=-n / c)
        g_q.add_(self.class_shift).neg_()
        return q.mul_(g_q - (q * g_q).sum(-1, keepdim=True))


def _kl_rows(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row from p and the two log-probabilities, 0 · log 0 = 0 (no autograd here, so the NaN of
    0 · −inf in a discarded branch costs nothing)."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
