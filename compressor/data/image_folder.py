"""``--data DIR``: a folder of images, one sub-folder per class (``DIR/train/<class>/*.png``, optional ``DIR/val/`` and
``DIR/test/``; without them, deterministic splits of train as for any source).

Images are decoded once, by a torch DataLoader with worker processes, into uint8 arrays memory-mapped from the
data cache (``<cache>/images/<key>/``, keyed by the files' names, sizes and modification times and by the
preprocessing), so a later run reads them back without decoding and no run holds the dataset in RAM: the training
side reads rows through :class:`compressor.data.lazy.LazyInputs`, pixel / 255 → float32, normalised per batch.
Decoding, resizing and cropping are :func:`compressor.core.preprocessing.load_image`, the function the bundle's
predictor calls on a service's images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path, write_json_atomic
from compressor.core.preprocessing import ImageSpec, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")
CACHE_FORMAT = "compressor.images/1"


@dataclass
class Listing:
    """One split's files and their class indices."""

    files: list[Path]
    labels: np.ndarray  # (N,) int64


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` looks like an image folder: a ``train`` sub-folder holding class sub-folders."""
    train = path / "train"
    return train.is_dir() and any(child.is_dir() for child in train.iterdir())


def list_images(root: Path) -> tuple[dict[str, Listing], list[str]]:
    """The files of every split present and the class names (sorted sub-folder names of ``train``). Classes that
    differ between splits, or a split without images, stop with the folder named."""
    classes = sorted(child.name for child in (root / "train").iterdir() if child.is_dir())
    listings = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        present = sorted(child.name for child in folder.iterdir() if child.is_dir())
        if present != classes:
            extra, missing = sorted(set(present) - set(classes)), sorted(set(classes) - set(present))
            raise CompressorError(f"--data {root}: the classes of {folder} differ from those of {root / 'train'} "
                                  f"(only in {split}: {extra or 'none'}; missing there: {missing or 'none'}); give "
                                  f"every split the same class folders")
        files, labels = [], []
        for k, name in enumerate(classes):
            found = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            labels += [k] * len(found)
        if not files:
            raise CompressorError(f"--data {root}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                                  f"folders; put each class's images in {folder}/<class>/")
        listings[split] = Listing(files, np.asarray(labels, dtype=np.int64))
    return listings, classes


def split_listings(root: Path, seed: int, val_fraction: float,
                   test_fraction: float) -> tuple[dict[str, Listing], list[str], dict]:
    """train, val and test file listings, each in a seeded order (so ``--max-train`` keeps a fair sample): the
    folder's own ``val/`` and ``test/`` when present, else seeded shares of ``train/``, as for any other source."""
    listings, classes = list_images(root)
    rng = np.random.default_rng(seed)
    train = listings["train"]
    order = rng.permutation(len(train.files))
    n_test = 0 if "test" in listings else int(round(len(order) * test_fraction))
    n_val = 0 if "val" in listings else int(round((len(order) - n_test) * val_fraction))
    carved = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    out = {}
    for split in SPLITS:
        if split in listings and split != "train":
            own = listings[split]
            rows = rng.permutation(len(own.files))
            out[split] = Listing([own.files[i] for i in rows], own.labels[rows])
        else:
            rows = carved[split]
            out[split] = Listing([train.files[i] for i in rows], train.labels[rows])
        if not out[split].files:
            raise CompressorError(f"--data {root}: the {split} split is empty; add images or a {root / split} folder")
    info = {"seed": seed, "method": "the folder's own " + (", ".join(s for s in ("val", "test") if s in listings)
                                                            or "train only") + "; seeded shares of train otherwise",
            "val_fraction": None if "val" in listings else val_fraction,
            "test_fraction": None if "test" in listings else test_fraction}
    return out, classes, info


def cache_key(listings: dict[str, Listing], spec: ImageSpec) -> str:
    """sha256 over every file's path, size and modification time, and the preprocessing."""
    digest = hashlib.sha256(json.dumps(spec.describe(), sort_keys=True).encode())
    for split, listing in sorted(listings.items()):
        for path, label in zip(listing.files, listing.labels):
            stat = path.stat()
            digest.update(f"{split}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


class _Decode(torch.utils.data.Dataset):
    """Worker-side decoding of one split: row i → (uint8 (C, H, W), ok flag)."""

    def __init__(self, files: list[Path], spec: ImageSpec, shape: tuple[int, int, int]):
        self.files, self.spec, self.shape = files, spec, shape

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.files[i], self.spec, dtype=np.uint8)  # (C, H, W)
        except (OSError, ValueError, CompressorError) as exc:
            return np.zeros(self.shape, np.uint8), f"{self.files[i]}: {exc}"
        if image.shape != self.shape:
            return np.zeros(self.shape, np.uint8), (f"{self.files[i]}: decodes to {list(image.shape)}, not "
                                                     f"{list(self.shape)}; pass --resize and --crop so every image "
                                                     f"has one size")
        return image, ""


def decode_split(files: list[Path], spec: ImageSpec, shape: tuple[int, int, int], out: Path,
                 workers: int) -> tuple[np.ndarray, list[str]]:
    """Decode ``files`` into the uint8 array ``out`` (N, C, H, W), written through a memory map batch by batch and
    renamed into place whole. Returns which files decoded (a bool mask; the array holds those rows, in order) and
    what was wrong with the others."""
    loader = torch.utils.data.DataLoader(_Decode(files, spec, shape), batch_size=256, num_workers=workers,
                                         collate_fn=lambda items: items)
    good, problems, row = np.zeros(len(files), bool), [], 0
    with atomic_path(out) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), *shape))
        for start, batch in zip(range(0, len(files), 256), loader):
            for i, (image, problem) in enumerate(batch):
                if problem:
                    problems.append(problem)
                    continue
                array[row], good[start + i], row = image, True, row + 1
        array.flush()
        del array
    return good, problems


def load_split_arrays(root: Path, listings: dict[str, Listing], spec: ImageSpec, cache_root: Path,
                      on_bad_image: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """Every split's uint8 images (a read-only memory map) and labels, from the data cache, decoded into it first
    when it lacks them. Images that cannot be read stop the run, or with ``on_bad_image="skip"`` are left out and
    listed in the returned record."""
    key = cache_key(listings, spec)
    folder = cache_root / "images" / key
    record = folder / "images.json"
    if not record.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shape = spec.output_shape(listings["train"].files[0])
        workers = min(4, os.cpu_count() or 1) if sum(len(x.files) for x in listings.values()) > 2000 else 0
        meta = {"format": CACHE_FORMAT, "key": key, "shape": list(shape), "preprocessing": spec.describe(),
                "rows": {}, "bad": {}}
        for split, listing in listings.items():
            good, bad = decode_split(listing.files, spec, shape, folder / f"{split}-x.npy", workers)
            np.save(folder / f"{split}-good.npy", good)
            meta["rows"][split], meta["bad"][split] = int(good.sum()), bad
        write_json_atomic(record, meta)
    meta = json.loads(record.read_text())
    bad = [problem for problems in meta["bad"].values() for problem in problems]
    if bad and on_bad_image == "stop":
        raise CompressorError(f"--data {root}: {len(bad)} image(s) cannot be read, the first {bad[0]}; fix or remove "
                              f"them, or pass --on-bad-image skip to leave them out")
    splits = {}
    for split, listing in listings.items():
        good = np.load(folder / f"{split}-good.npy")
        splits[split] = (np.load(folder / f"{split}-x.npy", mmap_mode="r")[:meta["rows"][split]],
                         listing.labels[good])
    return splits, meta
