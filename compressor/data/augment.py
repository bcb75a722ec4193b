"""Augmentations for distillation recipes, each a deterministic function of (example index, epoch, seed).

A view of a training row depends only on which row it is, the epoch and the seed, never on the batch it lands in
or the number of processes, so a resumed run, a run with another batch size and every DDP rank see the same
inputs, and the teachers' outputs on them are reproducible. Randomness comes from a counter-based integer hash
(:func:`row_hash`) of those three numbers, computed on the batch's indices without any random-number state.

- :class:`Shift`: each image moved by whole pixels in [-p, p]² with zero fill (what the paper's MNIST teacher saw,
  ±2 px). No flips: a flipped digit or garment is another class often enough that they must be asked for.
- :class:`Mixup`: each row mixed with a partner row of the transfer set, ``λ·x + (1 − λ)·x_partner`` with λ uniform
  in [0, 1] (Beta(1, 1)), the "function matching" inputs of Beyer et al. 2022: the student matches the teachers on
  points between examples, where labels say nothing, so it trains on the soft targets alone (α = 1).

Each augmentation's ``parameters(rows, epoch)`` returns what it applies to those rows (offsets, partners, weights),
computed by the same private helper its ``__call__`` uses, so :mod:`compressor.training.view_cache` can store them beside the
teachers' outputs on the views and refuse a stored epoch whose augmentation has changed since.

:func:`default_augmentation` declares the defaults in one place: images (C, H, W) of at least 16 × 16 pixels get
shifts of up to 1/14 of their side (±2 px at 28 × 28, as the paper's MNIST teacher saw), smaller images and vectors
get nothing: on scikit-learn's 8 × 8 digits one pixel is an eighth of the image, and the demo ensemble's accuracy
falls from 98% to 47% under ±1-pixel shifts, so its soft targets on such views would teach mostly its errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_MASK = (1 << 63) - 1


def row_hash(rows: Tensor, epoch: int, seed: int, salt: int) -> Tensor:
    """A well-mixed non-negative int64 per row from (row, epoch, seed, salt), vectorised.

    splitmix64's finaliser with arithmetic shifts (torch's int64 has no logical shift; the mixing is as good).
    Written by hand because no library offers a counter-based generator keyed per element on torch tensors;
    int64 arithmetic wraps in torch, which is what the mixing needs.
    """
    z = rows.to(torch.int64) * -7046029254386353131 + (epoch * 1_000_003 + seed * 7_919 + salt * 104_729)
    z = (z ^ (z >> 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as a signed int64
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94D049BB133111EB as a signed int64
    return (z ^ (z >> 31)) & _MASK


def uniform(rows: Tensor, epoch: int, seed: int, salt: int) -> Tensor:
    """A float64 in [0, 1) per row, from :func:`row_hash`."""
    return (row_hash(rows, epoch, seed, salt) >> 11).double() / float(1 << 52)


@dataclass(frozen=True)
class Shift:
    """Move each (C, H, W) image by whole pixels in [-pixels, pixels]² with zero fill."""

    pixels: int = 2  # at most 127: parameters() records offsets as int8
    seed: int = 0

    def __call__(self, x: Tensor, rows: Tensor, epoch: int) -> Tensor:
        """``x`` (B, C, H, W) for training rows ``rows`` (B,) in ``epoch`` -> the shifted batch."""
        return self._move(x, *self._offsets(rows, epoch))

    @property
    def variants(self) -> int:
        """How many distinct views of one image there are: one per offset (dy, dx), (2·pixels + 1)²."""
        return (2 * self.pixels + 1) ** 2

    def variant(self, rows: Tensor, epoch: int) -> Tensor:
        """Which view ``rows`` (B,) get in ``epoch``, int64 (B,) in [0, variants): (dy + p)·(2p + 1) + (dx + p)."""
        dy, dx = self._offsets(rows, epoch)
        return (dy + self.pixels) * (2 * self.pixels + 1) + (dx + self.pixels)

    def apply_variant(self, x: Tensor, variant: Tensor) -> Tensor:
        """``x`` (B, C, H, W) with row i moved by the offsets of ``variant[i]`` (B,): ``__call__`` for rows whose
        variant is known, as :class:`compressor.training.view_cache.VariantLogits` needs."""
        span = 2 * self.pixels + 1
        return self._move(x, variant // span - self.pixels, variant % span - self.pixels)

    def _move(self, x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
        """``x`` (B, C, H, W) with row i moved by (dy[i], dx[i]) pixels, int64 (B,) each, zero fill."""
        n, _, h, w = x.shape
        top, left = (dy + self.pixels).to(x.device), (dx + self.pixels).to(x.device)  # (B,) in [0, 2p]
        padded = torch.nn.functional.pad(x, (self.pixels,) * 4)  # (B, C, H + 2p, W + 2p)
        ys = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
        xs = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        return padded[batch, channels, ys, xs]

    def parameters(self, rows: Tensor, epoch: int) -> dict[str, np.ndarray]:
        """What ``__call__`` applies to ``rows`` (B,) in ``epoch``: ``dy``, ``dx`` int8 (B,) in [-pixels, pixels],
        the row offset and column offset of the source pixel (output[i, j] = input[i + dy, j + dx], 0 outside)."""
        dy, dx = self._offsets(rows, epoch)
        return {"dy": dy.cpu().numpy().astype(np.int8), "dx": dx.cpu().numpy().astype(np.int8)}

    def _offsets(self, rows: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """The (dy, dx) int64 (B,) offsets in [-pixels, pixels] of ``rows`` in ``epoch``, on ``rows``' device."""
        span = 2 * self.pixels + 1
        dy = (uniform(rows, epoch, self.seed, 1) * span).long() - self.pixels  # (B,)
        dx = (uniform(rows, epoch, self.seed, 2) * span).long() - self.pixels  # (B,)
        return dy, dx

    def describe(self) -> str:
        return f"shifts by up to {self.pixels} px in each direction, zero fill"


@dataclass(frozen=True)
class Mixup:
    """Mix each row with a partner row of ``pool`` (the transfer set's inputs, on the CPU), λ uniform in [0, 1]."""

    pool: Tensor
    seed: int = 0
    then: Shift | None = None  # an augmentation applied to the row and its partner first

    def __call__(self, x: Tensor, rows: Tensor, epoch: int) -> Tensor:
        """``x`` (B, ...) for training rows ``rows`` (B,) in ``epoch`` -> the mixed batch (B, ...)."""
        partners, lam = self._draw(rows, epoch)  # (B,) int64, (B,) float64
        other = self.pool[partners.cpu()].to(x.device)  # (B, ...)
        if self.then is not None:
            x, other = self.then(x, rows, epoch), self.then(other, partners, epoch)
        lam = lam.to(device=x.device, dtype=x.dtype)
        lam = lam.reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
        return lam * x + (1 - lam) * other

    def parameters(self, rows: Tensor, epoch: int) -> dict[str, np.ndarray]:
        """What ``__call__`` applies to ``rows`` (B,) in ``epoch``: ``partner`` int64 (B,) rows of ``pool`` and
        ``lam`` float64 (B,) (output = λ·x + (1 − λ)·partner, λ cast to the batch's dtype), plus, with ``then``,
        its parameters for each row and for its partner under ``shift_`` and ``partner_shift_`` prefixes."""
        partners, lam = self._draw(rows, epoch)
        out = {"partner": partners.cpu().numpy(), "lam": lam.cpu().numpy()}
        if self.then is not None:
            out.update({f"shift_{k}": v for k, v in self.then.parameters(rows, epoch).items()})
            out.update({f"partner_shift_{k}": v for k, v in self.then.parameters(partners, epoch).items()})
        return out

    def _draw(self, rows: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """Each row's partner, int64 (B,) indices into ``pool``, and its weight λ, float64 (B,) in [0, 1)."""
        partners = row_hash(rows, epoch, self.seed, 3) % len(self.pool)  # (B,)
        return partners, uniform(rows, epoch, self.seed, 4)

    def describe(self) -> str:
        inner = f", after {self.then.describe()}" if self.then else ""
        return f"mixup with a partner row of the transfer set, λ ~ U(0, 1){inner}"


MIN_SHIFTED_SIDE = 16  # images smaller than this are not shifted (see the module docstring)


def default_augmentation(input_shape: tuple[int, ...], seed: int = 0) -> Shift | None:
    """The augmentation a recipe uses for these inputs: shifts of up to side/14 pixels for images of at least
    16 × 16, nothing for smaller images and vectors."""
    if len(input_shape) == 3 and min(input_shape[1:]) >= MIN_SHIFTED_SIDE:
        return Shift(max(1, round(min(input_shape[1:]) / 14)), seed)
    return None
