"""The losses the training loop minimises (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").

Every loss is a frozen dataclass called as ``loss(student_logits (B, C), teacher_logits (K, B, C) | None,
labels (B,) int64, -1 = unlabeled) -> scalar``, so :func:`compressor.training.loop.train_student` takes any of them:

- :class:`DistillationLoss` — the paper's loss: ``α · T² · KL(p_T ‖ q_T) + (1 − α) · CE``, via
  :func:`compressor.kernels.tempered_kl`, or with a later soft term (``variant``: dkd, ls, dist; docs/kernels.md);
- :class:`LogitMatchingLoss` — squared error between centred logits, the high-temperature limit (§2.1);
- :class:`HardLabelLoss` — cross-entropy on the labels alone, the baseline that shows what distillation buys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.kernels import COMBINES, IMPLS, VARIANTS, ensemble_weights, tempered_kl


@dataclass(frozen=True)
class DistillationLoss:
    """The paper's loss, averaged over all B rows (an unlabeled row contributes its soft term only).

    ``temperature`` T > 0 softens both distributions; ``alpha`` in [0, 1] weighs the T²-scaled KL term against
    the hard-label cross-entropy; ``combine`` ("arithmetic" or "geometric") and ``weights`` (one per member)
    say how the K teachers become one soft target; ``impl`` picks the kernel ("auto" resolves per device);
    ``variant`` replaces the soft term ("kd" is the paper's; "dkd", "ls", "dist"), ``beta`` is dkd's β.

    Example::

        loss_fn = DistillationLoss(temperature=4.0, alpha=0.9)
        loss = loss_fn(student(x), teacher_logits, y)  # (B, C), (K, B, C), (B,) -> scalar
    """

    temperature: float = 4.0
    alpha: float = 0.9
    combine: str = "arithmetic"
    weights: tuple[float, ...] | None = None
    impl: str = "auto"
    variant: str = "kd"
    beta: float = 8.0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not one of {', '.join(map(repr, VARIANTS))}")
        if not (self.temperature > 0 and self.temperature != float("inf")):
            raise ValueError(f"temperature={self.temperature}: must be a positive finite number "
                             f"(Hinton et al. use 1 to 20)")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha={self.alpha}: must be between 0 (hard labels only) and 1 (soft targets only)")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r} is not one of {', '.join(map(repr, COMBINES))}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl={self.impl!r} is not one of {', '.join(map(repr, IMPLS))}")
        _check_weights(self.weights)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None) -> Tensor:
        if teacher_logits is None:
            raise ValueError("DistillationLoss needs teacher logits (K, B, C); use HardLabelLoss to train on labels only")
        return tempered_kl(student_logits, teacher_logits, labels, self.temperature, self.alpha, self.weights,
                           self.combine, self.impl, self.variant, self.beta)


@dataclass(frozen=True)
class HardLabelLoss:
    """Cross-entropy on the labeled rows only (label -1 is ignored), averaged over those rows.

    ``teacher_logits`` are not used and may be None: this is the baseline a distilled student is compared with.
    A batch with no labeled row gives 0, still attached to the graph so ``backward()`` works.
    """

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor) -> Tensor:
        if student_logits.ndim != 2 or labels.shape != student_logits.shape[:1]:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and labels {tuple(labels.shape)} do not "
                             f"fit; expected (B, C) and (B,)")
        _check_labels(labels, student_logits.shape[1])
        if not bool((labels >= 0).any()):
            return student_logits.sum() * 0.0
        return F.cross_entropy(student_logits, labels.long(), ignore_index=-1)


@dataclass(frozen=True)
class LogitMatchingLoss:
    """Squared error between the student's and the teachers' logits, each row centred to zero mean first.

    The teacher side is the weighted mean of the K members' logits (``weights`` normalised to sum to 1; None =
    uniform). Per row the loss is ``½ · mean_c (s̃_c − t̃_c)²`` (s̃, t̃ centred), averaged over rows: its gradient,
    ``(s̃ − t̃) / (B · C)``, is exactly the high-temperature limit of the T²-scaled KL term's (paper §2.1), so the
    two losses are on one scale. Labels are not used (logit matching has no hard term); they are accepted so
    the call signature matches the other losses.
    """

    weights: tuple[float, ...] | None = None

    def __post_init__(self):
        _check_weights(self.weights)

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None) -> Tensor:
        if teacher_logits is None:
            raise ValueError("LogitMatchingLoss needs teacher logits (K, B, C); use HardLabelLoss to train on labels only")
        if (student_logits.ndim != 2 or teacher_logits.ndim != 3
                or teacher_logits.shape[1:] != student_logits.shape):
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} do not fit; expected (B, C) and (K, B, C)")
        w = ensemble_weights(self.weights, teacher_logits.shape[0], teacher_logits)  # (K,)
        teacher = torch.einsum("k,kbc->bc", w, teacher_logits)  # (B, C)
        student = student_logits - student_logits.mean(dim=-1, keepdim=True)  # (B, C)
        teacher = teacher - teacher.mean(dim=-1, keepdim=True)  # (B, C)
        return 0.5 * F.mse_loss(student, teacher.to(student.dtype))


def _check_weights(weights: tuple[float, ...] | None) -> None:
    """Member weights given at construction: finite, >= 0, not all zero (their count is checked per call)."""
    if weights is None:
        return
    values = [float(v) for v in weights]
    if not values or any(not (v >= 0 and v != float("inf")) for v in values) or sum(values) <= 0:
        raise ValueError(f"weights={tuple(weights)}: give one finite weight >= 0 per teacher member, "
                         f"not all zero")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels have dtype {labels.dtype}; expected integer class indices (int64), -1 = unlabeled")
    if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels range over [{int(labels.min())}, {int(labels.max())}] but must lie in "
                         f"[-1, {num_classes}) for {num_classes} classes (-1 marks an unlabeled row)")
