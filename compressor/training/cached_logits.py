"""The teacher cache's logits as the training loop reads them, one batch of rows at a time: dense
(:class:`CachedLogits`, members × rows × classes), or with ``--cache-top-k K`` only each member's K largest logits
per row plus the log-sum-exp of the rest (:class:`TopKLogits`).

For a large number of classes C the dense (members, rows, C) cache dominates disk and page cache: ImageNet-1k's
1.28 M training images × 1000 classes × 5 members is 12.8 GB in float16. A trained classifier puts nearly all of its
probability on a few classes, so a member's row is stored as its top-K logits (values and class indices) and one
number for the tail, ``log Σ_{j ∉ top-K} exp(z_j)``. DistillKit and ModelOpt store distillation targets the same way.

The loss then reads a dense row rebuilt from it: the top-K logits exactly, and every tail class at the same value
``tail - log(C - K)``, so at T = 1 the member's probabilities on its top-K classes and the tail's total mass are
exact. At a temperature above 1 the tail's tempered mass is approximated (spread evenly rather than as the member
spread it); the entry records how much mass the tail held at T = 1 (``tail_mass``), which bounds what can move.
Because the rebuilt rows are ordinary logits, every loss implementation, the kernels included, works from them
unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from compressor.core.errors import CompressorError


class CachedLogits:
    """Member logits (K, N, C) held in a (memory-mapped) array, optionally seen through a subset of its rows.

    ``take(idx)`` returns rows ``idx`` of the (subset) view as a float32 tensor (K, B, C); the training loop calls
    it once per batch, so only those rows are read from disk.
    """

    def __init__(self, array: np.ndarray, rows: np.ndarray | None = None):
        self.array = array  # (K, N_all, C)
        self.rows = rows    # (N,) int64 indices into N_all, or None for all rows

    @property
    def shape(self) -> tuple[int, int, int]:
        k, n, c = self.array.shape
        return k, (n if self.rows is None else len(self.rows)), c

    def subset(self, rows: np.ndarray) -> "CachedLogits":
        """The same logits seen through ``rows`` (indices into this view)."""
        rows = np.asarray(rows, dtype=np.int64)
        return self._view(None, rows if self.rows is None else self.rows[rows])

    def first_member(self) -> "CachedLogits":
        """The first member's logits (1, N, C) through the same rows."""
        return self._view(slice(0, 1), self.rows)

    def _view(self, members: slice | None, rows: np.ndarray | None) -> "CachedLogits":
        """These logits through ``rows``, for ``members`` (None: all of them, the same arrays, never a copy)."""
        return CachedLogits(self.array if members is None else self.array[members], rows)

    def take(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (B,) of this view as float32 (K, B, C)."""
        return torch.from_numpy(np.asarray(self.array[:, self._rows(idx)], dtype=np.float32))

    def _rows(self, idx: Tensor) -> np.ndarray:
        picked = idx.cpu().numpy()
        return picked if self.rows is None else self.rows[picked]

    def to_tensor(self) -> Tensor:
        """Every row of this view as one float32 tensor (K, N, C)."""
        return self.take(torch.arange(self.shape[1]))


def reduce_top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(K, B, C) float logits → top-``k`` values (K, B, k) float32, their class indices (K, B, k) int64, and the
    tail's log-sum-exp (K, B) float32; ``k`` is below C (:func:`check_top_k`)."""
    logits = logits.float()
    values, indices = torch.topk(logits, k, dim=-1)  # (K, B, k)
    masked = logits.scatter(-1, indices, -math.inf)  # (K, B, C) with the top-k removed
    return values, indices, torch.logsumexp(masked, dim=-1)


def tail_mass(values: Tensor, tail: Tensor) -> Tensor:
    """The probability the tail holds at T = 1 per member and row (K, B): exp(tail - logsumexp(all))."""
    total = torch.logaddexp(torch.logsumexp(values, dim=-1), tail)
    return torch.exp(tail - total)


def densify(values: Tensor, indices: Tensor, tail: Tensor, num_classes: int) -> Tensor:
    """Rebuild dense logits (K, B, C) float32: top-k values at their indices, the tail spread evenly over the
    other ``num_classes - k`` classes."""
    fill = (tail - math.log(num_classes - values.shape[-1])).unsqueeze(-1)  # (K, B, 1)
    out = fill.expand(*values.shape[:2], num_classes).clone()
    return out.scatter_(-1, indices, values)


def check_top_k(k: int, num_classes: int) -> None:
    """Refuse a ``--cache-top-k`` that keeps every class (nothing to save) or more."""
    if k >= num_classes:
        raise CompressorError(f"--cache-top-k {k} keeps every one of the ensemble's {num_classes} classes; choose a "
                              f"K below {num_classes} (about 20 for 1000 classes) or drop the flag")


def index_dtype(num_classes: int) -> np.dtype:
    """The smallest integer type that holds a class index."""
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max else np.dtype(np.int32)


class TopKLogits(CachedLogits):
    """Member logits stored as top-k values (K, N_all, k), indices (K, N_all, k) and tail (K, N_all), seen through
    an optional subset of rows; ``take(idx)`` rebuilds the dense (K, B, C) rows, so the training loop and the
    losses read it as they read a dense cache."""

    def __init__(self, values: np.ndarray, indices: np.ndarray, tail: np.ndarray, num_classes: int,
                 rows: np.ndarray | None = None):
        super().__init__(values, rows)
        self.indices, self.tail, self.num_classes = indices, tail, num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        k, n, _ = super().shape
        return k, n, self.num_classes

    def _view(self, members: slice | None, rows: np.ndarray | None) -> "TopKLogits":
        arrays = [a if members is None else a[members] for a in (self.array, self.indices, self.tail)]
        return TopKLogits(*arrays, self.num_classes, rows)

    def take(self, idx: Tensor) -> Tensor:
        picked = self._rows(idx)
        return densify(torch.from_numpy(np.asarray(self.array[:, picked], dtype=np.float32)),
                       torch.from_numpy(np.asarray(self.indices[:, picked], dtype=np.int64)),
                       torch.from_numpy(np.asarray(self.tail[:, picked], dtype=np.float32)), self.num_classes)
