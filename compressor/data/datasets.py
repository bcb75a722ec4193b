"""Datasets for distillation: what ``--data`` accepts, loaded from disk, split deterministically.

Accepted specs (nothing is ever downloaded):
- ``digits``: scikit-learn's 8×8 digits (1,797 images shipped inside scikit-learn), pixel / 16 → [0, 1], shape (1, 8, 8).
- a directory of MNIST-format IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-…``, ``t10k-…``),
  e.g. Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``: pixel / 255 → float32 in [0, 1], shape (1, H, W),
  which is what a teacher trained with torchvision's ``ToTensor`` expects. The official t10k set is the test split.
- an ``.npz`` file with ``x`` (N, ...) and optionally ``y`` (N,): values as stored, cast to float32.
- an image folder, ``DIR/train/<class>/*.png|jpg|jpeg|webp`` (optional ``val/`` and ``test/``): decoded once into
  the data cache and read back lazily (:mod:`compressor.data.image_folder`), pixel / 255 → float32 in [0, 1].

Normalisation (mean/std) is never applied here: it comes from the ensemble's metadata or ``--normalise`` and is
applied by the pipeline with the very function the deployment bundle uses.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from compressor.core.errors import CompressorError, EmptySplitError
from compressor.core.fileio import default_cache_root
from compressor.core.inputs import NamedInputs
from compressor.core.preprocessing import ImageSpec
from compressor.data.image_cache import load_split_arrays
from compressor.data.hf import hf_sources, open_hf
from compressor.data.tokens import token_columns, token_splits
from compressor.data.image_folder import explain_folder, is_image_folder, split_listings

FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]


@dataclass
class Split:
    """One split: ``x`` (N, *input_shape) and ``y`` (N,) int64 with -1 for unlabeled rows. ``x`` is float32 in RAM, or
    for a streamed source a memory-mapped array read lazily, whose values times ``scale`` are the model's input."""

    x: np.ndarray
    y: np.ndarray
    scale: float = 1.0
    streamed: bool = False

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A loaded dataset: three splits plus what is needed to describe them in a report."""

    name: str
    source: str
    preprocessing: str
    class_names: list[str] | None
    train: Split
    val: Split
    test: Split
    split_info: dict = field(default_factory=dict)
    digest: str | None = None  # a streamed source's identity (its files and preprocessing), instead of its bytes
    image_spec: dict | None = None  # an image folder's decoding (compressor.core.preprocessing.ImageSpec)
    _digest: tuple | None = field(default=None, init=False, repr=False, compare=False)  # (array ids, sha256)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def named_inputs(self) -> bool:
        """Whether the inputs are several named tensors (a text dataset's input_ids, attention_mask, ...)."""
        return isinstance(self.train.x, NamedInputs)

    def example(self, rows: int = 2):
        """The first ``rows`` training rows where a student needs real inputs to be built (named inputs), else
        None (zeros of the input shape do)."""
        return self.train.x[:rows] if self.named_inputs else None

    @property
    def labelled(self) -> bool:
        return bool((self.train.y >= 0).any())

    @property
    def num_classes(self) -> int | None:
        labels = np.concatenate([self.train.y, self.val.y, self.test.y])
        labels = labels[labels >= 0]
        return int(labels.max()) + 1 if labels.size else None

    def fingerprint(self) -> str:
        """sha256 over every split's bytes: identifies the exact data a checkpoint was trained on.

        Computed once per set of split arrays (a run asks for it for the teacher cache, the student and the
        baseline), and hashed from the arrays' memory without copying them.
        """
        if self.digest is not None:  # hashing a streamed dataset's bytes would read all of it
            return hashlib.sha256(json.dumps([self.digest, self.split_info], sort_keys=True).encode()).hexdigest()
        arrays = [array for part in (self.train, self.val, self.test) for array in (*_arrays(part.x), part.y)]
        ids = tuple(id(array) for array in arrays)
        if self._digest is None or self._digest[0] != ids:
            digest = hashlib.sha256()
            for array in arrays:
                digest.update(np.ascontiguousarray(array).data)
            self._digest = (ids, digest.hexdigest())
        return self._digest[1]

    def describe(self) -> dict:
        """JSON-safe summary for the report: source, preprocessing, shapes and the split."""
        return {
            "name": self.name,
            "source": self.source,
            "preprocessing": self.preprocessing,
            "input_shape": list(self.input_shape),
            "inputs": self.train.x.describe() if self.named_inputs else None,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "split": self.split_info,
        }


def _arrays(x) -> list:
    """The arrays holding a split's inputs: one, or each named input and the row lengths."""
    if isinstance(x, NamedInputs):
        return [t.numpy() for t in (*x.values(), x.lengths)]
    return [x]


@dataclass(frozen=True)
class ReadOptions:
    """How a streamed source (an image folder, ``hf:``, ``parquet:``) is read: the images' decoding, where the data
    cache lives (default: the teacher cache's root), what an unreadable image does ("stop" or "skip"), a Hugging
    Face dataset's columns (default: its first Image column, and ``label``), and ``channels``: when given, called
    with every split's image sources before decoding, it returns the channels to decode to and why (recorded as
    ``split_info["channels"]``), overriding ``images.channels``."""

    images: ImageSpec = field(default_factory=ImageSpec)
    cache_root: Path | None = None
    on_bad_image: str = "stop"
    input_columns: str | None = None
    label_column: str | None = None
    channels: Callable[[dict], tuple[int, str]] | None = None


def load_dataset(spec: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 max_train: int | None = None, read: ReadOptions | None = None) -> Dataset:
    """Load ``--data SPEC`` and split it deterministically from ``seed``.

    ``val_fraction`` of the training pool becomes validation; ``test_fraction`` of the examples becomes the test
    split unless the source has its own (IDX ``t10k``). ``max_train`` keeps the first ``max_train`` training
    examples of the seeded permutation (val and test are capped at the same number), for quick runs. Streamed
    sources are read as ``read`` says.
    """
    read = read or ReadOptions()
    if read.on_bad_image not in ("stop", "skip"):
        raise CompressorError(f"--on-bad-image {read.on_bad_image}: choose stop or skip")
    if spec == "digits":
        dataset = _load_digits(seed, val_fraction, test_fraction)
    elif spec.startswith(("hf:", "parquet:")):
        dataset = _load_hf(spec, seed, val_fraction, test_fraction, read)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise CompressorError(
                f"--data {spec}: no such file or directory; pass 'digits', a folder of MNIST-format IDX files "
                f"(e.g. /usr/share/datasets/fashion-mnist after 'apt-get install -y dataset-fashion-mnist') or an .npz file")
        if path.is_dir() and is_image_folder(path):
            sources, classes, info = split_listings(path, seed, val_fraction, test_fraction, read.on_bad_image)
            dataset = _streamed(str(path), path.name, sources, classes, info, read)
        elif path.is_dir():
            explain_folder(path)  # images laid out otherwise are told so, not "no IDX file"
            dataset = _load_idx_dir(path, seed, val_fraction)
        elif path.suffix == ".npz":
            dataset = _load_npz(path, seed, val_fraction, test_fraction)
        else:
            raise CompressorError(f"--data {spec}: not an image folder, a folder of IDX files nor an .npz file; "
                                  f"see 'compress --help'")
    if max_train is not None:
        if max_train < 1:
            raise CompressorError(f"--max-train {max_train}: must be at least 1")
        for name in ("train", "val", "test"):
            part = getattr(dataset, name)
            setattr(dataset, name, Split(part.x[:max_train], part.y[:max_train], part.scale, part.streamed))
        dataset.split_info["max_train"] = max_train
    for name in ("train", "val", "test"):
        if len(getattr(dataset, name)) == 0:
            raise EmptySplitError(f"--data {spec}: the {name} split is empty; the dataset is too small to split")
    return dataset


def _load_hf(spec: str, seed: int, val_fraction: float, test_fraction: float, read: ReadOptions) -> Dataset:
    """A Hugging Face dataset: pre-tokenised text held as named int64 inputs, or images decoded into the cache."""
    loaded = open_hf(spec)
    name = Path(spec.partition(":")[2]).name or spec
    columns = token_columns(spec, loaded, read.input_columns)
    if columns is None:
        sources, classes, info = hf_sources(spec, loaded, read.input_columns, read.label_column, seed, val_fraction,
                                            test_fraction)
        return _streamed(spec, name, sources, classes, info, read)
    splits, classes, info = token_splits(spec, loaded, columns, read.label_column, seed, val_fraction, test_fraction)
    preprocessing = (f"pre-tokenised int64 columns {', '.join(columns)}, right-padded with 0 and cut per batch to "
                     f"its longest row (median length {info['median_length']}, longest {info['max_length']})")
    parts = {split: Split(x, y) for split, (x, y) in splits.items()}
    return Dataset(name, spec, preprocessing, classes, parts["train"], parts["val"], parts["test"], info)


def _split_indices(n: int, seed: int, val_fraction: float, test_fraction: float) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round((n - n_test) * val_fraction))
    return order[n_test + n_val:], order[n_test:n_test + n_val], order[:n_test]


def _from_pool(name: str, source: str, preprocessing: str, class_names, x: np.ndarray, y: np.ndarray,
               seed: int, val_fraction: float, test_fraction: float) -> Dataset:
    train, val, test = _split_indices(len(x), seed, val_fraction, test_fraction)
    info = {"seed": seed, "method": "seeded permutation of all examples",
            "val_fraction": val_fraction, "test_fraction": test_fraction}
    return Dataset(name, source, preprocessing, class_names,
                   Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test]), info)


def _load_digits(seed: int, val_fraction: float, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / np.float32(16.0))[:, None]  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    return _from_pool("digits", "scikit-learn load_digits (bundled)", "pixel / 16 -> float32 in [0, 1], shape (1, 8, 8)",
                      [str(i) for i in range(10)], x, y, seed, val_fraction, test_fraction)


def _load_npz(path: Path, seed: int, val_fraction: float, test_fraction: float) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive:
                raise CompressorError(f"{path}: the .npz file has no array 'x' (found {sorted(archive.files)}); "
                                      f"save inputs as x (N, ...) and optional labels as y (N,)")
            x = np.asarray(archive["x"], dtype=np.float32)
            y = _npz_labels(path, archive["y"]) if "y" in archive else np.full(len(x), -1, np.int64)
    except CompressorError:
        raise
    except Exception as exc:
        raise CompressorError(f"{path}: not a readable .npz file ({exc}); re-save it with numpy.savez") from exc
    if x.ndim < 2 or y.shape != (len(x),):
        raise CompressorError(f"{path}: x must be (N, ...) and y (N,), got x {x.shape} and y {y.shape}")
    if not np.isfinite(x).all():
        raise CompressorError(f"{path}: x contains NaN or Inf values; clean the data first")
    return _from_pool(path.stem, str(path), "values as stored in the .npz, cast to float32", None, x, y,
                      seed, val_fraction, test_fraction)


def _npz_labels(path: Path, y: np.ndarray) -> np.ndarray:
    """An .npz file's ``y`` as int64 class indices; labels of another kind (strings, fractions) stop with the fix."""
    if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
        return y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise CompressorError(f"{path}: y holds {y.dtype} values, not class indices; save y as integers 0..C-1 "
                              f"(-1 for an unlabeled row), e.g. np.unique(names, return_inverse=True)[1]")
    return y.astype(np.int64)


def _find_idx(folder: Path, prefix: str, kind: str) -> Path:
    found = sorted(p for p in folder.iterdir() if p.name.startswith(f"{prefix}-{kind}"))
    if not found:
        raise CompressorError(f"{folder}: no {prefix}-{kind}-idx*-ubyte[.gz] file; an IDX dataset folder needs "
                              f"train-images, train-labels, t10k-images and t10k-labels files")
    return found[0]


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array; the header gives the shape."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise CompressorError(f"{path}: cannot read IDX file ({exc}); reinstall the dataset") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CompressorError(f"{path}: not an unsigned-byte IDX file (bad magic number); check the dataset folder")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise CompressorError(f"{path}: truncated or oversized IDX file (header says {shape}); reinstall the dataset")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_idx_dir(folder: Path, seed: int, val_fraction: float) -> Dataset:
    parts = {}
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(folder, prefix, "images"))
        labels = read_idx(_find_idx(folder, prefix, "labels")).astype(np.int64)
        if images.ndim != 3 or labels.shape != (len(images),):
            raise CompressorError(f"{folder}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        parts[prefix] = ((images.astype(np.float32) / np.float32(255.0))[:, None], labels)  # (N, 1, H, W)
    (x_pool, y_pool), (x_test, y_test) = parts["train"], parts["t10k"]
    order = np.random.default_rng(seed).permutation(len(x_pool))
    n_val = int(round(len(order) * val_fraction))
    val, train = order[:n_val], order[n_val:]
    test_order = np.random.default_rng(seed).permutation(len(x_test))  # so --max-train keeps a fair sample
    is_fashion = "fashion" in folder.name.lower()
    classes = FASHION_MNIST_CLASSES if is_fashion else [str(i) for i in range(int(y_pool.max()) + 1)]
    info = {"seed": seed, "method": "official t10k as test; seeded permutation of train for train/val",
            "val_fraction": val_fraction}
    return Dataset("fashion-mnist" if is_fashion else folder.name, str(folder),
                   "pixel / 255 -> float32 in [0, 1], shape (1, H, W) (torchvision ToTensor convention)", classes,
                   Split(x_pool[train], y_pool[train]), Split(x_pool[val], y_pool[val]),
                   Split(x_test[test_order], y_test[test_order]), info)


def _streamed(what: str, name: str, sources: dict, classes: list[str] | None, info: dict,
              read: ReadOptions) -> Dataset:
    """A dataset whose images are decoded once into the data cache and read lazily (pixel / 255)."""
    images = read.images
    if read.channels is not None:
        channels, info["channels"] = read.channels(sources)
        images = dataclasses.replace(images, channels=channels)
    splits, meta = load_split_arrays(what, sources, images, read.cache_root or default_cache_root(), read.on_bad_image,
                                     {k: info.get(k) for k in ("input_column", "label_column")})
    info["skipped_images"] = {split: len(bad) for split, bad in meta["bad"].items()}
    preprocessing = (f"images decoded with Pillow ({'grayscale' if images.channels == 1 else 'RGB'}"
                     f"{f', shorter side resized to {images.resize} px (bilinear)' if images.resize else ''}"
                     f"{f', centre crop {images.crop} px' if images.crop else ''}), pixel / 255 -> float32 in "
                     f"[0, 1], shape {meta['shape']}")
    parts = {split: Split(x, y, 1 / 255, streamed=True) for split, (x, y) in splits.items()}
    return Dataset(name, what, preprocessing, classes, parts["train"], parts["val"], parts["test"], info,
                   digest=meta["key"], image_spec=images.describe())
