"""The main job's data as the user's own torch Datasets: :class:`Data` (``compressor.Data(train=..., val=...,
test=..., classes=[...])``) over map-style or iterable ``torch.utils.data.Dataset``s yielding ``(input, label)``.

Each split is streamed once through a DataLoader (worker processes for a map-style Dataset) into the data cache,
``<cache>/datasets/<key>/``: one raw file per input and split, read back through memory maps, so no run holds a
split in RAM and later runs with the same key skip the Dataset. ``rows.json``, written last, records every file's
sha256, shape and dtype and is checked before a row is read; an entry that does not match is read again.

The key is the user's ``fingerprint`` when given (a version they bump when the data changes), else a hash of rows
sampled from every split; the report's ``dataset.split.keyed_by`` says which. The Dataset's transform is the
preprocessing: compressor normalises nothing, and the bundle takes the tensors the Dataset yields."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from rich.console import Console

from compressor.config import RunConfig
from compressor.core.errors import DataError, DataShapeError, EmptySplitError, first_line
from compressor.core.fileio import (atomic_path, default_cache_root, restart_cache_entry, sha256_file,
                                    write_json_atomic)
from compressor.core.inputs import NamedInputs
from compressor.data.datasets import Dataset, Split
from compressor.data.torch_rows import CheckedRows, RowSpec, SafeIterable, SafeRows, parse_item, row_values, spec_of

if TYPE_CHECKING:  # the data layer reads an ensemble's metadata, never runs it
    from compressor.teachers.ensemble import Ensemble

CACHE_FORMAT = "compressor.torch-data/1"
RECORD = "rows.json"
READ_BATCH = 256
SAMPLE_ROWS = 32  # rows per split hashed into the key when no fingerprint is given
VAL_FRACTION, TEST_FRACTION = 0.1, 0.2  # carved from train when val / test are not given, as for every source
PREPROCESSING = ("the Dataset's own transform: inputs are the tensors it yields, as float32 (token inputs as int64); "
                 "compressor normalises nothing, and Bundle.predict takes those tensors")


@dataclass
class Data:
    """The main job's data as torch Datasets, each map-style or iterable, yielding ``(input, label)`` (or the input
    alone) with the input a tensor or a dict of 1-D token tensors by name, and the label a class index or -1 / None
    (unlabeled). ``val`` and ``test`` default to seeded shares of ``train`` (10% and 20%). ``classes``: the class
    names (else the teachers'). ``fingerprint``: a version string keying the data cache (else a hash of sampled
    rows). ``workers``: DataLoader worker processes (default: up to 4 for a map-style Dataset, 0 for an iterable
    one, which must shard itself with ``torch.utils.data.get_worker_info`` to use more)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None = None
    test: torch.utils.data.Dataset | None = None
    classes: list[str] | None = None
    fingerprint: str | None = None
    name: str | None = None
    workers: int | None = None

    def sources(self) -> dict[str, torch.utils.data.Dataset]:
        """The splits given, by name."""
        return {name: ds for name in ("train", "val", "test") if (ds := getattr(self, name)) is not None}

    def label(self) -> str:
        """How messages and the report name this data: ``Data(train=FashionRows, test=FashionRows)``."""
        parts = ", ".join(f"{name}={type(ds).__name__}" for name, ds in self.sources().items())
        return f"Data({parts})"


def read_torch_data(data: Data, config: RunConfig, ensemble: Ensemble) -> Dataset:
    """``data``'s splits from the data cache, streamed into it first when it lacks them (or they fail their
    checksums): a :class:`Dataset` whose splits are memory-mapped, checked row by row as they were read (one shape,
    class-index labels, no empty split) before any teacher runs. ``config`` gives the seed, ``--max-train`` and the
    cache folder; the teachers' ``max_length`` bounds token inputs."""
    _check_data(data)
    sources = data.sources()
    limits = _row_limits(sources, config.max_train)
    specs = _agreeing(data, {name: _first_spec(data, name, ds, ensemble) for name, ds in sources.items()})
    key, keyed_by = _key(data, specs, limits, config.seed)
    folder = (config.teacher_cache or default_cache_root()) / "datasets" / key
    record = _verified(folder, key)
    if record is None:
        record = _stream_entry(data, folder, key, specs, limits, config.seed)
    splits = {name: _split(folder, name, record) for name in ("train", "val", "test")}
    for name, split in splits.items():
        if len(split) == 0:
            raise EmptySplitError(f"{data.label()}: the {name} split is empty after carving it from train; give "
                                  f"more rows or a {name} Dataset of its own")
    if config.max_train is not None:
        splits = {name: Split(s.x[:config.max_train], s.y[:config.max_train], streamed=s.streamed)
                  for name, s in splits.items()}
    info = {"method": "the Datasets given" if len(sources) == 3 else
            f"seeded shares of train for {', '.join(n for n in ('val', 'test') if n not in sources)}",
            "seed": config.seed, "keyed_by": keyed_by, "cache": str(folder), "max_train": config.max_train}
    return Dataset(data.name or type(data.train).__name__, data.label(), PREPROCESSING,
                   list(data.classes) if data.classes else None, splits["train"], splits["val"], splits["test"],
                   info, digest=key)


def _check_data(data: Data) -> None:
    for name, ds in data.sources().items():
        if not isinstance(ds, torch.utils.data.Dataset):
            raise DataError(f"Data({name}=...) is a {type(ds).__name__}; give a torch.utils.data.Dataset (map-style "
                            f"or iterable) yielding (input, label)")
    if data.classes is not None and (isinstance(data.classes, str) or not len(data.classes)):
        raise DataError(f"Data(classes={data.classes!r}): give the class names as a list, in label order")
    if data.workers is not None and data.workers < 0:
        raise DataError(f"Data(workers={data.workers}): give 0 (read in this process) or more worker processes")


def _row_limits(sources: dict, max_train: int | None) -> dict[str, int | None]:
    """Rows read from each Dataset: all, or with --max-train as many as the capped splits can use (the train
    Dataset a little more where val and test are carved from it)."""
    if max_train is None:
        return {name: None for name in sources}
    carved = 1 - (0 if "test" in sources else TEST_FRACTION)
    carved *= 1 - (0 if "val" in sources else VAL_FRACTION)
    return {name: max_train if name != "train" else math.ceil(max_train / carved) + 1 for name in sources}


def _first_spec(data: Data, name: str, ds, ensemble) -> RowSpec:
    """The split's first row read in this process: its spec, or the split is empty (EmptySplitError)."""
    where = f"{data.label()}: the {name} split"
    try:
        if _is_map(ds):
            item = ds[0] if len(ds) else None
        else:
            item = next(iter(ds), None)
    except Exception as exc:  # the user's code
        raise DataError(f"{where}: reading its first row raised {type(exc).__name__}: {first_line(exc)}; fix the "
                        f"Dataset") from exc
    if item is None:
        fix = "give the rows the student learns from" if name == "train" else \
            f"give it rows, or leave {name} out to carve it from train"
        raise EmptySplitError(f"{where} is empty: its Dataset yields no rows; {fix}")
    try:
        spec = spec_of(parse_item(item)[0], ensemble.metadata.get("max_length"))
        row_values(parse_item(item)[0], spec)
    except DataError as exc:
        raise type(exc)(f"{where}, row 0: {exc}") from exc
    return spec


def _agreeing(data: Data, specs: dict[str, RowSpec]) -> dict[str, RowSpec]:
    """Every split's spec, checked to be train's (one input shape, or the same named inputs); named inputs all
    take train's width."""
    train = specs["train"]
    for name, spec in specs.items():
        if (spec.shape, spec.names) != (train.shape, train.names):
            have, want = (spec.names or spec.shape), (train.names or train.shape)
            raise DataShapeError(f"{data.label()}: the {name} split's first row has inputs {list(have)} but the "
                                 f"train split's has {list(want)}; every split must yield the inputs the teachers "
                                 f"take")
    return {name: dataclasses.replace(spec, width=train.width) for name, spec in specs.items()}


def _is_map(ds) -> bool:
    return not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__len__")


def _key(data: Data, specs: dict[str, RowSpec], limits: dict, seed: int) -> tuple[str, str]:
    """The cache key and what it was made from: the user's fingerprint, or a hash of sampled rows."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, {n: s.describe() for n, s in specs.items()}, limits, seed,
                                        data.classes, {n: type(ds).__qualname__ for n, ds in data.sources().items()}],
                                       sort_keys=True, default=str).encode())
    if data.fingerprint is not None:
        digest.update(f"fingerprint\0{data.fingerprint}".encode())
        return digest.hexdigest(), f"the fingerprint given, Data(fingerprint={data.fingerprint!r})"
    for name, ds in data.sources().items():
        digest.update(name.encode())
        for arrays, label in _sample(ds, specs[name]):
            digest.update(str(label).encode())
            for array in arrays.values():
                digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest(), (f"a hash of up to {SAMPLE_ROWS} rows sampled from each split (map-style: spread "
                                f"over it, with its length; iterable: its first rows); pass Data(fingerprint=...) "
                                f"to key it by a version of your own")


def _sample(ds, spec: RowSpec):
    if _is_map(ds):
        n = len(ds)
        yield {"length": np.asarray([n])}, -2  # the Dataset's length, hashed with its rows
        picks = np.unique(np.linspace(0, n - 1, min(n, SAMPLE_ROWS)).round().astype(np.int64))
        items = (ds[int(i)] for i in picks)
    else:
        items = (item for _, item in zip(range(SAMPLE_ROWS), ds))
    for item in items:
        x, y = parse_item(item)
        try:
            yield row_values(x, spec)[0], y
        except DataError:  # a bad row is named when the split is read
            continue


def _stream_entry(data: Data, folder: Path, key: str, specs: dict[str, RowSpec], limits: dict, seed: int) -> dict:
    """Read every Dataset once into ``folder`` (row files, then labels and lengths) and write the record last."""
    restart_cache_entry(folder, RECORD, "data cache")
    sources = data.sources()
    record = {"format": CACHE_FORMAT, "key": key, "specs": {}, "rows": {}, "files": {}}
    with _Writers(folder) as writers:
        for name, ds in sources.items():
            carve = name == "train" and len(sources) < 3
            targets = [n for n in ("train", "val", "test") if n == name or (carve and n not in sources)]
            _stream_split(data, name, ds, specs[name], limits[name], writers, targets, seed)
            for target in targets:
                record["specs"][target] = specs[name].describe()
    for split, (rows, files) in writers.finished().items():
        record["rows"][split] = rows
        record["files"].update(files)
    write_json_atomic(folder / RECORD, record)
    return record


def _stream_split(data: Data, name: str, ds, spec: RowSpec, limit: int | None, writers: "_Writers",
                  targets: list[str], seed: int) -> None:
    """Stream one Dataset through a DataLoader, each row checked and written to its split (``targets[0]``, or for
    a train Dataset carved into val and test, the split a seeded draw gives it)."""
    is_map = _is_map(ds)
    rows = min(len(ds), limit) if is_map and limit is not None else len(ds) if is_map else None
    workers = data.workers if data.workers is not None else (min(4, os.cpu_count() or 1) if is_map and rows > 2000
                                                             else 0)
    wrapped = SafeRows(ds, rows) if is_map else SafeIterable(ds, limit)
    loader = torch.utils.data.DataLoader(wrapped, batch_size=READ_BATCH, num_workers=workers,
                                         collate_fn=CheckedRows(spec))
    draws = np.random.default_rng([seed, 7])
    done = 0
    for arrays, labels, lengths, problem in loader:
        if problem is not None:
            offset, kind, why = problem
            error = {cls.__name__: cls for cls in (DataError, DataShapeError)}.get(kind, DataError)
            raise error(f"{data.label()}: the {name} split, row {done + offset}: {why}") from None
        if len(targets) == 1:
            writers.write(targets[0], arrays, labels, lengths)
        else:  # a row goes to test, val or train by one uniform draw, in reading order: shares as other sources'
            test = TEST_FRACTION if "test" in targets else 0.0
            val = test + (1 - test) * VAL_FRACTION if "val" in targets else test
            u = draws.random(len(labels))
            to = np.where(u < test, 2, np.where(u < val, 1, 0))
            for k, split in enumerate(("train", "val", "test")):
                pick = to == k
                if pick.any():
                    writers.write(split, {n: a[pick] for n, a in arrays.items()}, labels[pick], lengths[pick])
        done += len(labels)


class _Writers:
    """Open row files per split and input, appended batch by batch; labels and lengths kept (8 bytes a row) and
    written at the end. Every file is renamed into place whole, so a run cut short leaves no file to trust."""

    def __init__(self, folder: Path):
        self.folder, self.handles, self.labels, self.lengths, self.contexts = folder, {}, {}, {}, []
        self.shapes: dict[str, tuple[tuple[int, ...], str]] = {}

    def __enter__(self) -> "_Writers":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles.values():
            handle.close()
        for context in reversed(self.contexts):
            context.__exit__(*exc)  # renames each file into place on success, removes it on failure
        self.handles, self.contexts = {}, []

    def write(self, split: str, arrays: dict[str, np.ndarray], labels: np.ndarray, lengths: np.ndarray) -> None:
        for name, array in arrays.items():
            file = f"{split}-{name}.bin"
            if file not in self.handles:
                context = atomic_path(self.folder / file)
                self.contexts.append(context)
                self.handles[file] = open(context.__enter__(), "wb")
                self.shapes[file] = (tuple(array.shape[1:]), str(array.dtype))
            self.handles[file].write(np.ascontiguousarray(array).tobytes())
        self.labels.setdefault(split, []).append(labels)
        self.lengths.setdefault(split, []).append(lengths)

    def finished(self) -> dict[str, tuple[int, dict]]:
        """After the row files are in place: write labels and lengths; split → (rows, file → {sha256, shape,
        dtype})."""
        out = {}
        for split, parts in self.labels.items():
            rows = int(sum(len(p) for p in parts))
            for kind, values in (("y", parts), ("lengths", self.lengths[split])):
                with atomic_path(self.folder / f"{split}-{kind}.npy") as tmp, open(tmp, "wb") as handle:
                    np.save(handle, np.concatenate(values).astype(np.int64), allow_pickle=False)
            files = {f"{split}-{kind}.npy": [[rows], "int64"] for kind in ("y", "lengths")}
            files.update({file: [[rows, *shape], dtype] for file, (shape, dtype) in self.shapes.items()
                          if file.startswith(f"{split}-")})
            out[split] = (rows, {file: {"sha256": sha256_file(self.folder / file), "shape": shape, "dtype": dtype}
                                 for file, (shape, dtype) in files.items()})
        return out


def _verified(folder: Path, key: str) -> dict | None:
    """The entry's record once every file matches its sha256 and size; None when there is none or it does not
    match (the caller reads the Datasets again, and says so once)."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != CACHE_FORMAT or record.get("key") != key:
        return None
    for file, info in record.get("files", {}).items():
        path = folder / file
        size = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
        on_disk = path.stat().st_size if path.is_file() else -1
        if (on_disk != size if path.suffix == ".bin" else on_disk < 0) or sha256_file(path) != info["sha256"]:
            Console(stderr=True).print(f"[yellow]warning:[/] the data cache {folder} does not match its record "
                                       f"({file}); reading the Datasets again", highlight=False, soft_wrap=True)
            return None
    return record


def _split(folder: Path, name: str, record: dict) -> Split:
    """One split from the entry: memory-mapped rows (copy-on-write, so torch takes them without a warning)."""
    rows = record["rows"].get(name, 0)
    spec = record["specs"][name]
    y = np.load(folder / f"{name}-y.npy", allow_pickle=False) if rows else np.zeros(0, np.int64)
    if spec["names"] is None:
        x = (np.memmap(folder / f"{name}-x.bin", np.float32, "c", shape=(rows, *spec["shape"])) if rows
             else np.zeros((0, *spec["shape"]), np.float32))
        return Split(x, y, streamed=True)
    lengths = np.load(folder / f"{name}-lengths.npy", allow_pickle=False) if rows else np.zeros(0, np.int64)
    arrays = {n: (np.memmap(folder / f"{name}-{n}.bin", np.int64, "c", shape=(rows, spec["width"])) if rows
                  else np.zeros((0, spec["width"]), np.int64)) for n in spec["names"]}
    return Split(NamedInputs.from_numpy(arrays, lengths), y)
