"""``--data hf:DIR`` (a ``datasets.save_to_disk`` folder) and ``--data parquet:GLOB`` (Parquet files, e.g. a Hugging
Face dataset's): an image column and a label column (``--input-columns``, ``--label-column``), decoded once into
the data cache (:mod:`compressor.data.image_cache`) exactly as an image folder's files are; or pre-tokenised
int64 columns (``input_ids``, ``attention_mask``, ...: :mod:`compressor.data.tokens`). Nothing is downloaded.

Splits: the dataset's own ``train``, ``validation`` (or ``val``) and ``test`` when present; seeded shares of
``train`` for those it lacks. Class names come from the label column's ``ClassLabel`` feature when it has one; a
column of strings is encoded as ``DatasetDict.class_encode_column`` would (sorted distinct strings, None unlabeled).
Images are read from the column's stored bytes or local file, never downloaded.
"""

from __future__ import annotations

import glob
import io
from dataclasses import dataclass, field
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
    _stored: object = field(default=None, init=False, repr=False)  # the dataset with the column left undecoded

    def __len__(self) -> int:
        return len(self.rows)

    def identity(self, i: int) -> str:
        return f"{self.where}[{int(self.rows[i])}]\0{self.dataset._fingerprint}"  # HF's own hash of the content

    def decode(self, i: int, spec: ImageSpec) -> np.ndarray:
        from PIL import ImageOps

        with self.open(i) as image:  # the EXIF orientation applied, as datasets.Image decodes an image
            image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112) is not None else image
            return image_array(image, spec, np.uint8, f"{self.where}[{int(self.rows[i])}]")

    def mode(self, i: int) -> str | None:
        """The Pillow mode in row ``i``'s image header ("L", "RGB", ...), None when it cannot be read."""
        try:
            with self.open(i) as image:
                return image.mode
        except Exception:  # any failure only means no evidence from this row; decoding names it
            return None

    def open(self, i: int):
        """Row ``i``'s image, opened lazily (header read, pixels on demand) from what the dataset stores."""
        import datasets

        if self._stored is None:  # undecoded, so a header read stays a header read and nothing is downloaded
            feature = self.dataset.features.get(self.column)
            self._stored = (self.dataset.cast_column(self.column, datasets.Image(decode=False))
                            if isinstance(feature, datasets.Image) else self.dataset)
        return _as_image(self._stored[int(self.rows[i])][self.column], self.column)


def _as_image(value, column: str):
    """A PIL image from what an image column holds: a decoded image, or ``{"bytes": ..., "path": ...}`` (a local
    file). A file that is gone raises FileNotFoundError naming it, which ``--on-bad-image skip`` skips."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        path = value["path"]
        if "://" in path:
            raise CompressorError(f"column {column!r} names the remote file {path}; nothing is downloaded: store the "
                                  f"images' bytes in the dataset (datasets.Image() with embedded bytes)")
        if not Path(path).is_file():
            raise FileNotFoundError(f"the image file {path} named in column {column!r} does not exist (moved or "
                                    f"deleted)")
        return Image.open(path)
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
    column = _image_column(spec, train_split(spec, loaded), input_columns, label_column or "label")
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
    carved = carve_splits(len(train), seed, val_fraction, test_fraction, own["val"] is not None,
                          own["test"] is not None)
    rng = np.random.default_rng(seed)
    chosen = {}
    for split in ("train", "val", "test"):
        part = loaded[own[split]] if own[split] is not None and split != "train" else train
        rows = rng.permutation(len(part)) if own[split] is not None and split != "train" else carved[split]
        for name in (*columns, label):
            if name is not None and name not in part.column_names:
                raise CompressorError(f"--data {spec}: the {split} split has no column {name!r}")
        if not len(rows):
            raise CompressorError(f"--data {spec}: the {split} split is empty")
        chosen[split] = (part, rows)
    labels, classes = split_labels(spec, label, chosen)
    parts = {split: (part, rows, labels[split], f"{spec}[{own[split] or own['train']}]")
             for split, (part, rows) in chosen.items()}
    info = {"seed": seed, "method": "the dataset's own " + (", ".join(own[s] for s in ("val", "test") if own[s])
                                                             or "train only") + "; seeded shares of train otherwise",
            "label_column": label}
    return parts, classes, info


def split_labels(spec: str, label: str | None, chosen: dict[str, tuple]) -> tuple[dict[str, np.ndarray], list | None]:
    """Each split's (N,) int64 labels (-1 unlabeled) from the ``label`` column of its (dataset part, rows), and the
    class names: a ``ClassLabel``'s names; for a column of strings the sorted distinct strings of every split read,
    the classes ``DatasetDict.class_encode_column`` makes (so they can be matched to the teachers' class names);
    None for integer class indices. Other label types stop with the fix."""
    import datasets

    if label is None:
        return {split: np.full(len(rows), -1, np.int64) for split, (_, rows) in chosen.items()}, None
    parts = {id(part): part for part, _ in chosen.values()}  # carved splits share train's part: read it once
    feature = next(iter(parts.values())).features[label]
    dtype = str(getattr(feature, "dtype", ""))
    values = {key: list(part[label]) for key, part in parts.items()}  # the whole column, as Python values
    classes, index = (list(feature.names) if isinstance(feature, datasets.ClassLabel) else None), None
    if dtype in ("string", "large_string"):
        classes = sorted({value for column in values.values() for value in column if value is not None})
        index = {name: k for k, name in enumerate(classes)}
    elif not isinstance(feature, datasets.ClassLabel) and not dtype.startswith(("int", "uint", "bool", "float")):
        raise CompressorError(f"--data {spec}: the label column {label!r} holds {feature}, not class indices or "
                              f"names; name the label column with --label-column, or cast it to a ClassLabel "
                              f"(ds.class_encode_column({label!r}))")
    encoded = {key: _encode(spec, label, column, index) for key, column in values.items()}
    return {split: encoded[id(part)][rows] for split, (part, rows) in chosen.items()}, classes


def _encode(spec: str, label: str, column, index: dict | None) -> np.ndarray:
    """(N,) int64 class indices of one label column, None → -1; strings through ``index``; whole floats as ints."""
    if index is not None:
        return np.array([-1 if value is None else index[value] for value in column], dtype=np.int64)
    numbers = np.array([np.nan if value is None else value for value in column], dtype=np.float64)
    known = ~np.isnan(numbers)
    if (numbers[known] != np.round(numbers[known])).any():
        example = numbers[known][numbers[known] != np.round(numbers[known])][0]
        raise CompressorError(f"--data {spec}: the label column {label!r} holds fractional values (e.g. {example:g});"
                              f" labels are class indices, -1 for an unlabeled row: name the label column with "
                              f"--label-column, or fix its values")
    return np.where(known, numbers, -1).astype(np.int64)


def _image_column(spec: str, train, input_columns: str | None, label: str) -> str:
    """The image column: ``--input-columns`` (one name for images), else the first column of Image type. A column
    of raw text (not the ``label`` column) stops with the two lines that tokenize it."""
    import datasets

    text = [name for name, feature in train.features.items()
            if name != label and str(getattr(feature, "dtype", "")) in ("string", "large_string")]
    images = [name for name, feature in train.features.items() if isinstance(feature, datasets.Image)]

    if input_columns:
        names = [name.strip() for name in input_columns.split(",") if name.strip()]
        missing = [name for name in names if name not in train.column_names]
        if missing:
            raise CompressorError(f"--input-columns {input_columns}: no column {', '.join(map(repr, missing))} in "
                                  f"--data {spec} (columns: {', '.join(train.column_names)})")
        if len(names) != 1:
            raise CompressorError(f"--input-columns {input_columns}: an image dataset takes one image column; "
                                  f"several named inputs must be token columns (sequences of integers)")
        if names[0] in text and images:
            raise CompressorError(f"--input-columns {input_columns}: column {names[0]!r} holds text, not an image; "
                                  f"name the image column ({', '.join(images)})")
        if names[0] in text:
            raise _untokenized(spec, names[0])
        return names[0]
    if not images and text:
        raise _untokenized(spec, text[0])
    if not images:
        raise CompressorError(f"--data {spec}: no column has the Image type (columns: {', '.join(train.column_names)})"
                              f"; name the image column with --input-columns")
    return images[0]


def _untokenized(spec: str, column: str) -> CompressorError:
    """The error for a column of raw text: what it holds and the two lines that tokenize it."""
    kind, _, where = spec.partition(":")
    out = where.rstrip("/") + "-tokenized" if kind == "hf" else str(Path(where).parent / "tokenized")
    return CompressorError(
        f"--data {spec}: column {column!r} holds raw text; tokenize it first with the teachers' tokenizer: tok = "
        f"AutoTokenizer.from_pretrained(TEACHER_TOKENIZER); ds.map(lambda b: tok(b[{column!r}], truncation=True), "
        f"batched=True).save_to_disk(\"{out}\"), then pass --data hf:{out}")
