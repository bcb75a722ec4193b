"""``--data DIR``: a folder of images, one sub-folder per class (``DIR/train/<class>/*.png``, optional ``DIR/val/`` and
``DIR/test/``; without them, deterministic splits of train as for any source), decoded once into the data cache
(:mod:`compressor.data.image_cache`) and read back lazily. Decoding, resizing and cropping are
:func:`compressor.core.preprocessing.load_image`, the function the bundle's predictor calls on a service's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError
from compressor.core.preprocessing import ImageSpec, load_image
from compressor.data.image_cache import carve_splits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")


@dataclass
class FolderImages:
    """One split's image files and their class indices (an :class:`~compressor.data.image_cache.ImageSource`)."""

    files: list[Path]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.files)

    def identity(self, i: int) -> str:
        stat = self.files[i].stat()
        return f"{self.files[i]}\0{stat.st_size}\0{stat.st_mtime_ns}"

    def decode(self, i: int, spec: ImageSpec) -> np.ndarray:
        return load_image(self.files[i], spec, dtype=np.uint8)  # (C, H, W)

    def subset(self, rows: np.ndarray) -> "FolderImages":
        return FolderImages([self.files[i] for i in rows], self.labels[rows])


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` looks like an image folder: a ``train`` sub-folder holding class sub-folders."""
    train = path / "train"
    return train.is_dir() and any(child.is_dir() for child in train.iterdir())


def list_images(root: Path) -> tuple[dict[str, FolderImages], list[str]]:
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
        listings[split] = FolderImages(files, np.asarray(labels, dtype=np.int64))
    return listings, classes


def split_listings(root: Path, seed: int, val_fraction: float,
                   test_fraction: float) -> tuple[dict[str, FolderImages], list[str], dict]:
    """train, val and test file listings, each in a seeded order (so ``--max-train`` keeps a fair sample): the
    folder's own ``val/`` and ``test/`` when present, else seeded shares of ``train/``, as for any other source."""
    listings, classes = list_images(root)
    rng = np.random.default_rng(seed)
    carved = carve_splits(len(listings["train"]), seed, val_fraction, test_fraction, "val" in listings,
                          "test" in listings)
    out = {}
    for split in SPLITS:
        if split in listings and split != "train":
            out[split] = listings[split].subset(rng.permutation(len(listings[split])))
        else:
            out[split] = listings["train"].subset(carved[split])
        if not len(out[split]):
            raise CompressorError(f"--data {root}: the {split} split is empty; add images or a {root / split} folder")
    info = {"seed": seed, "method": "the folder's own " + (", ".join(s for s in ("val", "test") if s in listings)
                                                            or "train only") + "; seeded shares of train otherwise",
            "val_fraction": None if "val" in listings else val_fraction,
            "test_fraction": None if "test" in listings else test_fraction}
    return out, classes, info
