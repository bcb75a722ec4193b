"""compressor/core/inputs.py: named inputs indexed as one tensor, cut per batch to the batch's longest row."""

from __future__ import annotations

import numpy as np
import torch

from compressor.core.inputs import NamedInputs, call, example_of, trace_args


def named(lengths) -> NamedInputs:
    lengths = np.asarray(lengths)
    ids = np.zeros((len(lengths), lengths.max()), np.int64)
    for i, n in enumerate(lengths):
        ids[i, :n] = np.arange(1, n + 1)
    return NamedInputs.from_numpy({"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)}, lengths)


def test_rows_are_cut_to_their_longest_row_and_keep_every_input():
    x = named([2, 7, 3, 5])
    batch = x[torch.tensor([0, 2])]
    assert batch.shape == (2, 3) and batch.names == ["input_ids", "attention_mask"]
    assert batch.tensors["input_ids"].tolist() == [[1, 2, 0], [1, 2, 3]]
    assert x[1:].shape == (3, 7) and x[np.array([True, False, False, True])].shape == (2, 5)
    assert len(x[0:0]) == 0 and x[3].shape == (1, 5)


def test_at_length_pads_with_masked_zeros_or_cuts():
    x = named([2, 4])
    longer, shorter = x.at_length(6), x.at_length(3)
    assert longer.shape == (2, 6) and longer.tensors["attention_mask"][:, 4:].sum() == 0
    assert shorter.tensors["input_ids"].tolist() == [[1, 2, 0], [1, 2, 3]] and shorter.lengths.tolist() == [2, 3]


def test_call_passes_named_inputs_positionally_in_their_order():
    x = named([3, 1])
    seen = call(lambda ids, mask: (ids.shape, int(mask.sum())), x)
    assert seen == ((2, 3), 4)
    assert call(lambda t: t * 2, torch.ones(2)).tolist() == [2.0, 2.0]
    assert list(example_of(x)) == ["input_ids", "attention_mask"] and len(trace_args(x)) == 2
    assert isinstance(x.numpy()["input_ids"], np.ndarray) and x.numpy()["input_ids"].dtype == np.int64
