"""Distillation recipes: what the student sees and what it matches (``--recipe``).

- ``hinton`` (default): the paper. The transfer set as it is, the teachers' logits computed once (cached), the loss
  α·T²·KL + (1 − α)·CE.
- ``consistent``: every epoch the student sees a new view of each image (``compressor.data.augment.Shift``) and the
  teachers run on exactly that view, so the soft targets describe the input the student gets (Beyer et al. 2022,
  "Knowledge distillation: a good teacher is patient and consistent"). Vectors and images under 16 px have no
  default augmentation (``compressor.data.augment.default_augmentation``), so for them it is ``hinton``.
- ``function-matching``: the views are mixed pairs of transfer rows (``compressor.data.augment.Mixup``, on top of the
  shifts for images); the teachers run on the mixed input and the student matches them with α = 1, since a mixed
  input has no label.

Before training, the teachers are scored on views of the validation split: teachers that lose accuracy on the
recipe's views would teach their errors, and the run says so (``view_check`` in the report).

Augmenting recipes need the teachers on every epoch's views: :mod:`compressor.training.view_cache` runs them on each view
once and keeps the logits (per (row, offset) for shifts, per epoch for mixup; never the images) for later epochs,
runs and tuning trials; with --no-cache they run on every training batch instead. The hard-label baseline gets the same
image augmentation as the student (not the mixing, which has no labels), so the comparison shows what the teachers
add and not what augmentation adds. ``--recipe auto`` is not a recipe but a search over them
(:mod:`compressor.training.halving`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from compressor.data.augment import Mixup, default_augmentation
from compressor.core.errors import CompressorError
from compressor.core.inputs import NamedInputs

RECIPES = ("hinton", "consistent", "function-matching")
View = Callable[[Tensor, Tensor, int], Tensor]


@dataclass(frozen=True)
class Recipe:
    """A recipe resolved for one dataset: the student's view, the baseline's view, a forced α, and whether the
    teachers must run on each batch."""

    name: str
    view: View | None
    baseline_view: View | None
    alpha: float | None          # None: the user's --alpha
    teachers_per_batch: bool
    augmentation: str            # what the student sees, in words, for the report

    def describe(self) -> dict:
        """JSON-safe summary for the report."""
        return {"recipe": self.name, "augmentation": self.augmentation,
                "teachers": "run on every training batch" if self.teachers_per_batch else "cached logits",
                "alpha_forced": self.alpha}


def check_recipe(name: str, named_inputs: bool, data: str = "text data") -> None:
    """Refuse ``--recipe name`` for data it cannot take (``data`` names it): function-matching mixes pairs of
    inputs, which token ids cannot be. The main job asks before the teachers run; :func:`make_recipe` asks again."""
    if name == "function-matching" and named_inputs:
        raise CompressorError(f"--recipe function-matching mixes pairs of inputs, and the token ids of {data} cannot "
                              f"be mixed; use --recipe hinton for text")


def soft_weight(alpha: float, recipe: Recipe, labelled: bool) -> float:
    """The soft term's weight a transfer set trains with: the recipe's forced α, else ``alpha`` (--alpha); 1 when
    the transfer rows have no labels (``labelled`` False)."""
    if not labelled:
        return 1.0
    return alpha if recipe.alpha is None else recipe.alpha


def make_recipe(name: str, input_shape: tuple[int, ...], x_train: Tensor, seed: int = 0) -> Recipe:
    """Resolve ``--recipe name`` for inputs of ``input_shape`` and the transfer set ``x_train`` (N, ...)."""
    if name not in RECIPES:
        raise CompressorError(f"--recipe {name}: choose one of {', '.join(RECIPES)}")
    check_recipe(name, isinstance(x_train, NamedInputs))
    shift = default_augmentation(tuple(input_shape), seed)
    if name == "hinton" or (name == "consistent" and shift is None):
        note = "none" if name == "hinton" else ("none (no default augmentation for vectors or images under 16 px: "
                                                "as hinton)")
        return Recipe(name, None, None, None, False, note)
    if name == "consistent":
        return Recipe(name, shift, shift, None, True, f"{shift.describe()}, drawn per row, epoch and seed")
    mix = Mixup(x_train, seed, then=shift)
    return Recipe(name, mix, shift, 1.0, True, f"{mix.describe()}, drawn per row, epoch and seed")
