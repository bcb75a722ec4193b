"""--data: digits, IDX folders (gzipped or not), .npz; deterministic splits; clear errors on bad files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from compressor.data.datasets import load_dataset, read_idx
from compressor.core.errors import CompressorError
from tests.conftest import FASHION_MNIST


def write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.fixture
def idx_dir(tmp_path, rng):
    folder = tmp_path / "tiny-mnist"
    folder.mkdir()
    for prefix, n in (("train", 50), ("t10k", 20)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 6, 5)), compress=True)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 3, n), compress=False)
    return folder


def test_digits_is_scaled_to_unit_range_and_split_deterministically():
    a, b = load_dataset("digits", seed=3), load_dataset("digits", seed=3)
    c = load_dataset("digits", seed=4)
    assert a.input_shape == (1, 8, 8) and a.train.x.dtype == np.float32
    assert 0.0 <= a.train.x.min() and a.train.x.max() == 1.0
    assert np.array_equal(a.test.x, b.test.x) and not np.array_equal(a.test.x, c.test.x)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.describe()["split"]["seed"] == 3


def test_idx_folder_gzipped_and_plain(idx_dir):
    data = load_dataset(str(idx_dir), seed=0, val_fraction=0.2)
    assert data.input_shape == (1, 6, 5)
    assert (len(data.train), len(data.val), len(data.test)) == (40, 10, 20)
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    # pixel / 255 exactly, with the channel axis added (ToTensor convention)
    pool = np.concatenate([data.train.x, data.val.x])
    assert np.allclose(np.sort(pool.ravel()), np.sort(raw.astype(np.float32).ravel() / 255.0))


def test_truncated_idx_file_names_the_file(idx_dir):
    target = idx_dir / "train-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:-5])
    with pytest.raises(CompressorError, match="train-labels-idx1-ubyte.*truncated"):
        load_dataset(str(idx_dir))


def test_npz_with_and_without_labels(tmp_path, rng):
    x = rng.normal(size=(100, 12)).astype(np.float64)
    np.savez(tmp_path / "labelled.npz", x=x, y=rng.integers(0, 4, 100))
    np.savez(tmp_path / "unlabelled.npz", x=x)
    labelled = load_dataset(str(tmp_path / "labelled.npz"))
    unlabelled = load_dataset(str(tmp_path / "unlabelled.npz"))
    assert labelled.train.x.dtype == np.float32 and labelled.input_shape == (12,)
    assert labelled.labelled and not unlabelled.labelled
    assert (unlabelled.train.y == -1).all() and unlabelled.num_classes is None


def test_npz_without_x_and_missing_path_are_clear(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 2)))
    with pytest.raises(CompressorError, match="no array 'x'"):
        load_dataset(str(tmp_path / "bad.npz"))
    with pytest.raises(CompressorError, match="no such file"):
        load_dataset(str(tmp_path / "absent"))


def test_max_train_caps_every_split():
    data = load_dataset("digits", max_train=100)
    assert len(data.train) == 100 and len(data.val) <= 100 and len(data.test) == 100


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_from_disk():
    data = load_dataset(str(FASHION_MNIST), seed=0)
    assert data.name == "fashion-mnist" and data.input_shape == (1, 28, 28)
    assert len(data.test) == 10_000 and len(data.train) + len(data.val) == 60_000
    assert data.class_names[9] == "ankle boot"
