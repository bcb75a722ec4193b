"""Pre-tokenised text in ``--data hf:DIR`` / ``parquet:GLOB``: integer-sequence columns (``input_ids``,
``attention_mask``, ``token_type_ids``; or those ``--input-columns`` names) read into (N, L) int64 arrays, right-padded
with 0 to the split's longest row and cut per batch to the batch's longest (:class:`NamedInputs`). Token ids are
small, so a split is held in RAM: 10 M tokens of two columns are 160 MB.
"""

from __future__ import annotations

import numpy as np

from compressor.core.errors import CompressorError
from compressor.core.inputs import NamedInputs
from compressor.data.hf import split_rows, train_split

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer writes, in forward's order


def _is_token_feature(feature) -> bool:
    inner = getattr(feature, "feature", None)
    return inner is not None and str(getattr(inner, "dtype", "")).startswith(("int", "uint"))


def token_columns(spec: str, loaded, input_columns: str | None) -> list[str] | None:
    """The dataset's token columns in the model's input order, or None when it is not pre-tokenised text."""
    train = train_split(spec, loaded)
    features = train.features
    if input_columns:
        names = [name.strip() for name in input_columns.split(",") if name.strip()]
        if not any(_is_token_feature(features.get(name)) for name in names):
            return None  # an image column: the image reader decides
        missing = [name for name in names if name not in features]
        if missing:
            raise CompressorError(f"--input-columns {input_columns}: no column {', '.join(map(repr, missing))} in "
                                  f"--data {spec} (columns: {', '.join(train.column_names)})")
        wrong = [name for name in names if not _is_token_feature(features[name])]
        if wrong:
            raise CompressorError(f"--input-columns {input_columns}: {', '.join(map(repr, wrong))} "
                                  f"{'is' if len(wrong) == 1 else 'are'} not a column of integer sequences; text "
                                  f"inputs are pre-tokenised ids (tokenize the dataset first)")
        return names
    found = [name for name in TOKEN_COLUMNS if _is_token_feature(features.get(name))]
    return found or None


def _padded(values: list, width: int, column: str, where: str, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros((len(values), width), dtype=np.int64)
    for i, row in enumerate(values):
        if len(row) != lengths[i]:
            raise CompressorError(f"--data {where} row {i}: column {column!r} has {len(row)} values but the first "
                                  f"token column has {lengths[i]}; every token column needs one value per token")
        out[i, :len(row)] = row
    return out


def token_splits(spec: str, loaded, columns: list[str], label_column: str | None, seed: int, val_fraction: float,
                 test_fraction: float) -> tuple[dict[str, tuple[NamedInputs, np.ndarray]], list[str] | None, dict]:
    """Each split's (named inputs, labels), the class names, and how the splits were made."""
    parts, classes, info = split_rows(spec, loaded, columns, label_column, seed, val_fraction, test_fraction)
    splits = {}
    for split, (part, rows, labels, where) in parts.items():
        chosen = part.select(rows)
        columns_values = {name: list(chosen[name]) for name in columns}
        lengths = np.fromiter((len(row) for row in columns_values[columns[0]]), dtype=np.int64, count=len(rows))
        if (lengths == 0).any():
            raise CompressorError(f"--data {where}: row {int(np.argmax(lengths == 0))} has no tokens; drop empty "
                                  f"rows before distilling")
        width = int(lengths.max())
        arrays = {name: _padded(values, width, name, where, lengths) for name, values in columns_values.items()}
        splits[split] = (NamedInputs.from_numpy(arrays, lengths), labels)
    lengths = splits["train"][0].lengths.numpy()
    info.update(input_columns=columns, padding="right, with 0, cut per batch to its longest row",
                median_length=int(np.median(lengths)), max_length=int(lengths.max()))
    return splits, classes, info
