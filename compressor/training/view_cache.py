"""The view cache: the teachers' logits on each epoch's augmented views, computed once and reused.

The ``consistent`` and ``function-matching`` recipes (Beyer et al. 2022) show the student a new view of every row
each epoch and need the teachers' logits on exactly that view. A view is a deterministic function of (row, epoch,
seed) (:mod:`compressor.data.augment`), so the teachers' logits on epoch ``e``'s views are the same in every run with the
same teachers, data and view: they are computed once per epoch and read back by later epochs' reruns, resumed runs
and tuning trials (another temperature, α or student), instead of running K teachers on every batch.

Two stores, chosen by the view (:func:`open_view_cache`):

- :class:`VariantLogits`, for a view with a finite set of variants (a shift has (2p + 1)² offsets): the logits are
  stored per (row, variant) pair, so the teachers run at most ``variants`` passes over the transfer set in all,
  however long the schedule (its docstring has the layout);
- :class:`ViewLogits`, for any other view (mixup draws a continuous λ): one array per epoch, laid out below.

A :class:`ViewLogits` entry is a folder ``<root>/<sha256 of the key>/`` (the key is built by the caller and names
the teachers, data, preprocessing, transfer rows and view):

- ``entry.json`` — the key and the view's ``describe()`` text;
- ``epoch-00001.npy`` — member logits (K, N, C) on epoch 1's view of every transfer row, float16 (float32 when a
  logit reaches :data:`~compressor.training.teacher_cache.FLOAT16_SAFE_MAX`), read through a memory map;
- ``epoch-00001.params.npz`` — the view's ``parameters(rows 0..N-1, 1)`` (shift offsets, mixup partners and λ): what
  was applied, never the images;
- ``epoch-00001.json`` — the sha256, shape and dtype of the ``.npy``.

Each file is written to a temporary file in the entry and renamed into place, the record last, so an epoch exists
whole (all three files) or is computed again. On reuse the ``.npy`` must match its record and the view's parameters,
recomputed, must equal the stored ones: an epoch written under another augmentation or seed is refused with a
message naming the folder, never trained on. Only the current epoch's array stays open.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from compressor.core.errors import CompressorError
from compressor.core.fileio import directory_mode, remove_folder_atomically, sha256_file
from compressor.training.cached_logits import CachedLogits
from compressor.training.teacher_cache import ENTRY_FILE, FLOAT16_SAFE_MAX, key_digest

VIEW_CACHE_FORMAT = "compressor.view-cache/1"


class _ViewEntry:
    """What both caches share: the entry folder, its key check, atomic writes and the errors that name the folder."""

    def __init__(self, teachers: Callable[[Tensor], Tensor], x: Tensor, view, num_members: int, num_classes: int,
                 root: Path, key: dict, batch_size: int, on_rows: Callable[[int], None] | None, refresh: bool):
        self.teachers = teachers  # (B, ...) -> (K, B, C) member logits on the CPU
        self.x = x                # (N, ...) the transfer set's inputs on the CPU
        self.view, self.key, self.batch_size, self.on_rows = view, key, batch_size, on_rows
        self.shape = (num_members, len(x), num_classes)  # (K, N, C)
        self.root = Path(root).expanduser()
        self.path = self.root / key_digest(key)
        self.epochs_reused: list[int] = []
        self.epochs_computed: list[int] = []
        self._timed = [0.0, 0]  # seconds the teachers took on views in this process, and on how many rows
        self._open_entry(refresh)

    def pass_seconds(self) -> float:
        """Seconds one pass of the teachers over every transfer row's view takes here: measured on the views run so
        far, else on one batch of plain rows (the first call times one)."""
        if not self._timed[1]:
            rows = self.x[: self.batch_size]
            started = time.perf_counter()
            with torch.no_grad():
                self.teachers(rows)
            self._timed = [time.perf_counter() - started, len(rows)]
        return self._timed[0] / max(1, self._timed[1]) * self.shape[1]

    def describe(self) -> dict:
        """JSON-safe summary for the report."""
        return {"path": str(self.path), "key": self.key, "epochs_reused": list(self.epochs_reused),
                "epochs_computed": list(self.epochs_computed)}

    def _open_entry(self, refresh: bool) -> None:
        """Check the entry's key, or create the entry (staged in a temporary folder, renamed into place whole)."""
        digest = self.path.name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if refresh and self.path.exists():
                remove_folder_atomically(self.path)  # a reader sees the old entry whole or none
            if not self.path.exists():
                scratch = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}.", suffix=".tmp", dir=self.root))
                try:
                    record = {"format": VIEW_CACHE_FORMAT, "key": self.key, "view": self.view.describe()}
                    (scratch / ENTRY_FILE).write_text(json.dumps(record, indent=2) + "\n")
                    os.chmod(scratch, directory_mode())  # mkdtemp makes 0700; a shared cache must be readable
                    os.replace(scratch, self.path)
                except OSError:
                    shutil.rmtree(scratch, ignore_errors=True)
                    if not self.path.is_dir():  # else another run sharing the cache created it first: use it
                        raise
        except OSError as exc:
            raise self._unwritable(exc) from exc
        try:
            record = json.loads((self.path / ENTRY_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise self._stale(f"{ENTRY_FILE} is missing or unreadable ({exc})") from exc
        if not isinstance(record, dict) or record.get("key") != self.key:
            raise self._stale("its record was written for other teachers, data, preprocessing or view")

    def _run_teachers(self, count: int, viewed: Callable[[slice], Tensor]) -> np.ndarray:
        """The teachers' logits (K, count, C) on ``viewed(chunk)``, the viewed inputs of each ``batch_size`` slice
        of the ``count`` rows: float16, or float32 when a logit reaches :data:`FLOAT16_SAFE_MAX`."""
        k, _, c = self.shape
        values = np.empty((k, count, c), dtype=np.float32)  # (K, count, C)
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, count, self.batch_size):
                chunk = slice(start, min(start + self.batch_size, count))
                b = chunk.stop - chunk.start
                out = self.teachers(viewed(chunk))  # (K, b, C)
                if tuple(out.shape) != (k, b, c):
                    raise CompressorError(f"the teachers returned logits of shape {tuple(out.shape)} for {b} rows; "
                                          f"the view cache {self.path} expects ({k}, {b}, {c})")
                values[:, chunk] = out.detach().float().cpu().numpy()
                if self.on_rows is not None:
                    self.on_rows(b)
        self._timed = [self._timed[0] + time.perf_counter() - started, self._timed[1] + count]
        small = values.size == 0 or float(np.abs(values).max()) < FLOAT16_SAFE_MAX  # NaN compares False: float32
        return values.astype(np.float16) if small else values

    def _write(self, target: Path, writer: Callable) -> None:
        """``writer(binary file)`` into a temporary file beside ``target``, renamed onto it; deleted on failure."""
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=self.path)
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
            os.chmod(tmp, directory_mode() & 0o666)  # mkstemp makes 0600; what open() would give under the umask
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _unwritable(self, exc: OSError) -> CompressorError:
        return CompressorError(f"could not write the view cache {self.path}: {exc.strerror or exc}; free disk space, "
                               f"choose another --teacher-cache or pass --no-cache")

    def _stale(self, why: str) -> CompressorError:
        return CompressorError(f"view cache {self.path} cannot be used: {why}; delete that folder or rerun with "
                               f"--refresh-teacher-cache (or --no-cache to run the teachers on every batch)")


class ViewLogits(_ViewEntry):
    """Per-epoch teacher logits on ``view(x)``: ``for_epoch(e)`` gives a :class:`CachedLogits` (K, N, C) for epoch
    ``e``'s view of every row, from the entry when stored there, else computed with ``teachers`` and stored.

    ``refresh=True`` (--refresh-teacher-cache) discards every stored epoch first. ``on_rows(n)`` is told each time
    ``n`` more rows have been run through the teachers.

    Example::

        source = ViewLogits(ensemble, x_train, Shift(2), 5, 10, cache_root, key)
        train_student(student, x_train, y_train, source, x_val, y_val, loss, config, out, view=Shift(2))
    """

    def __init__(self, teachers: Callable[[Tensor], Tensor], x: Tensor, view, num_members: int, num_classes: int,
                 root: Path, key: dict, batch_size: int = 1024, on_rows: Callable[[int], None] | None = None,
                 refresh: bool = False):
        super().__init__(teachers, x, view, num_members, num_classes, root, key, batch_size, on_rows, refresh)
        self._current: CachedLogits | None = None  # the one epoch held open

    def for_epoch(self, epoch: int) -> CachedLogits:
        """Member logits (K, N, C) on every row's view in ``epoch`` (1-based), as stored on disk."""
        self._current = None  # release the previous epoch's memory map first
        name = f"epoch-{epoch:05d}"
        files = [self.path / f"{name}{suffix}" for suffix in (".npy", ".params.npz", ".json")]
        if all(file.is_file() for file in files):
            array = self._reuse(epoch, *files)
            self.epochs_reused.append(epoch)
        else:
            self._compute(epoch, *files)
            array = np.load(files[0], mmap_mode="r", allow_pickle=False)
            self.epochs_computed.append(epoch)
        self._current = CachedLogits(array)
        return self._current

    def missing_passes(self, first: int, last: int) -> float:
        """Passes of the teachers over the transfer set that epochs ``first``..``last`` still need: one per epoch
        whose views are not stored."""
        return float(sum(not (self.path / f"epoch-{epoch:05d}.json").is_file() for epoch in range(first, last + 1)))

    def _reuse(self, epoch: int, npy: Path, params: Path, record_file: Path) -> np.ndarray:
        """Epoch ``epoch``'s stored array (K, N, C), after checking it against its record and the view."""
        try:
            info = json.loads(record_file.read_text())
            if sha256_file(npy) != info["sha256"]:
                raise self._stale(f"{npy.name} does not match the checksum recorded when it was written")
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
            if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"] or array.shape != self.shape:
                raise self._stale(f"{npy.name} has shape {list(array.shape)} {array.dtype}, recorded "
                                  f"{info['shape']} {info['dtype']}, expected {list(self.shape)}")
            with np.load(params, allow_pickle=False) as archive:
                stored = {name: archive[name] for name in archive.files}
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise self._stale(f"epoch {epoch}'s files are unreadable ({exc})") from exc
        current = self.view.parameters(torch.arange(self.shape[1]), epoch)
        if set(current) != set(stored) or not all(np.array_equal(current[k], stored[k]) for k in current):
            raise self._stale(f"the augmentation or its seed changed since epoch {epoch} was written ({params.name} "
                              f"differs from what the view applies now)")
        return array

    def _compute(self, epoch: int, npy: Path, params: Path, record_file: Path) -> None:
        """Run the teachers on epoch ``epoch``'s view of every row and store the logits, parameters and record."""
        rows = torch.arange(self.shape[1])  # (N,)
        array = self._run_teachers(len(rows), lambda chunk: self.view(self.x[chunk], rows[chunk], epoch))
        try:
            self._write(params, lambda f: np.savez(f, **self.view.parameters(rows, epoch)))
            self._write(npy, lambda f: np.save(f, array, allow_pickle=False))
            record = {"epoch": epoch, "sha256": sha256_file(npy), "shape": list(array.shape), "dtype": str(array.dtype)}
            self._write(record_file, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        except OSError as exc:
            raise self._unwritable(exc) from exc


class VariantLogits(_ViewEntry):
    """Teacher logits on views drawn from a finite set, stored once per (row, variant) rather than per epoch.

    A :class:`~compressor.data.augment.Shift` of up to p pixels has (2p + 1)² views of each image (25 at ±2 px), and
    which one a row gets in an epoch is a function of (row, epoch, seed). The teachers' logits on a view depend only
    on the row and the variant, so each epoch runs the teachers on the (row, variant) pairs no earlier epoch, run or
    seed has stored, and reads the rest. The teachers' cost of a schedule is then at most ``variants`` passes over the
    transfer set however many epochs it trains (100 epochs at ±2 px cost 25 passes at most, where a per-epoch store
    would cost 100), and never more than one pass per epoch.

    ``for_epoch(e)`` returns the same thing as :class:`ViewLogits` does: a :class:`CachedLogits` (K, N, C) of the
    teachers on every row's view in epoch ``e``, assembled in memory from the stored parts. The entry holds parts
    written whole and never changed:

    - ``part-<id>.npy`` — member logits (K, M, C) on M (row, variant) pairs, float16 (float32 when a logit reaches
      :data:`~compressor.training.teacher_cache.FLOAT16_SAFE_MAX`);
    - ``part-<id>.pairs.npy`` — those pairs, int64 (M,), ``variant · N + row``;
    - ``part-<id>.json`` — the sha256 of both files, written last: a part without it was cut short and is ignored.

    Parts are checked against their records once, when the source opens. The variant's meaning (the offsets) is in
    the entry's key through the view's ``describe()``; the seed is not, since it only decides which variant a row
    gets, so runs with other seeds share the entry.
    """

    def __init__(self, teachers: Callable[[Tensor], Tensor], x: Tensor, view, num_members: int, num_classes: int,
                 root: Path, key: dict, batch_size: int = 1024, on_rows: Callable[[int], None] | None = None,
                 refresh: bool = False):
        super().__init__(teachers, x, view, num_members, num_classes, root, key, batch_size, on_rows, refresh)
        n = self.shape[1]
        self.parts: list[np.ndarray] = []  # each (K, M, C), memory-mapped
        self.part_of = np.full((view.variants, n), -1, dtype=np.int32)  # (V, N) the part holding each pair, -1: none
        self.position = np.zeros((view.variants, n), dtype=np.int64)  # (V, N) the pair's column in that part
        self.pairs_computed = 0
        self._missing: dict[tuple[int, int, int], float] = {}  # missing_passes() by (first, last, parts held)
        for record in sorted(self.path.glob("part-*.json")):
            self._load_part(record)

    def for_epoch(self, epoch: int) -> CachedLogits:
        """Member logits (K, N, C) on every row's view in ``epoch`` (1-based), the missing pairs computed first."""
        k, n, c = self.shape
        rows = np.arange(n)
        variant = self.view.variant(torch.from_numpy(rows), epoch).numpy()  # (N,)
        missing = np.flatnonzero(self.part_of[variant, rows] < 0)  # rows whose pair no part holds yet
        if len(missing):
            self._compute(missing, variant[missing])
            self.epochs_computed.append(epoch)
        else:
            self.epochs_reused.append(epoch)
        part, column = self.part_of[variant, rows], self.position[variant, rows]  # (N,) each
        out = np.empty((k, n, c), dtype=np.float32)
        for index in np.unique(part):
            chosen = np.flatnonzero(part == index)
            out[:, chosen] = self.parts[index][:, column[chosen]]
        return CachedLogits(out)

    def describe(self) -> dict:
        """JSON-safe summary for the report: the per-epoch counts, and how many of the (row, variant) pairs are
        stored against how many exist."""
        return {**super().describe(), "pairs_stored": int((self.part_of >= 0).sum()),
                "pairs_total": int(self.part_of.size), "pairs_computed": self.pairs_computed}

    def missing_passes(self, first: int, last: int) -> float:
        """The (row, variant) pairs epochs ``first``..``last`` need that no part holds yet, in passes over the
        transfer set (a pair needed by two of those epochs counts once)."""
        key = (first, last, len(self.parts))  # the search asks again for every promotion it weighs
        if key not in self._missing:
            n = self.shape[1]
            rows = np.arange(n)
            needed = np.zeros(self.part_of.shape, dtype=bool)  # (V, N)
            for epoch in range(first, last + 1):
                needed[self.view.variant(torch.from_numpy(rows), epoch).numpy(), rows] = True
            self._missing[key] = float((needed & (self.part_of < 0)).sum()) / max(1, n)
        return self._missing[key]

    def _load_part(self, record_file: Path) -> None:
        """Check one part against its record and index its pairs."""
        stem = record_file.name[: -len(".json")]
        npy, pairs_file = self.path / f"{stem}.npy", self.path / f"{stem}.pairs.npy"
        try:
            info = json.loads(record_file.read_text())
            if sha256_file(npy) != info["sha256"] or sha256_file(pairs_file) != info["pairs_sha256"]:
                raise self._stale(f"{stem} does not match the checksums recorded when it was written")
            array = np.load(npy, mmap_mode="r", allow_pickle=False)
            pairs = np.load(pairs_file, allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._stale(f"{stem}'s files are unreadable ({exc})") from exc
        k, _, c = self.shape
        if array.shape != (k, len(pairs), c) or pairs.dtype != np.int64 or (len(pairs) and (
                pairs.min() < 0 or pairs.max() >= self.part_of.size)):
            raise self._stale(f"{stem} holds logits of shape {list(array.shape)} for {len(pairs)} pairs; expected "
                              f"({k}, {len(pairs)}, {c}) and pairs below {self.part_of.size}")
        self._index(array, pairs)

    def _index(self, array: np.ndarray, pairs: np.ndarray) -> None:
        """Make ``array`` (K, M, C) the holder of ``pairs`` (M,)."""
        variant, row = np.divmod(pairs, self.shape[1])
        self.part_of[variant, row] = len(self.parts)
        self.position[variant, row] = np.arange(len(pairs))
        self.parts.append(array)

    def _compute(self, rows: np.ndarray, variant: np.ndarray) -> None:
        """Run the teachers on ``rows`` (M,) moved by their ``variant`` (M,) and store them as a new part."""
        array = self._run_teachers(len(rows), lambda chunk: self.view.apply_variant(
            self.x[torch.from_numpy(rows[chunk])], torch.from_numpy(variant[chunk])))
        pairs = variant.astype(np.int64) * self.shape[1] + rows
        stem = f"part-{uuid.uuid4().hex[:16]}"  # runs sharing the entry never pick the same name
        npy, pairs_file = self.path / f"{stem}.npy", self.path / f"{stem}.pairs.npy"
        try:
            self._write(npy, lambda f: np.save(f, array, allow_pickle=False))
            self._write(pairs_file, lambda f: np.save(f, pairs, allow_pickle=False))
            record = {"sha256": sha256_file(npy), "pairs_sha256": sha256_file(pairs_file), "pairs": len(pairs),
                      "dtype": str(array.dtype)}
            self._write(self.path / f"{stem}.json", lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        except OSError as exc:
            raise self._unwritable(exc) from exc
        self.pairs_computed += len(pairs)
        self._index(np.load(npy, mmap_mode="r", allow_pickle=False), pairs)  # just written: no second checksum


def open_view_cache(teachers: Callable[[Tensor], Tensor], x: Tensor, view, num_members: int, num_classes: int,
                    root: Path, key: dict, refresh: bool = False) -> ViewLogits | VariantLogits:
    """The cache for ``view``'s teacher logits: per (row, variant) when the view has finitely many variants (the
    key then leaves out ``view_seed``, which only picks the variants), else per epoch."""
    if hasattr(view, "variants"):
        shared = {name: value for name, value in key.items() if name != "view_seed"}
        return VariantLogits(teachers, x, view, num_members, num_classes, root, {**shared, "store": "variants"},
                             refresh=refresh)
    return ViewLogits(teachers, x, view, num_members, num_classes, root, key, refresh=refresh)
