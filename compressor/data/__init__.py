"""The data the student learns from and is scored on: datasets read from disk and split (``--data``), checked
against the teachers and normalised into tensors, and the deterministic augmentations recipes apply.

Public entry points: :func:`load_dataset`, :func:`load_data`, :func:`to_tensors`, :class:`Dataset`, :class:`Tensors`.
"""

from compressor.data.datasets import Dataset, Split, load_dataset
from compressor.data.loading import Tensors, load_data, to_tensors

__all__ = ["Dataset", "Split", "Tensors", "load_data", "load_dataset", "to_tensors"]
