"""Images decoded once into the data cache and read back through memory maps: what an image folder and a Hugging
Face image dataset share. A source names its rows and decodes one of them; :func:`load_split_arrays` decodes every
split's rows with a torch DataLoader and worker processes into uint8 arrays (N, C, H, W) under
``<cache>/images/<key>/`` (keyed by the source's identity, its split and the preprocessing), so a later run reads
them back without decoding and no run holds the images in RAM."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path, write_json_atomic
from compressor.core.preprocessing import ImageSpec

CACHE_FORMAT = "compressor.images/1"
DECODE_BATCH = 256


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
        name = self.source.identity(i).split("\0")[0]
        try:
            image = self.source.decode(i, self.spec)  # (C, H, W)
        except (OSError, ValueError, CompressorError) as exc:
            return np.zeros(self.shape, np.uint8), f"{name}: {exc}"
        if image.shape != self.shape:
            return np.zeros(self.shape, np.uint8), (f"{name}: decodes to {list(image.shape)}, not {list(self.shape)}; "
                                                     f"pass --resize and --crop so every image has one size")
        return image, ""


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
    when it lacks them. Images that cannot be read stop the run naming ``what`` and the first of them, or with
    ``on_bad_image="skip"`` are left out and listed in the returned record."""
    key = cache_key(sources, spec, extra or {})
    folder = cache_root / "images" / key
    record = folder / "images.json"
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shape = tuple(sources["train"].decode(0, spec).shape)
        workers = min(4, os.cpu_count() or 1) if sum(len(s) for s in sources.values()) > 2000 else 0
        meta = {"format": CACHE_FORMAT, "key": key, "shape": list(shape), "preprocessing": spec.describe(),
                "rows": {}, "bad": {}}
        for split, source in sources.items():
            good, bad = decode_split(source, spec, shape, folder / f"{split}-x.npy", workers)
            np.save(folder / f"{split}-good.npy", good)
            meta["rows"][split], meta["bad"][split] = int(good.sum()), bad
        write_json_atomic(record, meta)
    meta = json.loads(record.read_text())
    bad = [problem for problems in meta["bad"].values() for problem in problems]
    if bad and on_bad_image == "stop":
        raise CompressorError(f"--data {what}: {len(bad)} image(s) cannot be read, the first {bad[0]}; fix or remove "
                              f"them, or pass --on-bad-image skip to leave them out")
    splits = {}
    for split, source in sources.items():
        good = np.load(folder / f"{split}-good.npy")
        splits[split] = (np.load(folder / f"{split}-x.npy", mmap_mode="r")[:meta["rows"][split]], source.labels[good])
    return splits, meta


def carve_splits(count: int, seed: int, val_fraction: float, test_fraction: float, have_val: bool,
                 have_test: bool) -> dict[str, np.ndarray]:
    """Seeded row indices of a train pool for train, val and test: shares of the pool for the splits the source
    lacks (as for any source), the rest for train."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = 0 if have_test else int(round(count * test_fraction))
    n_val = 0 if have_val else int(round((count - n_test) * val_fraction))
    return {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
