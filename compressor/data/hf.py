"""``--data hf:DIR`` (a ``datasets.save_to_disk`` folder) and ``--data parquet:GLOB`` (Parquet files, e.g. a Hugging
Face dataset's): an image column and a label column (``--input-columns``, ``--label-column``), decoded once into
the data cache (:mod:`compressor.data.image_cache`) exactly as an image folder's files are; or pre-tokenised
int64 columns (``input_ids``, ``attention_mask``, ...: :mod:`compressor.data.tokens`). Nothing is downloaded.

Splits: the dataset's own ``train``, ``validation`` (or ``val``) and ``test`` when present; seeded shares of
``train`` for those it lacks. Class names come from the label column's ``ClassLabel`` feature when it has one.
"""

from __future__ import annotations

import glob
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError, first_line
from compressor.core.preprocessing import ImageSpec, image_array
from compressor.data.image_cache import carve_splits

SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


@dataclass
class HFImages:
    """Rows of one split of a Hugging Face dataset whose ``column`` holds images (an ImageSource)."""

    dataset: object           # datasets.Dataset, memory-mapped from its Arrow files
    column: str
    rows: np.ndarray          # (N,) indices into ``dataset``
    labels: np.ndarray        # (N,) int64, -1 = unlabeled
    where: str                # "DIR[train]": for messages and the cache key

    def __len__(self) -> int:
        return len(self.rows)

    def identity(self, i: int) -> str:
        return f"{self.where}[{int(self.rows[i])}]\0{self.dataset._fingerprint}"  # HF's own hash of the content

    def decode(self, i: int, spec: ImageSpec) -> np.ndarray:
        value = self.dataset[int(self.rows[i])][self.column]
        return image_array(_as_image(value, self.column), spec, np.uint8, f"{self.where}[{int(self.rows[i])}]")


def _as_image(value, column: str):
    """A PIL image from what an image column holds: a decoded image, or ``{"bytes": ..., "path": ...}``."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    raise CompressorError(f"column {column!r} holds {type(value).__name__}, not an image; name the image column "
                          f"with --input-columns")


def open_hf(spec: str):
    """The ``datasets`` DatasetDict behind ``hf:DIR`` or ``parquet:GLOB``, with one clear error for each way it fails."""
    try:
        import datasets
    except ImportError as exc:
        raise CompressorError(f"--data {spec}: reading Hugging Face datasets needs the datasets package (pip install "
                              f"-e '.[hf]')") from exc
    kind, _, where = spec.partition(":")
    try:
        if kind == "hf":
            if not Path(where).is_dir():
                raise CompressorError(f"--data {spec}: no such folder; give a folder written by "
                                      f"datasets.Dataset.save_to_disk or DatasetDict.save_to_disk")
            loaded = datasets.load_from_disk(where)
        else:
            files = sorted(glob.glob(where, recursive=True))
            if not files:
                raise CompressorError(f"--data {spec}: no file matches {where!r}")
            loaded = datasets.load_dataset("parquet", data_files={"train": files})
    except CompressorError:
        raise
    except Exception as exc:  # datasets raises many types for a folder or file it cannot read
        raise CompressorError(f"--data {spec}: not a readable dataset ({type(exc).__name__}: {first_line(exc)})") from exc
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def hf_sources(spec: str, loaded, input_columns: str | None, label_column: str | None, seed: int,
               val_fraction: float, test_fraction: float) -> tuple[dict[str, HFImages], list[str] | None, dict]:
    """train, val and test image sources of ``spec`` (opened as ``loaded``), the class names, and how the splits
    were made."""
    column = _image_column(spec, train_split(spec, loaded), input_columns)
    parts, classes, info = split_rows(spec, loaded, [column], label_column, seed, val_fraction, test_fraction)
    sources = {split: HFImages(part, column, rows, labels, where) for split, (part, rows, labels, where) in parts.items()}
    return sources, classes, {**info, "input_column": column}


def train_split(spec: str, loaded):
    """The dataset's train split; one clear error when it has none."""
    name = next((name for name in SPLIT_NAMES["train"] if name in loaded), None)
    if name is None:
        raise CompressorError(f"--data {spec}: the dataset has no train split (it has {', '.join(loaded)}); save "
                              f"the training rows as 'train'")
    return loaded[name]


def split_rows(spec: str, loaded, columns: list[str], label_column: str | None, seed: int, val_fraction: float,
               test_fraction: float) -> tuple[dict[str, tuple], list[str] | None, dict]:
    """Each split's (dataset part, its rows, their labels, a name for messages): the dataset's own validation and
    test splits where it has them, seeded shares of train otherwise; the class names; how the splits were made."""
    import datasets

    own = {ours: next((name for name in names if name in loaded), None) for ours, names in SPLIT_NAMES.items()}
    train = train_split(spec, loaded)
    label = label_column or ("label" if "label" in train.column_names else None)
    if label is not None and label not in train.column_names:
        raise CompressorError(f"--data {spec}: no column {label!r} (columns: {', '.join(train.column_names)}); name "
                              f"the labels with --label-column")
    feature = train.features.get(label) if label else None
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    carved = carve_splits(len(train), seed, val_fraction, test_fraction, own["val"] is not None,
                          own["test"] is not None)
    rng = np.random.default_rng(seed)
    parts = {}
    for split in ("train", "val", "test"):
        part = loaded[own[split]] if own[split] is not None and split != "train" else train
        rows = rng.permutation(len(part)) if own[split] is not None and split != "train" else carved[split]
        for name in (*columns, label):
            if name is not None and name not in part.column_names:
                raise CompressorError(f"--data {spec}: the {split} split has no column {name!r}")
        labels = (np.asarray(part[label], dtype=np.int64)[rows] if label else np.full(len(rows), -1, np.int64))
        parts[split] = (part, rows, labels, f"{spec}[{own[split] or own['train']}]")
        if not len(rows):
            raise CompressorError(f"--data {spec}: the {split} split is empty")
    info = {"seed": seed, "method": "the dataset's own " + (", ".join(own[s] for s in ("val", "test") if own[s])
                                                             or "train only") + "; seeded shares of train otherwise",
            "label_column": label}
    return parts, classes, info


def _image_column(spec: str, train, input_columns: str | None) -> str:
    """The image column: ``--input-columns`` (one name for images), else the first column of Image type."""
    import datasets

    if input_columns:
        names = [name.strip() for name in input_columns.split(",") if name.strip()]
        missing = [name for name in names if name not in train.column_names]
        if missing:
            raise CompressorError(f"--input-columns {input_columns}: no column {', '.join(map(repr, missing))} in "
                                  f"--data {spec} (columns: {', '.join(train.column_names)})")
        if len(names) != 1:
            raise CompressorError(f"--input-columns {input_columns}: an image dataset takes one image column; "
                                  f"several named inputs must be token columns (sequences of integers)")
        return names[0]
    images = [name for name, feature in train.features.items() if isinstance(feature, datasets.Image)]
    if not images:
        raise CompressorError(f"--data {spec}: no column has the Image type (columns: {', '.join(train.column_names)})"
                              f"; name the image column with --input-columns")
    return images[0]
