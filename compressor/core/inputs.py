"""Several named model inputs held as one object: a text classifier's ``input_ids`` and ``attention_mask`` (int64,
(N, L) each, right-padded), indexed by rows as a single input tensor is, so the loop, the teachers, the cache and
the report take either without asking which.

Models with named inputs are called positionally, in the inputs' order (``model(*x.values())``): the order the
ONNX graph, the TorchScript archive and a Hugging Face ``forward(input_ids, attention_mask, token_type_ids)`` share.
A selection of rows is cut to the longest of them (padding per batch), so a batch of short sequences costs what
short sequences cost; ``at_length`` pads or cuts every row to one length for timing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class NamedInputs:
    """(N, L) tensors by name, the same N rows each, plus each row's length (its real tokens, before padding)."""

    def __init__(self, tensors: dict[str, Tensor], lengths: Tensor):
        self.tensors = dict(tensors)
        self.lengths = lengths  # (N,) int64
        first = next(iter(self.tensors.values()))
        self.shape, self.device, self.dtype = first.shape, first.device, first.dtype

    @classmethod
    def from_numpy(cls, arrays: dict[str, np.ndarray], lengths: np.ndarray) -> "NamedInputs":
        """Wrap (N, L) arrays without copying them."""
        return cls({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()},
                   torch.from_numpy(np.asarray(lengths, dtype=np.int64)))

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def values(self) -> tuple[Tensor, ...]:
        """The tensors in the model's positional order."""
        return tuple(self.tensors.values())

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> "NamedInputs":
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1)
        if isinstance(index, Tensor) and index.device != self.lengths.device:
            index = index.to(self.lengths.device)
        lengths = self.lengths[index]
        width = max(1, int(lengths.max())) if len(lengths) else 1
        return NamedInputs({name: t[index][:, :width] for name, t in self.tensors.items()}, lengths)

    def to(self, *args, **kwargs) -> "NamedInputs":
        return NamedInputs({name: t.to(*args, **kwargs) for name, t in self.tensors.items()}, self.lengths)

    def numpy(self) -> dict[str, np.ndarray]:
        """name → (N, L) array: what a target's runner takes."""
        return {name: t.cpu().numpy() for name, t in self.tensors.items()}

    def at_length(self, length: int) -> "NamedInputs":
        """Every row cut or right-padded (with zeros: padding tokens, masked out) to ``length`` positions."""
        def fit(t: Tensor) -> Tensor:
            if t.shape[1] >= length:
                return t[:, :length]
            return torch.cat([t, t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))], dim=1)
        return NamedInputs({name: fit(t) for name, t in self.tensors.items()}, self.lengths.clamp(max=length))

    def describe(self) -> list[dict]:
        """Each input's name and dtype, for metadata and reports."""
        return [{"name": name, "dtype": str(t.dtype).replace("torch.", "")} for name, t in self.tensors.items()]


def call(model, x):
    """``model(x)`` for one input tensor, ``model(*x.values())`` for named inputs."""
    return model(*x.values()) if isinstance(x, NamedInputs) else model(x)


def example_of(x, rows: int = 2):
    """The first ``rows`` rows as what an export or a trace takes: a tensor, or a dict name → tensor (at least two
    positions long: torch.export would fix a sequence axis of length 1 as a constant)."""
    part = x[:rows]
    return dict(part.at_length(max(2, part.shape[1])).tensors) if isinstance(part, NamedInputs) else part


def trace_args(example) -> tuple:
    """``example`` (a tensor, a dict of tensors or NamedInputs) as ``torch.jit.trace``'s positional inputs."""
    if isinstance(example, NamedInputs):
        return example.values()
    return tuple(example.values()) if isinstance(example, dict) else (example,)
