"""The distillation loss, written out in plain PyTorch: the specification every faster path must match.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network" (arXiv:1503.02531), §2-3.
For a batch of N rows and C classes, student logits ``s`` (N, C), teacher logits ``t`` (K, N, C) and
labels ``y`` (N,) with -1 for an unlabeled row:

    L = mean over rows of  α · T² · KL(p_T ‖ softmax(s / T))  +  (1 − α) · CE(softmax(s), y)

where ``p_T`` is the ensemble's soft target at temperature T (:func:`ensemble_log_probs`). The T² factor
keeps the soft term's gradient magnitude independent of T (paper §2). That soft term is ``variant="kd"``; three
later logit-only losses replace it (``VARIANTS``, :func:`soft_term`, docs/kernels.md): decoupled KD (``"dkd"``,
Zhao et al. 2022), KD on standardised logits (``"ls"``, Sun et al. 2024) and DIST's correlations (``"dist"``,
Huang et al. 2022). The hard-label term and the mean over all N rows are the same in every variant. Everything is computed in log space,
so logits in the hundreds stay finite; inputs are computed in at least float32 (float64 stays float64), which
makes this module the test oracle, the CPU fallback and the benchmark baseline at once. Autograd supplies
the backward pass.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

COMBINES = ("arithmetic", "geometric")  # how K members' predictions become one soft target
VARIANTS = ("kd", "dkd", "ls", "dist")   # the soft term: Hinton's KL, decoupled KD, standardised logits, DIST
STANDARDISE_EPS = 1e-7                  # ls: (z − mean) / (std + eps), as Sun et al. 2024's code
PEARSON_EPS = 1e-8                      # dist: the cosine similarity's floor on the norms' product, as DIST's code


def ensemble_weights(weights: Tensor | Sequence[float] | None, num_members: int, like: Tensor) -> Tensor:
    """Member weights (K,) normalised to sum to 1, on ``like``'s device and dtype; None means uniform.

    Raises ValueError for a length other than ``num_members``, a negative or non-finite weight, or all zeros.
    """
    if weights is None:
        return torch.full((num_members,), 1.0 / num_members, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights).to(device=like.device, dtype=like.dtype)
    if w.shape != (num_members,):
        raise ValueError(f"weights have shape {tuple(w.shape)} but there are {num_members} teacher members; "
                         f"give one weight per member, shape ({num_members},)")
    values = w.detach().cpu().tolist()
    if any(not (v >= 0.0 and v != float("inf")) for v in values):  # catches NaN, negatives and inf
        raise ValueError(f"weights {values}: every member weight must be finite and >= 0")
    if sum(values) <= 0.0:
        raise ValueError(f"weights {values}: at least one member weight must be positive")
    return w / w.sum()


def ensemble_log_probs(teacher_logits: Tensor, temperature: float, weights: Tensor | Sequence[float] | None = None,
                       combine: str = "arithmetic") -> Tensor:
    """The ensemble's soft target at temperature T as (N, C) log-probabilities, from (K, N, C) member logits.

    ``combine="arithmetic"`` (the paper's): log of the weighted mean of the members' tempered probabilities,
    ``log Σ_k w_k softmax(t_k / T)``, computed as ``logsumexp_k(log w_k + log_softmax(t_k / T))``.
    ``combine="geometric"``: ``log_softmax(Σ_k w_k t_k / T)``, the softmax of the weighted mean logits.
    ``weights`` (K,) are normalised to sum to 1; None means uniform.

    Example::

        log_p = ensemble_log_probs(torch.randn(3, 8, 10), temperature=4.0)  # (8, 10)
    """
    if teacher_logits.ndim != 3:
        raise ValueError(f"teacher logits have shape {tuple(teacher_logits.shape)}; expected (K, N, C)")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not one of {', '.join(map(repr, COMBINES))}")
    _check_temperature(temperature)
    w = ensemble_weights(weights, teacher_logits.shape[0], teacher_logits)  # (K,)
    if combine == "geometric":
        mean_logits = torch.einsum("k,knc->nc", w, teacher_logits)  # (N, C)
        return F.log_softmax(mean_logits / temperature, dim=-1)
    member_log_probs = F.log_softmax(teacher_logits / temperature, dim=-1)  # (K, N, C)
    # A zero weight gives log w = -inf, which logsumexp treats as an absent member.
    return torch.logsumexp(torch.log(w)[:, None, None] + member_log_probs, dim=0)  # (N, C)


def tempered_kl_reference(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                          alpha: float, weights: Tensor | Sequence[float] | None = None,
                          combine: str = "arithmetic", variant: str = "kd", beta: float = 8.0) -> Tensor:
    """The distillation loss (a 0-dim tensor), averaged over all N rows.

    ``student_logits`` (N, C); ``teacher_logits`` (K, N, C); ``labels`` (N,) integer class indices with -1
    for an unlabeled row, or None when no row is labeled. Per row:
    ``alpha · soft + (1 − alpha) · CE(softmax(s), y)``, ``soft`` being ``T² · KL(p_T ‖ softmax(s / T))`` for
    ``variant="kd"`` and :func:`soft_term`'s for the others (``beta``: dkd's β); an unlabeled row has no hard
    term but still counts in the mean. KL uses the convention 0 · log 0 = 0. ``weights`` (K,) and ``combine``
    are as in :func:`ensemble_log_probs`. Computes in float64 for float64 inputs and in float32 otherwise.
    """
    _check_shapes(student_logits, teacher_logits, labels)
    _check_temperature(temperature)
    _check_alpha(alpha)
    check_variant(variant, beta)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    if variant == "kd":
        log_p = ensemble_log_probs(t, temperature, weights, combine)  # (N, C) teacher, tempered
        return _loss_from_log_probs(s, log_p, labels, temperature, alpha)
    soft = soft_term(s, t, labels, temperature, weights, combine, variant, beta)  # (N,) or a batch's scalar
    return (alpha * soft).mean() + (1.0 - alpha) * _hard_term(s, labels).mean()


def check_variant(variant: str, beta: float) -> None:
    """Refuse a variant outside :data:`VARIANTS` or a β that is not finite and ≥ 0 (ValueError)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {', '.join(map(repr, VARIANTS))}")
    if not (float(beta) >= 0.0 and float(beta) != float("inf")):
        raise ValueError(f"beta={beta}: must be a finite number >= 0 (decoupled KD's weight on the non-target term)")


def standardise(z: Tensor) -> Tensor:
    """Each row of ``z`` (..., C) as ``(z − mean) / (std + 1e-7)``, std as ``torch.std`` (divided by C − 1)."""
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + STANDARDISE_EPS)


def soft_term(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float,
              weights: Tensor | Sequence[float] | None, combine: str, variant: str, beta: float) -> Tensor:
    """The soft term of ``variant`` ("dkd", "ls" or "dist"; see docs/kernels.md), T² included: (N,) per row, or for
    "dist" a 0-dim tensor whose second part is a property of the whole batch.

    - ``ls``: ``T² · KL(p̂_T ‖ softmax(ŝ / T))`` where every member's logits and the student's are standardised per
      row (:func:`standardise`) before the temperature and ``p̂_T`` is the ensemble's mixture of those.
    - ``dkd``: with ``p`` the mixture and ``q = softmax(s / T)``, ``y`` the label (the argmax of ``p`` where the row
      has none): ``T² · (KL(b_p ‖ b_q) + β · KL(p̃ ‖ q̃))``, ``b`` the (target, rest) split and ``p̃``, ``q̃`` the
      non-target classes renormalised (0 for a row whose teachers put all mass on the target, or C = 1).
    - ``dist``: ``T² · ((1 − mean over rows of ρ(p_n, q_n)) + (1 − mean over classes of ρ(p_:c, q_:c)))``,
      ``ρ`` Pearson's correlation as DIST computes it (the cosine of the centred vectors, norms' product at least
      1e-8), over the classes of a row and over the batch's rows of a class.
    """
    if variant == "ls":
        log_p = ensemble_log_probs(standardise(t), temperature, weights, combine)
        log_q = F.log_softmax(standardise(s) / temperature, dim=-1)
        return temperature * temperature * _kl_rows(log_p, log_q)
    log_p = ensemble_log_probs(t, temperature, weights, combine)  # (N, C)
    log_q = F.log_softmax(s / temperature, dim=-1)  # (N, C)
    if variant == "dist":
        p, q = log_p.exp(), log_q.exp()
        return temperature * temperature * ((1 - _pearson(p, q, dim=1).mean()) + (1 - _pearson(p, q, dim=0).mean()))
    target = log_p.argmax(dim=-1) if labels is None else torch.where(labels >= 0, labels.long(), log_p.argmax(dim=-1))
    is_target = F.one_hot(target, log_p.shape[-1]).bool()  # (N, C)
    rest_p = torch.logsumexp(log_p.masked_fill(is_target, -math.inf), dim=-1)  # log(1 − p_t), -inf when C = 1
    rest_q = torch.logsumexp(log_q.masked_fill(is_target, -math.inf), dim=-1)
    binary_p = torch.stack([log_p[is_target], rest_p], dim=-1)  # (N, 2) log (p_t, 1 − p_t)
    binary_q = torch.stack([log_q[is_target], rest_q], dim=-1)
    tckd = _kl_rows(binary_p, binary_q)
    has_rest = torch.isfinite(rest_p)[:, None]  # a row with mass off the target (and C > 1)
    rest_log_p = torch.where(has_rest, log_p - rest_p[:, None].where(has_rest, 0.0), -math.inf).masked_fill(
        is_target, -math.inf)  # log p̃ (N, C): the non-target classes renormalised, -inf on the target
    rest_log_q = (log_q - rest_q[:, None].where(has_rest, 0.0)).masked_fill(is_target, -math.inf)
    nckd = torch.where(has_rest[:, 0], _kl_rows(rest_log_p, rest_log_q), 0.0)
    return temperature * temperature * (tckd + beta * nckd)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) per row (N,) from log-probabilities, with 0 · log 0 = 0: where p is exactly 0 (a −inf teacher
    logit) finite stand-ins replace both logs, so neither the value nor the gradient sees 0 · inf."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (torch.where(p > 0, log_p, 0.0) - torch.where(p > 0, log_q, 0.0)), 0.0)
    return terms.sum(dim=-1)


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """Pearson's correlation of ``a`` and ``b`` along ``dim``: the cosine of the centred vectors, as DIST's code."""
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    norms = (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(PEARSON_EPS)
    return (a * b).sum(dim=dim) / norms


def _hard_term(s: Tensor, labels: Tensor | None) -> Tensor:
    """Cross-entropy per row (N,) on the raw logits, 0 where the row is unlabeled (-1) or there are no labels."""
    if labels is None:
        return torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    return F.cross_entropy(s, labels.long(), ignore_index=-1, reduction="none")


def tempered_kl_reference_from_log_probs(student_logits: Tensor, teacher_log_probs: Tensor, labels: Tensor | None,
                                         temperature: float, alpha: float) -> Tensor:
    """The distillation loss (a 0-dim tensor) from the ensemble's soft target given as log-probabilities.

    The mixture-input form of :func:`tempered_kl_reference`: ``teacher_log_probs`` (N, C) is the ensemble's
    tempered ``log p_T`` at this ``temperature``, precomputed once (e.g. by :func:`ensemble_log_probs`, or read
    from a teacher cache), so the cost no longer grows with the number of members K. ``student_logits`` (N, C),
    ``labels`` (N,) with -1 for unlabeled rows or None; same per-row formula and mean over all N rows.

    Example::

        log_p = ensemble_log_probs(teacher_logits, temperature=4.0)  # (N, C), once per batch
        loss = tempered_kl_reference_from_log_probs(student(x), log_p, y, temperature=4.0, alpha=0.9)
    """
    if teacher_log_probs.ndim != 2 or teacher_log_probs.shape != student_logits.shape:
        raise ValueError(f"teacher log-probs have shape {tuple(teacher_log_probs.shape)} but student logits "
                         f"{tuple(student_logits.shape)}; expected both (N, C)")
    _check_shapes(student_logits, teacher_log_probs[None], labels)
    _check_temperature(temperature)
    _check_alpha(alpha)
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_log_probs.dtype), torch.float32)
    return _loss_from_log_probs(student_logits.to(dtype), teacher_log_probs.to(dtype), labels, temperature, alpha)


def _loss_from_log_probs(s: Tensor, log_p: Tensor, labels: Tensor | None, temperature: float, alpha: float) -> Tensor:
    """The per-row formula on student logits ``s`` (N, C) and teacher log-probs ``log_p`` (N, C), averaged."""
    log_q = F.log_softmax(s / temperature, dim=-1)  # (N, C) student, tempered
    soft = temperature * temperature * _kl_rows(log_p, log_q)  # (N,)

    return (alpha * soft + (1.0 - alpha) * _hard_term(s, labels)).mean()


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha}: must be between 0 (hard labels only) and 1 (soft targets only)")


def _check_temperature(temperature: float) -> None:
    if not (float(temperature) > 0.0 and float(temperature) != float("inf")):
        raise ValueError(f"temperature={temperature}: must be a positive finite number (Hinton et al. use 1 to 20)")


def _check_shapes(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> tuple[int, int]:
    """Check student (N, C), teacher (K, N, C) and labels (N,) in [-1, C); returns (N, C)."""
    shapes = (f"student logits {tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)}"
              + ("" if labels is None else f", labels {tuple(labels.shape)}"))
    ok = (student_logits.ndim == 2 and teacher_logits.ndim == 3 and teacher_logits.shape[0] >= 1
          and teacher_logits.shape[1:] == student_logits.shape and (labels is None or labels.ndim == 1
                                                                  and labels.shape[0] == student_logits.shape[0]))
    if not ok:
        raise ValueError(f"shapes do not fit: {shapes}; expected student (N, C), teacher (K, N, C), labels (N,)")
    n, c = student_logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"empty batch: {shapes}; need at least one row and one class")
    if student_logits.device != teacher_logits.device or (labels is not None and labels.device != student_logits.device):
        raise ValueError(f"inputs are on different devices: student {student_logits.device}, teacher "
                         f"{teacher_logits.device}" + ("" if labels is None else f", labels {labels.device}"))
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels have dtype {labels.dtype}; expected integer class indices (int64), -1 = unlabeled")
        low, high = int(labels.min()), int(labels.max())
        if low < -1 or high >= c:
            raise ValueError(f"labels range over [{low}, {high}] but must lie in [-1, {c}) for {c} classes "
                             f"(-1 marks an unlabeled row)")
    return n, c
