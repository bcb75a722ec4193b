"""What a runner takes: one array (N, ...), or arrays by name — a text model's ``input_ids`` and ``attention_mask``,
(N, L) int64 each — holding the same N rows. Every runner, the timing harness and the calibration reader go through
these few functions, so none of them asks which of the two it was given.

A model's inputs are described as ``(name, shape, dtype)`` with strings for the dynamic axes: ("batch", 1, 8, 8)
for an image, ("batch", "sequence") for token ids. numpy only.
"""

from __future__ import annotations

from typing import Union

import numpy as np

from compressor.core.errors import CompressorError

Feed = Union[np.ndarray, dict[str, np.ndarray]]
BATCH_AXIS, SEQUENCE_AXIS = "batch", "sequence"


def is_named(feed) -> bool:
    """Whether ``feed`` holds arrays by name (a dict) rather than one array."""
    return isinstance(feed, dict)


def as_feed(pool) -> Feed:
    """``pool`` as a feed: arrays by name as they are, anything else as one numpy array."""
    return pool if is_named(pool) else np.asarray(pool)


def feed_rows(feed: Feed) -> int:
    """N, the rows every array of ``feed`` holds."""
    return len(next(iter(feed.values()))) if is_named(feed) else len(feed)


def take_rows(feed: Feed, index) -> Feed:
    """The rows ``index`` (a slice or an index array) of every array, C-contiguous."""
    if is_named(feed):
        return {name: np.ascontiguousarray(array[index]) for name, array in feed.items()}
    return np.ascontiguousarray(feed[index])


def feed_arrays(feed: Feed) -> list[np.ndarray]:
    """The arrays in the model's positional order (one array: a list of one)."""
    return list(feed.values()) if is_named(feed) else [feed]


def example_specs(example) -> list[tuple[str, tuple]]:
    """``(name, shape)`` of each model input from an example batch (a tensor or array, or a dict of them): the batch
    axis first, and for named inputs of two or more axes the second is the sequence, dynamic as well."""
    if not is_named(example):
        return [("input", (BATCH_AXIS, *(int(d) for d in example.shape[1:])))]
    return [(name, (BATCH_AXIS, *((SEQUENCE_AXIS,) if len(t.shape) > 1 else ()), *(int(d) for d in t.shape[2:])))
            for name, t in example.items()]


def by_name(feed: Feed, names: list[str], where) -> dict[str, np.ndarray]:
    """``feed`` as {input name: array} for a model whose inputs are ``names``: one array goes to a model of one
    input; arrays by name must be exactly those names (one line naming the missing and unknown ones otherwise)."""
    if not is_named(feed):
        if len(names) != 1:
            raise CompressorError(f"{where}: the model takes {len(names)} inputs ({', '.join(names)}); pass a dict "
                                  "of arrays by those names, not one array")
        return {names[0]: feed}
    missing, unknown = [n for n in names if n not in feed], [n for n in feed if n not in names]
    if missing or unknown:
        parts = [f"no {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(unknown)}"] * bool(unknown)
        raise CompressorError(f"{where}: the model's inputs are {', '.join(names)}, but the arrays given have "
                              f"{'; '.join(parts)}")
    return {name: feed[name] for name in names}


def check_array(x, where, name: str, shape: tuple, dtype: np.dtype) -> None:
    """CompressorError naming the expected and actual dtype/shape of input ``name``; a runtime's own is cryptic.
    ``shape`` has strings for the dynamic axes: ("batch", 1, 8, 8), ("batch", "sequence")."""
    expected = "(" + ", ".join(str(d) for d in shape) + ")"
    what = f"input {name!r}" if name not in ("input", "") else "input"
    if not isinstance(x, np.ndarray):
        named = f" for {what}" if what != "input" else ""
        raise CompressorError(f"{where}: expected a numpy array of shape {expected}{named}, got {type(x).__name__}")
    if x.dtype != dtype:
        raise CompressorError(f"{where}: expected {dtype.name} {what} of shape {expected}, got {x.dtype.name}; "
                              f"convert with x.astype(np.{dtype.name})")
    fixed_ok = all(not isinstance(want, int) or want == got for want, got in zip(shape, x.shape))
    if x.ndim != len(shape) or not fixed_ok:
        raise CompressorError(f"{where}: expected {what} of shape {expected}, got {tuple(x.shape)}")


def check_feed(feed: Feed, where, specs: list[tuple[str, tuple, np.dtype]]) -> dict[str, np.ndarray]:
    """``feed`` by input name after checking every array against ``specs`` (name, shape, dtype), in their order,
    and that all hold the same rows."""
    named = by_name(feed, [name for name, _, _ in specs], where)
    for name, shape, dtype in specs:
        check_array(named[name], where, name, shape, dtype)
    rows = {len(array) for array in named.values()}
    if len(rows) > 1:
        raise CompressorError(f"{where}: the input arrays hold different numbers of rows "
                              f"({', '.join(f'{n}: {len(a)}' for n, a in named.items())})")
    return named
