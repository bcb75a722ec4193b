"""The distillation loss's public entry point: :func:`tempered_kl`, with the implementation chosen by ``impl``.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network". The specification is
:mod:`compressor.kernels.tempered_kl_reference`; faster implementations must match it. ``impl="auto"`` is
resolved in one place, :func:`resolve_impl`, from the device of the inputs at call time (never at import time).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from compressor.kernels.tempered_kl_reference import (COMBINES, ensemble_log_probs, ensemble_weights,
                                                      tempered_kl_reference)

__all__ = ["COMBINES", "IMPLS", "ensemble_log_probs", "ensemble_weights", "resolve_impl", "tempered_kl",
           "tempered_kl_reference"]

IMPLS = ("auto", "reference")  # what ``impl`` accepts


def resolve_impl(impl: str, device: torch.device | str) -> str:
    """The implementation that runs for ``impl`` on ``device``: ``"auto"`` becomes a concrete name here and only here.

    Today the reference is the only implementation, so ``"auto"`` is ``"reference"`` on every device.
    Raises ValueError for a name outside :data:`IMPLS`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {', '.join(map(repr, IMPLS))}")
    device = torch.device(device)
    if impl != "auto":
        return impl
    return "reference"


def tempered_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None, temperature: float,
                alpha: float, weights: Tensor | Sequence[float] | None = None, combine: str = "arithmetic",
                impl: str = "auto") -> Tensor:
    """The distillation loss (a 0-dim tensor), averaged over all N rows; differentiable in both logits.

    ``student_logits`` (N, C); ``teacher_logits`` (K, N, C); ``labels`` (N,) int64 with -1 for unlabeled rows,
    or None. Per row: ``alpha · T² · KL(p_T ‖ softmax(s / T)) + (1 − alpha) · CE(softmax(s), y)`` with
    ``p_T`` the ensemble's tempered soft target (``combine`` "arithmetic" or "geometric", member ``weights``
    (K,) normalised to sum to 1). ``impl`` picks the implementation (see :func:`resolve_impl`).

    Example::

        loss = tempered_kl(student(x), teacher_logits, y, temperature=4.0, alpha=0.9)
        loss.backward()
    """
    resolved = resolve_impl(impl, student_logits.device)
    if resolved == "reference":
        return tempered_kl_reference(student_logits, teacher_logits, labels, temperature, alpha, weights, combine)
    raise AssertionError(f"resolve_impl returned {resolved!r}, which tempered_kl has no branch for")
