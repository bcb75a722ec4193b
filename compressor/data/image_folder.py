"""``--data DIR``: a folder of images, one sub-folder per class (``DIR/train/<class>/*.png``, optional ``DIR/val/`` and
``DIR/test/``; without them, deterministic splits of train as for any source), decoded once into the data cache
(:mod:`compressor.data.image_cache`) and read back lazily. Decoding, resizing and cropping are
:func:`compressor.core.preprocessing.load_image`, the function the bundle's predictor calls on a service's images.
A folder laid out otherwise is refused with what it holds and the layout expected (:func:`explain_folder`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError
from compressor.core.preprocessing import ImageSpec, load_image
from compressor.data.image_cache import carve_splits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SPLITS = ("train", "val", "test")
LAYOUT = "DIR/train/<class>/*.png (one sub-folder per class, named after it; optional val/ and test/ alike)"


@dataclass
class FolderImages:
    """One split's image files and their class indices (an :class:`~compressor.data.image_cache.ImageSource`)."""

    files: list[Path]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.files)

    def identity(self, i: int) -> str:
        try:
            stat = self.files[i].stat()
        except OSError as exc:  # a dangling link or a file gone: decode() fails on it and names it, skip counts it
            return f"{self.files[i]}\0unreadable\0{exc.errno}"
        return f"{self.files[i]}\0{stat.st_size}\0{stat.st_mtime_ns}"

    def decode(self, i: int, spec: ImageSpec) -> np.ndarray:
        return load_image(self.files[i], spec, dtype=np.uint8)  # (C, H, W)

    def mode(self, i: int) -> str | None:
        """The Pillow mode in file ``i``'s header ("L", "RGB", ...; no pixels decoded), None when it cannot be read."""
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                return image.mode
        except Exception:  # any failure only means no evidence from this file; decoding names it
            return None

    def subset(self, rows: np.ndarray) -> "FolderImages":
        return FolderImages([self.files[i] for i in rows], self.labels[rows])


def _children(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; one line when it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise CompressorError(f"--data: cannot list {folder} ({exc.strerror or exc}); check that it exists and that "
                              f"you may read it") from exc


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _class_folders(folder: Path) -> tuple[list[str], list[Path]]:
    """The class folders of one split folder (sub-folders, and links to folders) and those that are links to
    nothing: a class still, so that dropping it cannot shift the other classes' indices."""
    children = _children(folder)
    dangling = [child for child in children if child.is_symlink() and not child.exists()]
    names = sorted(child.name for child in children if child.is_dir() or child in dangling)
    return names, dangling


def is_image_folder(path: Path) -> bool:
    """Whether ``path`` looks like an image folder: a ``train`` sub-folder holding class sub-folders."""
    train = path / "train"
    return train.is_dir() and bool(_class_folders(train)[0])


def explain_folder(path: Path) -> None:
    """Stop with what ``path`` holds and the layout expected when it is neither an image folder nor a folder of IDX
    files; return when it holds IDX files (their reader names any that are missing)."""
    children = _children(path)
    if any("ubyte" in child.name for child in children):
        return
    layout = LAYOUT.replace("DIR", str(path))
    train = path / "train"
    if train.is_dir():
        flat = [child for child in _children(train) if _is_image(child)]
        holds = f"{len(flat)} images directly, without class folders" if flat else "no class folders"
        raise CompressorError(f"--data {path}: {train} holds {holds}; an image folder is laid out as {layout}")
    classes = [child.name for child in children if child.is_dir() and any(map(_is_image, _children(child)))]
    if classes and path.name in SPLITS:
        raise CompressorError(f"--data {path} names the {path.name} split itself (its class folders: "
                              f"{', '.join(classes[:5])}); pass its parent, --data {path.parent}, laid out as "
                              f"{LAYOUT.replace('DIR', str(path.parent))}")
    if classes:
        raise CompressorError(f"--data {path}: its class folders ({', '.join(classes[:5])}) sit directly in it; move "
                              f"them into {train}/ so that it is laid out as {layout}")
    images = [child for child in children if _is_image(child)]
    holds = (f"{len(images)} images directly" if images else
             f"{len(children)} entries, none of them images or IDX files" if children else "nothing")
    raise CompressorError(f"--data {path} holds {holds}; give an image folder laid out as {layout}, or a folder of "
                          f"MNIST-format IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-…)")


def list_images(root: Path, on_bad_image: str = "stop") -> tuple[dict[str, FolderImages], list[str], list[str]]:
    """The files of every split present, the class names (sorted sub-folder names of ``train``) and the class
    folders that are links to nothing (with ``on_bad_image="skip"``: such a class keeps its index and has no
    images; else they stop the run). Classes that differ between splits, or a split without images, stop with the
    folder named."""
    classes, train_dangling = _class_folders(root / "train")
    listings, skipped = {}, []
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        present, dangling = (classes, train_dangling) if split == "train" else _class_folders(folder)
        if present != classes:
            extra, missing = sorted(set(present) - set(classes)), sorted(set(classes) - set(present))
            raise CompressorError(f"--data {root}: the classes of {folder} differ from those of {root / 'train'} "
                                  f"(only in {split}: {extra or 'none'}; missing there: {missing or 'none'}); give "
                                  f"every split the same class folders")
        if dangling and on_bad_image == "stop":
            raise CompressorError(f"--data {root}: the class folder {dangling[0]} links to {os.readlink(dangling[0])},"
                                  f" which does not exist; fix or remove the link, or pass --on-bad-image skip to "
                                  f"keep that class without images")
        skipped += [str(link) for link in dangling]
        files, labels = [], []
        for k, name in enumerate(classes):
            if folder / name in dangling:
                continue
            found = [p for p in _children(folder / name) if _is_image(p)]
            files += found
            labels += [k] * len(found)
        if not files:
            raise CompressorError(f"--data {root}: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) in its class "
                                  f"folders; put each class's images in {folder}/<class>/")
        listings[split] = FolderImages(files, np.asarray(labels, dtype=np.int64))
    return listings, classes, skipped


def split_listings(root: Path, seed: int, val_fraction: float, test_fraction: float, on_bad_image: str = "stop"
                   ) -> tuple[dict[str, FolderImages], list[str], dict]:
    """train, val and test file listings, each in a seeded order (so ``--max-train`` keeps a fair sample): the
    folder's own ``val/`` and ``test/`` when present, else seeded shares of ``train/``, as for any other source."""
    listings, classes, skipped = list_images(root, on_bad_image)
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
    if skipped:
        info["skipped_class_folders"] = skipped
    return out, classes, info
