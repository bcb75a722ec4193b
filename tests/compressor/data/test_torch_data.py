"""compressor.Data read into the data cache: rows in order through worker processes, a bad row named by its index,
splits that disagree refused, an entry reused by its key and read again when a file no longer matches its sha256."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import compressor
from compressor.config import RunConfig
from compressor.core.errors import DataError, DataShapeError
from compressor.data.torch_data import read_torch_data
from compressor.data.torch_rows import parse_item, row_values, spec_of
from compressor.teachers.in_memory import ensemble_from_modules
from tests.compressor.test_api import Rows, digits_splits


def test_the_data_cache_is_reused_and_a_damaged_entry_is_read_again(digits_nets, digits_data, tmp_path, capsys):
    config = RunConfig(teacher=Path("t"), teacher_cache=tmp_path / "cache")
    ensemble = ensemble_from_modules(digits_nets)
    first = read_torch_data(digits_splits(digits_data), config, ensemble)
    entry = Path(first.split_info["cache"])
    stamp = (entry / "train-x.bin").stat().st_mtime_ns
    again = read_torch_data(digits_splits(digits_data), config, ensemble)
    assert (entry / "train-x.bin").stat().st_mtime_ns == stamp and again.fingerprint() == first.fingerprint()
    np.testing.assert_array_equal(np.asarray(again.train.x), digits_data.train.x)
    with open(entry / "train-x.bin", "r+b") as handle:  # one byte flipped: the entry must not be used
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    third = read_torch_data(digits_splits(digits_data), config, ensemble)
    assert "does not match its record" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(third.train.x), digits_data.train.x)


def test_worker_processes_read_the_rows_in_order_and_name_a_bad_row_by_its_index(digits_nets, digits_data,
                                                                                   tmp_path):
    d = digits_data
    config = RunConfig(teacher=Path("t"), teacher_cache=tmp_path / "cache")
    ensemble = ensemble_from_modules(digits_nets)
    data = compressor.Data(train=Rows(d.train.x, d.train.y), test=Rows(d.test.x, d.test.y), workers=2)
    read = read_torch_data(data, config, ensemble)
    np.testing.assert_array_equal(np.asarray(read.test.x), d.test.x)
    np.testing.assert_array_equal(read.test.y, d.test.y)
    x = d.train.x.copy()
    x[700, 0, 0, 0] = np.nan  # in the third batch of 256, read by a worker
    bad = compressor.Data(train=Rows(x, d.train.y), test=Rows(d.test.x, d.test.y), workers=2, fingerprint="nan")
    with pytest.raises(DataError, match="the train split, row 700: an input holding NaN"):
        read_torch_data(bad, config, ensemble)  # a fingerprint of its own: row 700 is not among the sampled rows
    other = compressor.Data(train=Rows(d.train.x, d.train.y), test=Rows(d.test.x[:, :, :4], d.test.y))
    with pytest.raises(DataShapeError, match=r"the test split's first row has inputs \[1, 4, 8\] but the train"):
        read_torch_data(other, config, ensemble)


@pytest.mark.parametrize("item, label", [((np.zeros(3), 2), 2), ((np.zeros(3),), -1), (np.zeros(3), -1),
                                         ((np.zeros(3), None), -1), ((np.zeros(3), np.int64(4)), 4),
                                         ((np.zeros(3), 1.0), 1)])
def test_an_item_is_input_and_label_or_the_input_alone(item, label):
    assert parse_item(item)[1] == label


@pytest.mark.parametrize("label", [1.5, "cat", True, np.zeros(2)])
def test_a_label_that_is_not_a_class_index_is_refused(label):
    with pytest.raises(DataError, match="class index"):
        parse_item((np.zeros(3), label))


def test_token_rows_are_padded_to_the_width_and_counted_by_their_mask():
    spec = spec_of({"input_ids": np.array([1, 5, 6]), "attention_mask": np.array([1, 1, 1])}, 6)
    arrays, length = row_values({"input_ids": np.array([1, 7, 0, 0]), "attention_mask": np.array([1, 1, 0, 0])},
                                spec)
    assert arrays["input_ids"].tolist() == [1, 7, 0, 0, 0, 0] and length == 2
    with pytest.raises(DataShapeError, match="at most 6 positions"):
        row_values({"input_ids": np.arange(7), "attention_mask": np.ones(7, int)}, spec)
    with pytest.raises(DataShapeError, match="dict inputs are token inputs"):
        spec_of({"image": np.zeros((1, 8, 8), np.float32)}, None)
