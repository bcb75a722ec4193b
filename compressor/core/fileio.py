"""Atomic file writes: every artifact is written to a temporary file beside its target and renamed.

A crash, a full disk or a kill therefore leaves either the old file or the new one, never half of one.
Imports only the standard library so ``targets`` and serving code can use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from compressor.core.errors import CompressorError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success rename it onto ``path``, else delete it.

    Use it for writers that want a file name (``torch.save``, ``onnx.save``)::

        with atomic_path(out / "model.onnx") as tmp:
            onnx.save(model, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())  # mkstemp makes 0600; an inference server running as another user must read it
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CompressorError(f"could not write {target}: {exc.strerror or exc}; free disk space or choose another --out") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """The mode ``open()`` would give a new file under this process's umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """The mode ``mkdir`` would give a new folder under this process's umask (0755 under the usual 022).

    ``tempfile.mkdtemp`` makes 0700 folders; a folder staged with it and renamed into place gets this mode, so an
    inference server or another rank running as another user can read it.
    """
    return 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks so a large file never sits in memory whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_folder_atomically(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` so that a reader sees it whole or not at all, never half deleted: it is moved
    aside in one rename into a hidden temporary folder beside it, then deleted there."""
    folder = Path(path)
    retired = Path(tempfile.mkdtemp(prefix=f".{folder.name[:16]}.old.", suffix=".tmp", dir=folder.parent))
    os.replace(folder, retired / "entry")
    shutil.rmtree(retired)


def restart_cache_entry(folder: Path, record: str, what: str) -> None:
    """Make ``folder`` ready to be (re)written as a cache entry: created, and its ``record`` (the file written last,
    that vouches for the rest) removed, so an entry cut short from here on is never trusted. ``what`` names the cache
    in the error raised when the folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / record).unlink(missing_ok=True)
    except OSError as exc:
        raise CompressorError(f"cannot write the {what} in {folder} ({exc.strerror or exc}); choose another "
                              f"--teacher-cache") from exc


def default_cache_root() -> Path:
    """Where the caches live unless ``--teacher-cache`` says: ``$COMPRESSOR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/compressor/teacher-logits``, else ``~/.cache/compressor/teacher-logits``. The teacher-logit
    entries sit there, the view cache in its ``views/``, decoded image folders in its ``images/`` and the user's
    torch Datasets in its ``datasets/``."""
    if os.environ.get("COMPRESSOR_CACHE_DIR"):
        return Path(os.environ["COMPRESSOR_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "compressor" / "teacher-logits"


def why_unwritable(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """Why files could not be written in ``folder`` (made later if missing): the nearest existing path at or above
    it and "is a file, not a folder" or the system's reason; None when they can. Checked by creating and removing
    one temporary file there, so nothing is left behind."""
    probe = Path(folder)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return probe, "is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".compressor-write-check-"):
            pass
    except OSError as exc:
        return probe, f"cannot be written in ({exc.strerror or exc})"
    return None
