"""The teacher-logit cache: run the ensemble once over the data, keep its members' logits on disk, reuse them.

Teachers are the expensive part of distillation: K large models on every row. Their logits depend only on the
teacher files, the data and its preprocessing, so they are computed once and stored in an entry keyed by a sha256
of exactly those three things. A later run (another temperature, α, student, a resumed run, another DDP rank)
with the same key reads the entry instead of running the teachers; a run with anything different gets a new key
and never sees the old logits.

An entry is a folder ``<root>/<key digest>/``:

- ``train.npy`` — the transfer set's member logits (K, N, C) in float16, read through a memory map, so a transfer
  set larger than RAM works (float32 when a logit reaches 128, where float16's steps grow to 0.125);
- ``val.npy``, ``test.npy`` — the held-out splits in float32, so the report's ensemble accuracy is exact;
- ``entry.json`` — the key and the sha256, shape and dtype of each array.

With ``--cache-top-k K`` (part of the key) the transfer set is stored instead as ``train.values.npy`` (K largest
logits per member and row, float32), ``train.indices.npy`` (their classes) and ``train.tail.npy`` (the rest's
log-sum-exp), written batch by batch, and the record gains the tail's share of probability at T = 1
(:mod:`compressor.training.cached_logits`).

It is written in a temporary folder and renamed into place, so it exists whole or not at all. An entry whose
record does not match its key or its files (edited, truncated, copied from elsewhere) is refused with a message
naming the folder and the fix, never used. Member logits, not the mixture at one temperature, are stored, so
changing ``--temperature`` or ``--alpha`` reuses the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from torch import Tensor

from compressor.core.errors import CompressorError
from compressor.core.fileio import (default_cache_root, directory_mode, remove_folder_atomically, sha256_file,
                                   why_unwritable)
from compressor.training.cached_logits import (CachedLogits, TopKLogits, check_top_k, index_dtype, reduce_top_k,
                                               tail_mass)

CACHE_FORMAT = "compressor.teacher-cache/1"
ENTRY_FILE = "entry.json"
SPLITS = ("train", "val", "test")
# Below 128, float16 rounds a logit by at most 0.03 (its steps there are 0.0625), well under what moves a tempered
# softmax; larger logits (rare in trained classifiers) are kept in float32.
FLOAT16_SAFE_MAX = 128.0


def cache_key(teacher_sha256: str, data_sha256: str, preprocessing: dict, top_k: int | None = None) -> dict:
    """What the member logits depend on: the teacher files, the data, and how the data was prepared; and how they
    are stored (``top_k``: only the K largest per row, absent for a dense entry)."""
    key = {"format": CACHE_FORMAT, "teacher_sha256": teacher_sha256, "data_sha256": data_sha256,
           "preprocessing": json.loads(json.dumps(preprocessing, sort_keys=True))}
    return key if top_k is None else {**key, "top_k": int(top_k)}


def check_cache_root(folder: Path | None, no_cache: bool) -> None:
    """Stop before any work when the cache folder (``--teacher-cache``, else :func:`default_cache_root`) cannot hold
    entries: it, or the nearest folder above it that exists, is a file or cannot be written in. Teacher logits,
    views and decoded images all go there; the default is left unchecked with --no-cache (it may go unused).
    Creates nothing."""
    if folder is None and no_cache:
        return
    root = Path(folder).expanduser() if folder is not None else default_cache_root()
    where = f"--teacher-cache {root}" if folder is not None else f"the cache folder {root}"
    fix = ("choose another --teacher-cache" if folder is not None else "pass --teacher-cache with a writable folder") \
        + ("" if no_cache else " or pass --no-cache")
    problem = why_unwritable(root)
    if problem is not None:
        path, why = problem
        raise CompressorError(f"{where}{'' if path == root else f': {path}'} {why}; {fix}")


def key_digest(key: dict) -> str:
    """The entry's folder name: sha256 of the key's canonical JSON."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class StreamedLogits:
    """A split's member logits as the teachers produce them, batch by batch: ``rows`` N and ``batches``, an iterable
    of (first row, (K, B, C) float32 tensor). :meth:`TeacherCache.store` writes them to disk as they come, so the
    split's (K, N, C) logits are never in RAM whole."""

    rows: int
    batches: Iterable[tuple[int, Tensor]]


class TeacherCache:
    """One cache entry: ``load()`` it if it exists and is whole, ``store()`` it after computing the logits."""

    def __init__(self, root: Path, key: dict):
        self.root = Path(root).expanduser()
        self.key = key
        self.digest = key_digest(key)
        self.path = self.root / self.digest
        self.top_k_record: dict | None = None  # --cache-top-k: K and the tail's mass, once loaded or stored

    def exists(self) -> bool:
        """Whether an entry (whole or not) is present under this key."""
        return (self.path / ENTRY_FILE).is_file()

    def load(self) -> dict[str, CachedLogits] | None:
        """The cached logits per split, or None when there is no entry. Raises CompressorError for an entry that
        does not match its key or its files."""
        if not self.exists():
            return None
        try:
            record = json.loads((self.path / ENTRY_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise self._stale(f"{ENTRY_FILE} is unreadable ({exc})") from exc
        if not isinstance(record, dict) or record.get("key") != self.key:
            raise self._stale("its record was written for other teachers, data or preprocessing")
        arrays = record.get("arrays")
        read = {name: self._checked_array(name, arrays) for name in self._array_names()}
        self.top_k_record = record.get("top_k")
        return self._entries(read, int(read["test"].shape[2]))

    def _array_names(self) -> list[str]:
        top_k = ["train.values", "train.indices", "train.tail"] if "top_k" in self.key else ["train"]
        return top_k + ["val", "test"]

    def _entries(self, arrays: dict[str, np.ndarray], num_classes: int) -> dict[str, CachedLogits]:
        out = {split: CachedLogits(arrays[split]) for split in ("val", "test")}
        out["train"] = (TopKLogits(arrays["train.values"], arrays["train.indices"], arrays["train.tail"], num_classes)
                        if "top_k" in self.key else CachedLogits(arrays["train"]))
        return out

    def _checked_array(self, name: str, arrays) -> np.ndarray:
        """``name``.npy memory-mapped, after its checksum, shape and dtype matched the record."""
        info = arrays.get(name) if isinstance(arrays, dict) else None
        file = self.path / f"{name}.npy"
        if not isinstance(info, dict) or not {"sha256", "shape", "dtype"} <= set(info):
            raise self._stale(f"{ENTRY_FILE} has no complete record of {file.name}")
        if not file.is_file():
            raise self._stale(f"{file.name} is missing")
        if sha256_file(file) != info["sha256"]:
            raise self._stale(f"{file.name} does not match the checksum recorded when it was written")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise self._stale(f"{file.name} has shape {list(array.shape)} {array.dtype}, recorded "
                              f"{info['shape']} {info['dtype']}")
        return array

    def store(self, logits: dict[str, Tensor], replace: bool = False) -> dict[str, CachedLogits]:
        """Write ``logits[split]`` (K, N, C) for every split as a new entry, atomically, and return it loaded.

        Runs that share the cache may compute the same key at once; the first to finish stores its entry and the
        others use it (their logits are the same), unless ``replace`` (--refresh-teacher-cache) asks to swap it out.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".{self.digest[:16]}.", suffix=".tmp", dir=self.root))
        except OSError as exc:
            raise CompressorError(f"cannot create the teacher cache in {self.root} ({exc.strerror or exc}); choose "
                                  f"another --teacher-cache or pass --no-cache") from exc
        try:
            arrays, record = {}, {"key": self.key}
            for split in SPLITS:
                file = scratch / f"{split}.npy"
                if split == "train" and "top_k" in self.key:
                    record["top_k"] = _write_top_k(scratch, _as_stream(logits[split]), self.key["top_k"], arrays)
                    continue
                if isinstance(logits[split], StreamedLogits):
                    shape, dtype = _write_streamed(file, logits[split], float16=split == "train")
                else:
                    values = logits[split].detach().cpu().float().numpy()  # (K, N, C)
                    small = split == "train" and (values.size == 0 or float(np.abs(values).max()) < FLOAT16_SAFE_MAX)
                    array = values.astype(np.float16) if small else values
                    np.save(file, array, allow_pickle=False)
                    shape, dtype = array.shape, array.dtype
                arrays[split] = {"shape": list(shape), "dtype": str(dtype), "sha256": sha256_file(file)}
            record["arrays"] = arrays
            self.top_k_record = record.get("top_k")
            (scratch / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
            os.chmod(scratch, directory_mode())  # mkdtemp makes 0700; other users of a shared cache must read it
            if replace and self.path.exists():
                remove_folder_atomically(self.path)  # a reader sees the old entry whole or none
            try:
                os.replace(scratch, self.path)
                ours = True
            except OSError:
                if not self.path.is_dir():
                    raise
                shutil.rmtree(scratch)  # another run sharing the cache stored this key first: use its entry
                ours = False
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            raise CompressorError(f"could not write the teacher cache {self.path}: {exc.strerror or exc}; free disk "
                                  f"space, choose another --teacher-cache or pass --no-cache") from exc
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        if ours:  # just written and checksummed: open it without reading every byte back
            written = {name: np.load(self.path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                       for name in self._array_names()}
            return self._entries(written, int(written["test"].shape[2]))
        loaded = self.load()
        if loaded is None:
            raise CompressorError(f"teacher cache {self.path} vanished right after it was stored (another run "
                                  f"refreshing it?); rerun, or pass --no-cache")
        return loaded

    def describe(self, hit: bool) -> dict:
        """JSON-safe summary for the report (with ``top_k``: K and the tail's share of probability at T = 1)."""
        summary = {"enabled": True, "path": str(self.path), "hit": hit, "key": self.key}
        return summary if self.top_k_record is None else {**summary, "top_k": self.top_k_record}

    def _stale(self, why: str) -> CompressorError:
        return CompressorError(f"teacher cache {self.path} cannot be used: {why}; delete that folder or rerun with "
                               f"--refresh-teacher-cache (or --no-cache to run the teachers on every batch)")


CONVERT_ROWS = 65536  # rows converted from the float32 scratch file to float16 at a time


def write_float32(file: Path, logits: StreamedLogits) -> tuple[int, ...]:
    """Write ``logits`` into ``file`` through a float32 memory map, batch by batch, atomically (a scratch file
    renamed into place); returns the shape. Also a torchrun rank's shard of the teacher pass."""
    shape, _ = _write_streamed(file, logits, float16=False)
    return shape


def _write_streamed(file: Path, logits: StreamedLogits, float16: bool) -> tuple[tuple[int, ...], np.dtype]:
    """Write ``logits`` into ``file`` through a memory map, batch by batch, in float32; then, when ``float16`` and
    every value fits it, convert the file to float16 chunk by chunk. Returns the stored shape and dtype."""
    scratch = file.with_suffix(".float32.npy")
    array, peak = None, 0.0
    for start, batch in logits.batches:
        values = batch.numpy()  # (K, B, C)
        if array is None:
            array = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32,
                                              shape=(values.shape[0], logits.rows, values.shape[2]))
        array[:, start:start + values.shape[1]] = values
        peak = max(peak, float(np.abs(values).max()) if values.size else 0.0)
    if array is None:
        raise CompressorError(f"no teacher logits to cache for {file.name}: the split is empty")
    shape = array.shape
    array.flush()
    del array
    if not (float16 and peak < FLOAT16_SAFE_MAX):
        os.replace(scratch, file)
        return shape, np.dtype(np.float32)
    source = np.load(scratch, mmap_mode="r")
    target = np.lib.format.open_memmap(file, mode="w+", dtype=np.float16, shape=shape)
    for start in range(0, shape[1], CONVERT_ROWS):
        target[:, start:start + CONVERT_ROWS] = source[:, start:start + CONVERT_ROWS]
    target.flush()
    del target, source
    scratch.unlink()
    return shape, np.dtype(np.float16)


def _as_stream(logits) -> StreamedLogits:
    return logits if isinstance(logits, StreamedLogits) else StreamedLogits(logits.shape[1], [(0, logits.cpu())])


def _write_top_k(folder: Path, logits: StreamedLogits, k: int, arrays: dict) -> dict:
    """Write the transfer set's top-``k`` values, indices and tail log-sum-exp into ``folder`` batch by batch
    (recording each file in ``arrays``); return K and the tail's mean and largest share of probability at T = 1."""
    files, total_mass, largest, rows_seen = {}, 0.0, 0.0, 0
    for start, batch in logits.batches:
        members, rows, classes = batch.shape[0], logits.rows, batch.shape[2]
        if not files:
            check_top_k(k, classes)
            files = {"values": np.lib.format.open_memmap(folder / "train.values.npy", mode="w+", dtype=np.float32,
                                                         shape=(members, rows, k)),
                     "indices": np.lib.format.open_memmap(folder / "train.indices.npy", mode="w+",
                                                          dtype=index_dtype(classes), shape=(members, rows, k)),
                     "tail": np.lib.format.open_memmap(folder / "train.tail.npy", mode="w+", dtype=np.float32,
                                                       shape=(members, rows))}
        values, indices, tail = reduce_top_k(batch, k)
        stop = start + batch.shape[1]
        files["values"][:, start:stop] = values.numpy()
        files["indices"][:, start:stop] = indices.numpy()
        files["tail"][:, start:stop] = tail.numpy()
        mass = tail_mass(values, tail)
        total_mass, largest = total_mass + float(mass.sum()), max(largest, float(mass.max()) if mass.numel() else 0)
        rows_seen += mass.numel()
    if not files:
        raise CompressorError("no teacher logits to cache for the transfer set: the split is empty")
    for name, array in files.items():
        array.flush()
        file = folder / f"train.{name}.npy"
        arrays[f"train.{name}"] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": sha256_file(file)}
    return {"k": k, "tail_mass_mean": total_mass / max(rows_seen, 1), "tail_mass_max": largest}
