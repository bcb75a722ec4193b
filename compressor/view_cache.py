"""The view cache: the teachers' logits on each epoch's augmented views, computed once and reused.

The ``consistent`` and ``function-matching`` recipes (Beyer et al. 2022) show the student a new view of every row
each epoch and need the teachers' logits on exactly that view. A view is a deterministic function of (row, epoch,
seed) (:mod:`compressor.augment`), so the teachers' logits on epoch ``e``'s views are the same in every run with the
same teachers, data and view: they are computed once per epoch and read back by later epochs' reruns, resumed runs
and tuning trials (another temperature, α or student), instead of running K teachers on every batch.

An entry is a folder ``<root>/<sha256 of the key>/`` (the key is built by the caller and names the teachers, data,
preprocessing, transfer rows and view):

- ``entry.json`` — the key and the view's ``describe()`` text;
- ``epoch-00001.npy`` — member logits (K, N, C) on epoch 1's view of every transfer row, float16 (float32 when a
  logit reaches :data:`~compressor.teacher_cache.FLOAT16_SAFE_MAX`), read through a memory map;
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
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from compressor.errors import CompressorError
from compressor.fileio import directory_mode, remove_folder_atomically, sha256_file
from compressor.teacher_cache import ENTRY_FILE, FLOAT16_SAFE_MAX, CachedLogits, key_digest

VIEW_CACHE_FORMAT = "compressor.view-cache/1"


class ViewLogits:
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
        self.teachers = teachers  # (B, ...) -> (K, B, C) member logits on the CPU
        self.x = x                # (N, ...) the transfer set's inputs on the CPU
        self.view, self.key, self.batch_size, self.on_rows = view, key, batch_size, on_rows
        self.shape = (num_members, len(x), num_classes)  # (K, N, C)
        self.root = Path(root).expanduser()
        self.path = self.root / key_digest(key)
        self.epochs_reused: list[int] = []
        self.epochs_computed: list[int] = []
        self._current: CachedLogits | None = None  # the one epoch held open
        self._open_entry(refresh)

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
        k, n, c = self.shape
        values = np.empty((k, n, c), dtype=np.float32)  # (K, N, C)
        with torch.no_grad():
            for start in range(0, n, self.batch_size):
                rows = torch.arange(start, min(start + self.batch_size, n))  # (b,)
                out = self.teachers(self.view(self.x[start : start + len(rows)], rows, epoch))  # (K, b, C)
                if tuple(out.shape) != (k, len(rows), c):
                    raise CompressorError(f"the teachers returned logits of shape {tuple(out.shape)} for {len(rows)} "
                                          f"rows; the view cache {self.path} expects ({k}, {len(rows)}, {c})")
                values[:, start : start + len(rows)] = out.detach().float().cpu().numpy()
                if self.on_rows is not None:
                    self.on_rows(len(rows))
        small = values.size == 0 or float(np.abs(values).max()) < FLOAT16_SAFE_MAX  # NaN compares False: float32
        array = values.astype(np.float16) if small else values
        try:
            self._write(params, lambda f: np.savez(f, **self.view.parameters(torch.arange(n), epoch)))
            self._write(npy, lambda f: np.save(f, array, allow_pickle=False))
            record = {"epoch": epoch, "sha256": sha256_file(npy), "shape": list(array.shape), "dtype": str(array.dtype)}
            self._write(record_file, lambda f: f.write((json.dumps(record, indent=2) + "\n").encode()))
        except OSError as exc:
            raise self._unwritable(exc) from exc

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
