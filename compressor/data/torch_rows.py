"""One row of a user's torch Dataset as the main job stores it: ``(input, label)`` (or the input alone: unlabeled),
the input a tensor or a dict of 1-D integer tensors by name (a text model's ``input_ids``, ``attention_mask``),
checked against the split's first row. :mod:`compressor.data.torch_data` reads whole splits with these.

Checks run in the DataLoader's workers and come back as text (never as a worker's traceback), so the main process
stops with one line naming the split, the row and the fix."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from compressor.core.errors import DataError, DataShapeError, first_line


@dataclass(frozen=True)
class RowSpec:
    """What every row of a split must look like, from its first row: one float32 tensor of ``shape``, or named
    int64 token inputs (``names``) of at most ``width`` positions each."""

    shape: tuple[int, ...] | None = None
    names: tuple[str, ...] | None = None
    width: int = 0

    @property
    def named(self) -> bool:
        return self.names is not None

    def describe(self) -> dict:
        return {"shape": None if self.shape is None else list(self.shape),
                "names": None if self.names is None else list(self.names), "width": self.width}


def parse_item(item) -> tuple[object, int]:
    """A Dataset item as (input, label): ``(x, y)``, ``(x,)`` or a bare ``x``; a label of None or -1 marks an
    unlabeled row. Raises DataError for a label that is not a whole number."""
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise DataError(f"an item of {len(item)} values; yield (input, label), or the input alone for an "
                            f"unlabeled row")
        x, y = item[0], (item[1] if len(item) == 2 else None)
    else:
        x, y = item, None
    return x, _label(y)


def _label(y) -> int:
    if y is None:
        return -1
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise DataError(f"a label tensor of shape {list(y.shape)}; yield one class index per row")
        y = y.item()
    if isinstance(y, np.ndarray):
        y = y.item() if y.size == 1 else y
    if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, float, np.integer, np.floating)) \
            or float(y) != int(y):
        raise DataError(f"the label {y!r} is not a class index; yield an int from 0 to C - 1 (-1 or None for an "
                        f"unlabeled row)")
    return int(y)


def _array(value, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    kind = type(value).__name__
    fix = " (end the transform with torchvision's ToTensor())" if "Image" in kind else ""
    raise DataShapeError(f"{what} is a {kind}, not a tensor{fix}; yield torch tensors or numpy arrays")


def spec_of(x, width: int | None) -> RowSpec:
    """The spec a split's first input sets; ``width`` bounds named inputs (the teachers' longest input)."""
    if isinstance(x, dict):
        arrays = {str(name): _array(value, f"input {name!r}") for name, value in x.items()}
        if not arrays or any(a.ndim != 1 or a.dtype.kind not in "iub" for a in arrays.values()):
            listing = ", ".join(f"{name} {list(a.shape)} {a.dtype}" for name, a in arrays.items())
            raise DataShapeError(f"a dict input of {listing or 'no tensors'}; dict inputs are token inputs, one 1-D "
                                 f"integer tensor per name (input_ids, attention_mask, ...): give other inputs as "
                                 f"one tensor")
        longest = max(len(a) for a in arrays.values())
        return RowSpec(names=tuple(arrays), width=width or longest)
    array = _array(x, "the input")
    if array.ndim == 0:
        raise DataShapeError("a 0-d input; yield a tensor of the model's input shape, without the batch axis")
    return RowSpec(shape=tuple(array.shape))


def row_values(x, spec: RowSpec) -> tuple[dict[str, np.ndarray], int]:
    """The row's arrays by file name ("x", or each input's name), padded to the spec's width, and its length (real
    tokens: the attention mask's count where there is one); raises DataShapeError when it breaks the spec."""
    if not spec.named:
        array = _array(x, "the input")
        if tuple(array.shape) != spec.shape:
            raise DataShapeError(f"an input of shape {list(array.shape)}, but the split's first row has "
                                 f"{list(spec.shape)}; every row must have one shape (resize, crop or pad in the "
                                 f"Dataset's transform)")
        array = np.asarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise DataError("an input holding NaN or Inf; clean the data or fix the transform")
        return {"x": array}, 0
    if not isinstance(x, dict) or tuple(map(str, x)) != spec.names:
        have = sorted(map(str, x)) if isinstance(x, dict) else type(x).__name__
        raise DataShapeError(f"inputs {have}, but the split's first row has {list(spec.names)}; yield the same "
                             f"names in every row")
    arrays = {name: _array(x[name], f"input {name!r}") for name in spec.names}
    for name, array in arrays.items():
        if array.ndim != 1 or len(array) > spec.width:
            raise DataShapeError(f"input {name!r} of shape {list(array.shape)}; token inputs are 1-D with at most "
                                 f"{spec.width} positions (the teachers' longest input, else the first row's)")
    mask = arrays.get("attention_mask")
    length = int((mask != 0).sum()) if mask is not None else len(next(iter(arrays.values())))
    padded = {name: np.pad(a.astype(np.int64), (0, spec.width - len(a))) for name, a in arrays.items()}
    return padded, max(length, 1)


class CheckedRows:
    """The DataLoader's collate function: a batch of items → (arrays by name (B, ...), labels (B,), lengths (B,),
    the first problem as (offset in the batch, the DataError subclass's name, text) or None). Rows after a bad one
    are dropped; the reader stops on it."""

    def __init__(self, spec: RowSpec):
        self.spec = spec

    def __call__(self, items: list):
        values, labels, lengths = [], [], []
        for offset, item in enumerate(items):
            if isinstance(item, Failed):
                return *_stack(values, labels, lengths), (offset, DataError.__name__, item.why)
            try:
                x, y = parse_item(item)
                arrays, length = row_values(x, self.spec)
            except DataError as exc:
                return *_stack(values, labels, lengths), (offset, type(exc).__name__, str(exc))
            values.append(arrays)
            labels.append(y)
            lengths.append(length)
        return *_stack(values, labels, lengths), None


def _stack(values: list[dict], labels: list[int], lengths: list[int]):
    arrays = {name: np.stack([row[name] for row in values]) for name in values[0]} if values else {}
    return arrays, np.asarray(labels, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


@dataclass(frozen=True)
class Failed:
    """What reading a row raised, in place of the row."""

    why: str


class SafeRows(torch.utils.data.Dataset):
    """A map-style Dataset whose rows' exceptions come back as :class:`Failed` rows (named by the reader)."""

    def __init__(self, dataset, rows: int):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except Exception as exc:  # the user's code: any exception is a row it cannot give
            return Failed(f"reading it raised {type(exc).__name__}: {first_line(exc)}")


class SafeIterable(torch.utils.data.IterableDataset):
    """An iterable Dataset, at most ``rows`` of it, whose exception ends it with a :class:`Failed` row."""

    def __init__(self, dataset, rows: int | None):
        self.dataset, self.rows = dataset, rows

    def __iter__(self):
        try:
            for count, item in enumerate(self.dataset):
                if self.rows is not None and count >= self.rows:
                    return
                yield item
        except Exception as exc:  # the user's code
            yield Failed(f"iterating raised {type(exc).__name__}: {first_line(exc)}")
