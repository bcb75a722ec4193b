"""A split's inputs read from disk and normalised on access, batch by batch, so a run over a large dataset never
holds it in RAM: indexing a :class:`LazyInputs` reads only those rows of its (memory-mapped) array and returns them
as float32 torch tensors, preprocessed by the bundle's own function."""

from __future__ import annotations

import numpy as np
import torch

from compressor.core.preprocessing import apply_normalisation


class LazyInputs:
    """(N, *input_shape) inputs as the training side reads a tensor: ``x[rows]``, ``x[a:b]``, ``x[mask]``, ``len(x)``,
    ``x.shape``, ``x.device`` and ``x.numpy()`` behave as they do on the normalised float32 tensor, but rows are
    decoded from ``raw`` (any numeric dtype, e.g. a uint8 memmap of images) times ``scale`` when asked for."""

    def __init__(self, raw: np.ndarray, normalisation: dict | None, scale: float = 1.0):
        self.raw, self.normalisation, self.scale = raw, normalisation, scale
        self.shape = torch.Size(raw.shape)
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        if isinstance(index, np.ndarray) and index.dtype != bool:
            index = np.asarray(index, dtype=np.int64)
        if isinstance(index, (int, np.integer)):  # one row, without the batch axis, as a tensor gives it
            return self[np.asarray([index])][0]
        rows = np.asarray(self.raw[index])
        x = rows.astype(np.float32) * np.float32(self.scale) if self.scale != 1.0 else rows
        return torch.from_numpy(np.ascontiguousarray(apply_normalisation(x, self.normalisation)))

    def numpy(self) -> np.ndarray:
        """Every row, normalised: the whole split in RAM (for small splits only)."""
        return self[:].numpy()

    def to(self, *args, **kwargs) -> "LazyInputs":
        """A lazy split stays on the CPU; rows move to a device once read."""
        return self


class RowSubset:
    """Rows ``rows`` of a split (a tensor or :class:`LazyInputs`), indexed like a tensor of ``len(rows)`` rows:
    ``x[idx]`` reads rows ``rows[idx]`` of the split, and only those, so a subset of a split on disk stays on disk."""

    def __init__(self, x, rows: torch.Tensor):
        self.x, self.rows = x, rows
        self.shape = torch.Size((len(rows), *x.shape[1:]))
        self.device, self.dtype = x.device, x.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> torch.Tensor:
        return self.x[self.rows[index]]

    def to(self, *args, **kwargs) -> "RowSubset":
        return self
