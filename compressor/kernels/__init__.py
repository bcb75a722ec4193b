"""The distillation loss's public entry points, with the implementation chosen by ``impl``.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". The specification is
:mod:`compressor.kernels.tempered_kl_reference`; the fused paths must match it:

- ``"triton"`` (:mod:`.tempered_kl_triton`): one kernel launch writes the loss and the gradient w.r.t. the student;
- ``"cpu"`` (:mod:`.tempered_kl_cpu`): the same single-pass idea vectorised over row chunks in PyTorch;
- ``"reference"``: plain PyTorch and autograd, any device, and the only path that also differentiates w.r.t. the
  teacher logits.

``impl="auto"`` is resolved in one place, :func:`resolve_impl`, from the inputs at call time (never at import).

``variant`` replaces Hinton's soft term by a later one (``VARIANTS``: ``"dkd"``, ``"ls"``, ``"dist"``; defined in
the reference, docs/kernels.md), fused in :mod:`.tempered_kl_variants_cpu` and :mod:`.tempered_kl_variants_triton`
(dist's kernels: :mod:`.tempered_kl_dist_triton`).
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import (COMBINES, VARIANTS, check_variant, ensemble_log_probs,
                                                      ensemble_weights, tempered_kl_reference)

__all__ = ["COMBINES", "IMPLS", "VARIANTS", "ensemble_log_probs", "ensemble_weights", "resolve_impl", "tempered_kl",
           "tempered_kl_reference"]

IMPLS = ("auto", "reference", "cpu", "triton")  # what ``impl`` accepts
# K·N·C under which ``auto`` takes the reference on the CPU: a training batch of 128 rows × 10 classes × 3 members
# runs in 310 µs there, 465 µs in the fused path, whose per-call set-up only pays off on larger inputs
AUTO_CPU_MIN_ELEMENTS = 65536


def resolve_impl(impl: str, device: torch.device | str, teacher_requires_grad: bool = False,
                 elements: int | None = None) -> str:
    """The implementation that runs for ``impl`` on ``device``: ``"auto"`` becomes a concrete name here and only here.

    ``"auto"``: ``"triton"`` on CUDA when triton is installed, ``"cpu"`` on the CPU, ``"reference"`` otherwise, and
    ``"reference"`` whenever the teacher logits need a gradient (the fused paths give the student's only), and on
    the CPU for inputs of fewer than AUTO_CPU_MIN_ELEMENTS teacher logits (``elements``, K·N·C).
    Raises ValueError for a name outside :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    if impl != "auto":
        return impl
    device = torch.device(device)
    if teacher_requires_grad:
        return "reference"
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device.type == "cpu":
        return "cpu" if elements is None or elements >= AUTO_CPU_MIN_ELEMENTS else "reference"
    return "reference"


def tempered_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                alpha: float, weights: Tensor | Sequence[float] | None = None, combine: str = "arithmetic",
                impl: str = "auto", variant: str = "kd", beta: float = 8.0) -> Tensor:
    """The distillation loss (a 0-dim tensor), averaged over all N rows.

    ``student_logits`` (N, C); ``teacher_logits`` (K, N, C); ``labels`` (N,) int64 with -1 for unlabeled rows,
    or None. Per row: ``alpha · T² · KL(p_T ‖ softmax(s / T)) + (1 − alpha) · CE(softmax(s), y)`` with
    ``p_T`` the ensemble's tempered soft target (``combine`` "arithmetic" or "geometric", member ``weights``
    (K,) normalised to sum to 1). ``variant`` replaces the soft term (``"dkd"``, ``"ls"``, ``"dist"``; ``beta`` is
    dkd's β). ``impl`` picks the implementation (see :func:`resolve_impl`).

    Example::

        loss = tempered_kl(student(x), teacher_logits, y, temperature=4.0, alpha=0.9)
        loss.backward()
    """
    check_variant(variant, beta)
    resolved = resolve_impl(impl, student_logits.device, teacher_logits.requires_grad, teacher_logits.numel())
    if variant != "kd":
        if resolved == "triton":
            from compressor.kernels.tempered_kl_variants_triton import tempered_kl_variants_triton
            return tempered_kl_variants_triton(student_logits, teacher_logits, labels, temperature, alpha, weights,
                                               combine, variant=variant, beta=beta)
        if resolved == "cpu":
            from compressor.kernels.tempered_kl_variants_cpu import tempered_kl_variants_cpu
            return tempered_kl_variants_cpu(student_logits, teacher_logits, labels, temperature, alpha, weights,
                                            combine, variant=variant, beta=beta)
        return tempered_kl_reference(student_logits, teacher_logits, labels, temperature, alpha, weights, combine,
                                     variant, beta)
    if resolved == "triton":
        from compressor.kernels.tempered_kl_triton import tempered_kl_triton
        return tempered_kl_triton(student_logits, teacher_logits, labels, temperature, alpha, weights, combine)
    if resolved == "cpu":
        from compressor.kernels.tempered_kl_cpu import tempered_kl_cpu
        return tempered_kl_cpu(student_logits, teacher_logits, labels, temperature, alpha, weights, combine)
    return tempered_kl_reference(student_logits, teacher_logits, labels, temperature, alpha, weights, combine)
