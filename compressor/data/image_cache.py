"""Images decoded once into the data cache and read back through memory maps: what an image folder and a Hugging
Face image dataset share. A source names its rows and decodes one of them; :func:`load_split_arrays` decodes every
split's rows with a torch DataLoader and worker processes into uint8 arrays (N, C, H, W) under
``<cache>/images/<key>/`` (keyed by the source's identity, its split and the preprocessing), so a later run reads
them back without decoding and no run holds the images in RAM.

``images.json``, written last, records the sha256, shape and dtype of every ``.npy`` beside it. A later run checks
them all before it reads a pixel; an entry that does not match (a file zeroed, truncated or replaced, or a record
from before checksums) is decoded again with one warning line, never used."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.markup import escape

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path, restart_cache_entry, sha256_file, write_json_atomic
from compressor.core.preprocessing import ImageSpec

CACHE_FORMAT = "compressor.images/2"  # /2: every file's sha256, shape and dtype; /1 entries had none, so are redone
RECORD = "images.json"
DECODE_BATCH = 256
# What an unreadable file raises: Pillow's UnidentifiedImageError and truncated files are OSErrors, some plugins
# raise ValueError or EOFError. DecompressionBombError (past twice Image.MAX_IMAGE_PIXELS) is none of these.
UNREADABLE = (OSError, ValueError, EOFError, CompressorError)


class ImageSource(Protocol):
    """One split's images: how many, what each is called (for messages and the cache key), and its pixels."""

    labels: np.ndarray  # (N,) int64, -1 = unlabeled

    def __len__(self) -> int: ...

    def identity(self, i: int) -> str: ...  # e.g. "path\0size\0mtime": changes when the image does

    def decode(self, i: int, spec: ImageSpec) -> np.ndarray: ...  # (C, H, W) uint8


@dataclass
class _Decode(torch.utils.data.Dataset):
    """Worker-side decoding of one split: row i → (uint8 (C, H, W), what went wrong or "")."""

    source: ImageSource
    spec: ImageSpec
    shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        image, problem = decode_row(self.source, i, self.spec)
        if image is None:
            return np.zeros(self.shape, np.uint8), problem
        if image.shape != self.shape:
            name = self.source.identity(i).split("\0")[0]
            return np.zeros(self.shape, np.uint8), (f"{name}: decodes to {list(image.shape)}, not {list(self.shape)}; "
                                                     f"pass --resize and --crop so every image has one size")
        return image, ""


def decode_row(source: ImageSource, i: int, spec: ImageSpec) -> tuple[np.ndarray | None, str]:
    """Row ``i`` decoded, (C, H, W) uint8, and ""; or None and what is wrong with it, naming its file."""
    name = source.identity(i).split("\0")[0]
    try:
        return source.decode(i, spec), ""
    except Image.DecompressionBombError as exc:  # Pillow's documented limit, kept: such a file is refused
        return None, f"{name}: exceeds Pillow's decompression-bomb limit ({str(exc).split(', could')[0]})"
    except UNREADABLE as exc:
        return None, f"{name}: {exc}"


def first_shape(what: str, source: ImageSource, spec: ImageSpec) -> tuple[int, int, int]:
    """(C, H, W) of the first training row that decodes: the size every other row must have."""
    first = ""
    for i in range(len(source)):
        image, problem = decode_row(source, i, spec)
        if image is not None:
            return tuple(image.shape)  # type: ignore[return-value]
        first = first or problem
    raise CompressorError(f"--data {what}: none of the {len(source)} training images can be read (the first, "
                          f"{first}); fix or replace them")


def cache_key(sources: dict[str, ImageSource], spec: ImageSpec, extra: dict) -> str:
    """sha256 over every row's identity and label per split, the preprocessing and ``extra`` (e.g. columns)."""
    digest = hashlib.sha256(json.dumps([spec.describe(), extra], sort_keys=True).encode())
    for split, source in sorted(sources.items()):
        for i in range(len(source)):
            digest.update(f"{split}\0{source.identity(i)}\0{source.labels[i]}\n".encode())
    return digest.hexdigest()


def decode_split(source: ImageSource, spec: ImageSpec, shape: tuple[int, int, int], out: Path,
                 workers: int) -> tuple[np.ndarray, list[str]]:
    """Decode every row of ``source`` into the uint8 array ``out`` (N, C, H, W), written through a memory map batch
    by batch and renamed into place whole. Returns which rows decoded (a bool mask; the array holds those rows, in
    order) and what was wrong with the others."""
    loader = torch.utils.data.DataLoader(_Decode(source, spec, shape), batch_size=DECODE_BATCH, num_workers=workers,
                                         collate_fn=list)
    good, problems, row = np.zeros(len(source), bool), [], 0
    with atomic_path(out) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(source), *shape))
        for start, batch in zip(range(0, len(source), DECODE_BATCH), loader):
            for i, (image, problem) in enumerate(batch):
                if problem:
                    problems.append(problem)
                    continue
                array[row], good[start + i], row = image, True, row + 1
        array.flush()
        del array
    return good, problems


def load_split_arrays(what: str, sources: dict[str, ImageSource], spec: ImageSpec, cache_root: Path,
                      on_bad_image: str, extra: dict | None = None
                      ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Every split's uint8 images (a read-only memory map) and labels, from the data cache, decoded into it first
    when it lacks them or what it holds does not match its checksums (then with one warning line, and the returned
    record's ``recomputed`` says why). Images that cannot be read stop the run naming ``what`` and the first of
    them, or with ``on_bad_image="skip"`` are left out and listed in the returned record."""
    key = cache_key(sources, spec, extra or {})
    folder = cache_root / "images" / key
    meta, note = None, None
    if (folder / RECORD).exists():
        try:
            meta = verified_record(folder, key, sources)
        except StaleImages as stale:
            note = f"the decoded-image cache {folder} cannot be used: {stale}; decoding the images again"
            Console(stderr=True).print(f"[yellow]warning:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if meta is None:
        meta = decode_entry(what, folder, key, sources, spec)
    bad = [problem for problems in meta["bad"].values() for problem in problems]
    if bad and on_bad_image == "stop":
        raise CompressorError(f"--data {what}: {len(bad)} image(s) cannot be read, the first {bad[0]}; fix or remove "
                              f"them, or pass --on-bad-image skip to leave them out")
    splits = {}
    for split, source in sources.items():
        good = np.load(folder / f"{split}-good.npy", allow_pickle=False)
        x = np.load(folder / f"{split}-x.npy", mmap_mode="r", allow_pickle=False)
        splits[split] = (x[:meta["rows"][split]], source.labels[good])
    return splits, meta if note is None else {**meta, "recomputed": note}


def decode_entry(what: str, folder: Path, key: str, sources: dict[str, ImageSource], spec: ImageSpec) -> dict:
    """Decode every split into ``folder`` and write its record last, with each file's sha256, shape and dtype."""
    restart_cache_entry(folder, RECORD, "decoded-image cache")
    shape = first_shape(what, sources["train"], spec)
    workers = min(4, os.cpu_count() or 1) if sum(len(s) for s in sources.values()) > 2000 else 0
    meta = {"format": CACHE_FORMAT, "key": key, "shape": list(shape), "preprocessing": spec.describe(),
            "rows": {}, "bad": {}, "files": {}}
    for split, source in sources.items():
        good, bad = decode_split(source, spec, shape, folder / f"{split}-x.npy", workers)
        with atomic_path(folder / f"{split}-good.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, good, allow_pickle=False)  # a handle: np.save would add ".npy" to the temp name
        meta["rows"][split], meta["bad"][split] = int(good.sum()), bad
        for name in (f"{split}-x.npy", f"{split}-good.npy"):
            array = np.load(folder / name, mmap_mode="r", allow_pickle=False)
            meta["files"][name] = {"sha256": sha256_file(folder / name), "shape": list(array.shape),
                                   "dtype": str(array.dtype)}
    write_json_atomic(folder / RECORD, meta)
    return meta


class StaleImages(Exception):
    """Why a decoded-image entry cannot be used; :func:`load_split_arrays` decodes it again."""


def verified_record(folder: Path, key: str, sources: dict[str, ImageSource]) -> dict:
    """The entry's record, once every file beside it matched its recorded sha256, shape and dtype (read in 1 MiB
    blocks: a cheap pass next to decoding). Raises :class:`StaleImages` saying what does not match."""
    try:
        meta = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError) as exc:
        raise StaleImages(f"{RECORD} is unreadable ({exc})") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != CACHE_FORMAT:  # compressor.images/1 recorded no checksums: nothing to check its files against
        raise StaleImages(f"{RECORD} has format {found!r}, not {CACHE_FORMAT!r} (earlier formats record no "
                          f"checksums)")
    if meta.get("key") != key or not all(isinstance(meta.get(k), dict) for k in ("rows", "bad", "files")):
        raise StaleImages(f"{RECORD} was written for other images or is incomplete")
    for split, source in sources.items():
        for name, dtype in ((f"{split}-x.npy", "uint8"), (f"{split}-good.npy", "bool")):
            _check_file(folder / name, meta["files"].get(name), dtype, len(source))
        good = np.load(folder / f"{split}-good.npy", allow_pickle=False)
        if not isinstance(meta["rows"].get(split), int) or int(good.sum()) != meta["rows"][split]:
            raise StaleImages(f"{split}-good.npy marks {int(good.sum())} decoded rows, {RECORD} says "
                              f"{meta['rows'].get(split)}")
    return meta


def _check_file(file: Path, info, dtype: str, rows: int) -> None:
    """``file`` against its record ``info``: present, the recorded sha256, ``rows`` rows of ``dtype``."""
    if not isinstance(info, dict) or not {"sha256", "shape", "dtype"} <= set(info):
        raise StaleImages(f"{RECORD} has no complete record of {file.name}")
    if not file.is_file():
        raise StaleImages(f"{file.name} is missing")
    if sha256_file(file) != info["sha256"]:
        raise StaleImages(f"{file.name} does not match the checksum recorded when it was written")
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StaleImages(f"{file.name} is unreadable ({exc})") from exc
    if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"] or info["dtype"] != dtype \
            or not array.shape or array.shape[0] != rows:
        raise StaleImages(f"{file.name} holds {list(array.shape)} {array.dtype}, recorded {info['shape']} "
                          f"{info['dtype']}, expected {rows} rows of {dtype}")


def carve_splits(count: int, seed: int, val_fraction: float, test_fraction: float, have_val: bool,
                 have_test: bool) -> dict[str, np.ndarray]:
    """Seeded row indices of a train pool for train, val and test: shares of the pool for the splits the source
    lacks (as for any source), the rest for train."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = 0 if have_test else int(round(count * test_fraction))
    n_val = 0 if have_val else int(round((count - n_test) * val_fraction))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
