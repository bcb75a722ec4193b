"""Under torchrun, the teachers' pass over the transfer set split across the ranks, so its time divides by their
number: rank r runs every member on its contiguous share of the rows and writes their logits to
``<cache>/.<digest>.shards/rank-<r>.npy`` (float32, through a memory map); after a barrier rank 0 reads the shards
in row order as the stream :meth:`TeacherCache.store` writes into the entry, and removes them. The held-out splits
(a tenth of the rows or less) stay on rank 0.

The shards live beside the cache because the ranks of one job share it (the other ranks read the entry rank 0
stores there). Where they do not share a filesystem, rank 0 finds a shard missing and runs the teachers on those
rows itself: slower, never wrong.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from compressor.teachers.ensemble import Ensemble
from compressor.training.distributed import World
from compressor.training.teacher_cache import StreamedLogits, TeacherCache, write_float32

SHARD_READ_ROWS = 8192  # rows of a shard handed to the cache writer at a time


def shard_bounds(rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [first, stop) of ``rows`` rows: the first ``rows % size`` ranks one more."""
    base, extra = divmod(rows, size)
    first = rank * base + min(rank, extra)
    return first, first + base + (rank < extra)


class _RowRange:
    """Rows [first, stop) of a split (a tensor or :class:`compressor.data.lazy.LazyInputs`), sliced lazily."""

    def __init__(self, x, first: int, stop: int):
        self.x, self.first, self.stop = x, first, stop

    def __len__(self) -> int:
        return self.stop - self.first

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(len(self))
        return self.x[self.first + start:self.first + stop]


def shard_folder(cache: TeacherCache) -> Path:
    return cache.root / f".{cache.digest[:16]}.shards"


def write_shard(cache: TeacherCache, ensemble: Ensemble, x_train, world: World, precision: str,
                on_batch=None) -> None:
    """This rank's share of the transfer set through every member, written to its shard file (atomically)."""
    first, stop = shard_bounds(len(x_train), world.rank, world.size)
    folder = shard_folder(cache)
    folder.mkdir(parents=True, exist_ok=True)
    if stop > first:  # an empty share writes nothing; assembling it yields nothing either
        batches = ensemble.iter_member_logits(_RowRange(x_train, first, stop), on_batch=on_batch, device=world.device,
                                              precision=precision)
        write_float32(folder / f"rank-{world.rank}.npy", StreamedLogits(stop - first, batches))


def assembled(cache: TeacherCache, ensemble: Ensemble, x_train, world: World, precision: str,
              on_batch=None) -> StreamedLogits:
    """The transfer set's logits, shard after shard in row order, as :meth:`TeacherCache.store` consumes them; a
    shard that is not there (no shared filesystem) is computed here."""
    def batches() -> Iterator[tuple[int, torch.Tensor]]:
        for rank in range(world.size):
            first, stop = shard_bounds(len(x_train), rank, world.size)
            file = shard_folder(cache) / f"rank-{rank}.npy"
            if not file.is_file():
                for start, logits in ensemble.iter_member_logits(_RowRange(x_train, first, stop), on_batch=on_batch,
                                                                 device=world.device, precision=precision):
                    yield first + start, logits
                continue
            shard = np.load(file, mmap_mode="r")
            for start in range(0, stop - first, SHARD_READ_ROWS):
                yield first + start, torch.from_numpy(np.array(shard[:, start:start + SHARD_READ_ROWS]))
            del shard

    return StreamedLogits(len(x_train), batches())


def remove_shards(cache: TeacherCache) -> None:
    shutil.rmtree(shard_folder(cache), ignore_errors=True)
