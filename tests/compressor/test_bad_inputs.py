"""The bad-input corpus (issue 28): every way a team's real inputs go wrong, run through ``compress`` in process.

Each case builds its inputs in a fresh folder from data and teachers made once per session, calls the CLI, and
holds it to the contract of DESIGN.md: the exit code (1 for bad input, 2 for a missing capability), exactly one
line starting with ``error:`` that names the offending file or flag, no ``internal error:`` and no traceback, the
teachers never run (no ``teacher cache`` line), and nothing in ``--out`` (for ``--resume``: nothing new there).
Needles are the file or flag any correct message names, not its wording.
"""

from __future__ import annotations

import io
import os
import json
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from compressor.cli import main
from tests.conftest import TOKEN_CLASSES, token_rows

datasets = pytest.importorskip("datasets")

QUICK = ["--epochs", "1", "--warmup", "0.01", "--duration", "0.02", "--rounds", "1", "--batch-sizes", "1",
         "--no-progress"]
DIGIT_CLASSES = [str(c) for c in range(10)]
LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


# ---------------------------------------------------------------------------------------------------------------
# what every case is built from, once per module: teachers, an image folder, an hf image dataset, a checkpoint


def write_pngs(root: Path, x: np.ndarray, y: np.ndarray, per_class: int = 4) -> Path:
    """``per_class`` digits of each class as 8 × 8 grayscale PNGs, ``root/train/<class>/<n>.png``."""
    for c in range(10):
        folder = root / "train" / DIGIT_CLASSES[c]
        folder.mkdir(parents=True)
        for n, row in enumerate(np.flatnonzero(y == c)[:per_class]):
            Image.fromarray(np.round(x[row, 0] * 255).astype(np.uint8), mode="L").save(folder / f"{n:03d}.png")
    return root


def hf_image_rows(x: np.ndarray, y: np.ndarray, n: int = 60, size: int | None = None) -> dict:
    images = [Image.fromarray(np.round(row[0] * 255).astype(np.uint8), mode="L") for row in x[:n]]
    return {"image": [im.resize((size, size)) if size else im for im in images], "label": y[:n].tolist(),
            "note": ["-"] * n}


def hf_image_features(label=None) -> "datasets.Features":
    return datasets.Features({"image": datasets.Image(), "label": label or datasets.ClassLabel(names=DIGIT_CLASSES),
                              "note": datasets.Value("string")})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, digits_data, digits_ensemble) -> SimpleNamespace:
    """The digits teachers, 200 training rows of their data, a 40-image folder of them and a 60-row hf: dataset."""
    root = tmp_path_factory.mktemp("bad-input-corpus")
    x, y = digits_data.train.x[:200], digits_data.train.y[:200]
    datasets.Dataset.from_dict(hf_image_rows(x, y), features=hf_image_features()).save_to_disk(str(root / "hf"))
    return SimpleNamespace(digits=digits_ensemble, x=x, y=y, hf=root / "hf", folder=write_pngs(root / "png", x, y))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_ensemble) -> tuple[list, Path]:
    """One real run of a tiny student on the digits: its command and the last.pt the --resume cases start from."""
    root = tmp_path_factory.mktemp("finished-run")
    args = ["--teacher", digits_ensemble, "--data", "digits", "--student", "mlp:16", "--max-train", "200", *QUICK]
    assert main([str(a) for a in args + ["--out", root / "out", "--teacher-cache", root / "cache"]]) == 0
    assert (root / "out" / "checkpoints" / "last.pt").is_file()
    return args, root / "out" / "checkpoints" / "last.pt"


@dataclass
class Env:
    """What a case's build function gets: its own folder, the shared corpus, and the environment to set."""

    tmp: Path
    c: SimpleNamespace
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest
    names: dict = field(default_factory=dict)  # fills {placeholders} in the needles

    @property
    def text_teachers(self) -> Path:
        """conftest's three tiny BERTs (vocabulary 32, at most 32 tokens, 3 classes), built by the first text case."""
        return self.request.getfixturevalue("text_ensemble")

    @property
    def tokens(self) -> Path:
        """conftest's pre-tokenised hf: dataset the BERTs were trained on."""
        return self.request.getfixturevalue("token_data")


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Env], list]  # the CLI's arguments; --out is added unless the case names one
    needles: tuple[str, ...]
    code: int = 1


def digits(e: Env, *extra) -> list:
    return ["--teacher", e.c.digits, "--data", "digits", "--student", "mlp:16", *QUICK, *extra]


def text(e: Env, *extra, data=None) -> list:
    return ["--teacher", e.text_teachers, "--data", f"hf:{data or e.tokens}", "--student", "hf:teacher/0.5", *QUICK,
            *extra]


def images(e: Env, root, *extra) -> list:
    return ["--teacher", e.c.digits, "--data", root, "--student", "cnn:8x16", *QUICK, *extra]


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def folder(e: Env, name: str) -> Path:
    (e.tmp / name).mkdir()
    return e.tmp / name


def saved(e: Env, name: str, obj) -> Path:
    """``obj`` pickled by torch.save into ``name``."""
    torch.save(obj, e.tmp / name)
    return e.tmp / name


def garbage(n: int = 2048) -> bytes:
    return np.random.default_rng(0).bytes(n)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def decompression_bomb() -> bytes:
    """A 65535 × 65535 grayscale PNG header (4.3 G pixels, past Pillow's limit) with a few bytes of pixels."""
    header = struct.pack(">IIBBBBB", 65535, 65535, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------------------------------------------
# teacher files


def pickled_members(e: Env, name: str = "members.pkl") -> Path:
    path = e.tmp / name
    torch.save([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], path)
    return path


def scripted(path: Path, net: nn.Module, shape=(1, 8, 8)) -> Path:
    torch.jit.save(torch.jit.trace(net.eval(), torch.rand(2, *shape)), str(path))
    return path


def manifest(e: Env, body: str, members: dict | None = None) -> Path:
    """``ensemble.toml`` with ``body``, beside member files: name -> module (scripted), bytes, or a callable."""
    for name, member in (members or {}).items():
        if isinstance(member, nn.Module):
            scripted(e.tmp / name, member)
        elif callable(member):
            member(e.tmp / name)
        else:
            write(e.tmp / name, member)
    return write(e.tmp / "ensemble.toml", body)


def linear(classes: int = 10, inputs: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, classes))


class NaNLogits(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10] * float("nan")


class FlatLogits(nn.Module):
    def forward(self, x):
        return x.flatten(1).sum(1)  # (N,), not (N, C)


def export_pt2(path: Path) -> None:
    program = torch.export.export(linear().eval(), (torch.rand(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def hint_to_missing_data(e: Env) -> Path:
    """An archive whose ``dataset`` hint names a folder this machine lacks (no --data given)."""
    from compressor import save_ensemble

    return save_ensemble([linear().eval()], e.tmp / "hinted.pt", torch.rand(2, 1, 8, 8),
                         {"dataset": str(e.tmp / "datasets" / "fashion")})


def zip_not_torchscript(e: Env) -> Path:
    path = e.tmp / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", garbage(256))
    return path


def members_toml(*names: str, header: str = "") -> str:
    return header + "".join(f'[[members]]\npath = "{name}"\n' for name in names)


TEACHER_CASES = [
    Case("teacher-missing", lambda e: digits(e, "--teacher", e.tmp / "absent.pt"), ("absent.pt",)),
    Case("teacher-empty", lambda e: digits(e, "--teacher", write(e.tmp / "empty.pt", b"")), ("empty.pt",)),
    Case("teacher-garbage", lambda e: digits(e, "--teacher", write(e.tmp / "garbage.pt", garbage())),
         ("garbage.pt",)),
    Case("teacher-truncated", lambda e: digits(e, "--teacher", write(e.tmp / "cut.pt", e.c.digits.read_bytes()[:5000])),
         ("cut.pt",)),
    Case("teacher-a-folder", lambda e: digits(e, "--teacher", folder(e, "teacher-dir")),
         ("teacher-dir",)),
    Case("teacher-zip-not-torchscript", lambda e: digits(e, "--teacher", zip_not_torchscript(e)), ("archive.pt",)),
    Case("teacher-onnx-garbage", lambda e: digits(e, "--teacher", write(e.tmp / "model.onnx", garbage())),
         ("model.onnx",)),
    Case("teacher-pickle-without-trust-pickle", lambda e: digits(e, "--teacher", pickled_members(e)),
         ("members.pkl", "--trust-pickle")),
    Case("teacher-pickle-of-no-module", lambda e: digits(e, "--teacher", saved(e, "dict.pkl", {"w": torch.zeros(3)}),
                                                         "--trust-pickle"), ("dict.pkl",)),
    Case("teacher-dataset-hint-missing", lambda e: ["--teacher", hint_to_missing_data(e), "--student", "mlp:16",
                                                    *QUICK], ("fashion",)),
    Case("manifest-not-toml", lambda e: digits(e, "--teacher", manifest(e, "[[members]\npath = ")),
         ("ensemble.toml",)),
    Case("manifest-without-members", lambda e: digits(e, "--teacher", manifest(e, "[ensemble]\nnum_classes = 10\n")),
         ("ensemble.toml",)),
    Case("manifest-member-without-path", lambda e: digits(e, "--teacher", manifest(e, '[[members]]\nname = "a"\n')),
         ("ensemble.toml",)),
    Case("manifest-member-missing", lambda e: digits(e, "--teacher", manifest(e, members_toml("gone.pt"))),
         ("gone.pt",)),
    Case("manifest-member-garbage", lambda e: digits(e, "--teacher", manifest(e, members_toml("junk.pt"),
                                                                               {"junk.pt": garbage()})),
         ("junk.pt",)),
    Case("manifest-member-pickle", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("pickled.pt"), {"pickled.pt": lambda p: torch.save(linear(), p)})), ("pickled.pt",)),
    Case("manifest-member-pt2-without-trust-pickle", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("exported.pt2"), {"exported.pt2": export_pt2})), ("exported.pt2", "--trust-pickle")),
    Case("manifest-unknown-combine", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("a.pt", header='[ensemble]\ncombine = "median"\n'), {"a.pt": linear()})), ("median",)),
    Case("manifest-num-classes-contradicts-members", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("a.pt", header="[ensemble]\nnum_classes = 5\n"), {"a.pt": linear()})),
         ("ensemble.toml", "member")),
    Case("manifest-class-names-too-few", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("a.pt", header='[ensemble]\nclass_names = ["a", "b", "c"]\n'), {"a.pt": linear()})),
         ("class_names",)),
    Case("manifest-member-nan-logits", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("fine.pt", "nan-member.pt"), {"fine.pt": linear(), "nan-member.pt": NaNLogits()})),
         ("nan-member", "NaN")),
    Case("manifest-member-returns-no-classes", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("flat.pt"), {"flat.pt": FlatLogits()})), ("flat",)),
    Case("manifest-member-for-other-inputs", lambda e: digits(e, "--teacher", manifest(
        e, members_toml("wide.pt", header="[ensemble]\ninput_shape = [1, 28, 28]\n"),
        {"wide.pt": lambda p: scripted(p, linear(10, 784), (1, 28, 28))})), ("[1, 28, 28]", "[1, 8, 8]")),
]


# ---------------------------------------------------------------------------------------------------------------
# --data: missing, .npz, IDX, image folders


def npz(e: Env, name: str, **arrays) -> Path:
    np.savez(e.tmp / name, **arrays)
    return e.tmp / name


def digits_npz(e: Env, name: str, y=None, x=None) -> Path:
    x = e.c.x[:200] if x is None else x
    return npz(e, name, x=x, y=e.c.y[:len(x)] if y is None else y)


def labels_beyond(e: Env) -> Path:
    y = e.c.y[:200].copy()
    y[7] = 12
    return digits_npz(e, "labels12.npz", y=y)


def nan_rows(e: Env) -> Path:
    x = e.c.x[:200].copy()
    x[3, 0, 2, 2] = np.nan
    return digits_npz(e, "nan.npz", x=x)


def idx_folder(e: Env) -> Path:
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        write(e.tmp / "idx" / name, garbage(64))
    return e.tmp / "idx"


def folder_copy(e: Env, name: str = "imgs") -> Path:
    return Path(shutil.copytree(e.c.folder, e.tmp / name))


def with_file(e: Env, name: str, content: bytes, cls: str = "3") -> Path:
    root = folder_copy(e)
    write(root / "train" / cls / name, content)
    return root


def flat_images(e: Env) -> Path:
    """Images straight in ``train/``, no class folders."""
    root = e.tmp / "flat-images"
    for k, png in enumerate(sorted(e.c.folder.rglob("*.png"))):
        write(root / "train" / f"{k:03d}.png", png.read_bytes())
    return root


def first_train_row_unreadable(e: Env) -> Path:
    from compressor.data.image_folder import split_listings

    root = folder_copy(e)
    first = split_listings(root, 0, 0.1, 0.2)[0]["train"].files[0]  # the row the cache decodes first
    first.write_bytes(b"not an image")
    e.names["first"] = f"{first.parent.name}/{first.name}"
    return root


def all_unreadable(e: Env) -> Path:
    root = folder_copy(e)
    for png in root.rglob("*.png"):
        png.write_bytes(b"not an image")
    return root


def dangling_link(e: Env) -> Path:
    root = folder_copy(e)
    (root / "train" / "4" / "dangling.png").symlink_to(e.tmp / "nowhere.png")
    return root


def big_image(e: Env) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png(e: Env) -> bytes:
    return sorted(e.c.folder.rglob("*.png"))[0].read_bytes()[:40]


def png_named_folder(e: Env) -> Path:
    root = folder_copy(e)
    (root / "train" / "2" / "folder.png").mkdir()
    return root


def extra_test_class(e: Env) -> Path:
    root = folder_copy(e)
    for cls in ("0", "1", "11"):
        shutil.copytree(root / "train" / "0", root / "test" / cls)
    return root


def empty_test_split(e: Env) -> Path:
    root = folder_copy(e)
    for cls in DIGIT_CLASSES:
        (root / "test" / cls).mkdir(parents=True)
    return root


def twelve_classes(e: Env) -> Path:
    root = folder_copy(e, "twelve-classes")
    for cls in ("extra-a", "extra-b"):
        shutil.copytree(root / "train" / "0", root / "train" / cls)
    return root


DATA_CASES = [
    Case("data-missing", lambda e: digits(e, "--data", e.tmp / "nowhere"), ("nowhere",)),
    Case("data-unknown-kind-of-file", lambda e: digits(e, "--data", write(e.tmp / "data.csv", "x,y\n1,2\n")),
         ("data.csv",)),
    Case("data-empty-folder", lambda e: digits(e, "--data", folder(e, "empty-dir")),
         ("empty-dir",)),
    Case("npz-not-a-zip", lambda e: digits(e, "--data", write(e.tmp / "corrupt.npz", garbage())), ("corrupt.npz",)),
    Case("npz-without-x", lambda e: digits(e, "--data", npz(e, "no-x.npz", inputs=e.c.x[:50])), ("no-x.npz",)),
    Case("npz-wrong-shape", lambda e: digits(e, "--data", npz(e, "wide.npz", x=np.zeros((50, 1, 28, 28), np.float32),
                                                               y=np.zeros(50, np.int64))),
         ("[1, 28, 28]", "[1, 8, 8]")),
    Case("npz-x-one-dimensional", lambda e: digits(e, "--data", npz(e, "flat.npz", x=np.zeros(50, np.float32),
                                                                     y=np.zeros(50, np.int64))), ("flat.npz",)),
    Case("npz-labels-below-minus-one", lambda e: digits(e, "--data", digits_npz(e, "neg.npz", y=np.where(
        np.arange(200) == 5, -5, e.c.y[:200]))), ("neg.npz",)),
    Case("npz-labels-wrong-length", lambda e: digits(e, "--data", digits_npz(e, "ylen.npz", y=e.c.y[:199])),
         ("ylen.npz",)),
    Case("npz-nan-values", lambda e: digits(e, "--data", nan_rows(e)), ("nan.npz",)),
    Case("npz-labels-beyond-classes", lambda e: digits(e, "--data", labels_beyond(e)), ("labels12.npz", "class")),
    Case("npz-string-labels", lambda e: digits(e, "--data", digits_npz(e, "strlabels.npz", y=np.array(
        ["cat", "dog"] * 100))), ("strlabels.npz",)),
    Case("npz-object-array", lambda e: digits(e, "--data", digits_npz(e, "object.npz", y=np.array(
        [{"label": 1}] * 200, dtype=object))), ("object.npz",)),
    Case("npz-too-few-rows-to-split", lambda e: digits(e, "--data", digits_npz(e, "tiny.npz", x=e.c.x[:2])),
         ("tiny.npz",)),
    Case("idx-bad-magic", lambda e: digits(e, "--data", idx_folder(e)), ("train-images-idx3-ubyte",)),
    Case("images-without-class-folders", lambda e: images(e, flat_images(e)), ("flat-images", "class")),
    Case("data-names-the-train-folder", lambda e: images(e, folder_copy(e) / "train"), ("class",)),
    Case("image-garbage-stops", lambda e: images(e, with_file(e, "broken.png", garbage(300))), ("broken.png",)),
    Case("image-first-train-row-unreadable", lambda e: images(e, first_train_row_unreadable(e)), ("{first}",)),
    Case("image-all-unreadable-skipped", lambda e: images(e, all_unreadable(e), "--on-bad-image", "skip"),
         ("imgs",)),
    Case("image-truncated-stops", lambda e: images(e, with_file(e, "cut.png", truncated_png(e))), ("cut.png",)),
    Case("image-empty-file-stops", lambda e: images(e, with_file(e, "zero.png", b"")), ("zero.png",)),
    Case("image-dangling-symlink-stops", lambda e: images(e, dangling_link(e), "--on-bad-image", "stop"),
         ("dangling.png",)),
    Case("image-decompression-bomb-stops", lambda e: images(e, with_file(e, "bomb.png", decompression_bomb()),
                                                            "--on-bad-image", "stop"), ("bomb.png",)),
    Case("image-git-lfs-pointer-stops", lambda e: images(e, with_file(e, "pointer.png", LFS_POINTER),
                                                         "--on-bad-image", "stop"), ("pointer.png",)),
    Case("image-folder-named-like-an-image", lambda e: images(e, png_named_folder(e)), ("folder.png",)),
    Case("image-of-another-size", lambda e: images(e, with_file(e, "big.png", big_image(e))), ("big.png", "--resize")),
    Case("image-split-classes-differ", lambda e: images(e, extra_test_class(e)), ("test", "11")),
    Case("image-split-without-images", lambda e: images(e, empty_test_split(e)), ("test",)),
    Case("image-more-classes-than-teachers", lambda e: images(e, twelve_classes(e)), ("twelve-classes",)),
    Case("image-channels-2", lambda e: images(e, folder_copy(e), "--channels", "2"), ("--channels",)),
    Case("image-channels-contradict-teachers", lambda e: images(e, folder_copy(e), "--channels", "3"),
         ("[3, 8, 8]", "[1, 8, 8]")),
    Case("image-resize-0", lambda e: images(e, folder_copy(e), "--resize", "0"), ("--resize",)),
    Case("image-crop-negative", lambda e: images(e, folder_copy(e), "--crop", "-3"), ("--crop",)),
    Case("image-crop-larger-than-images", lambda e: images(e, folder_copy(e), "--crop", "12"), ("crop",)),
]


# ---------------------------------------------------------------------------------------------------------------
# hf: and parquet: image datasets


def hf_variant(e: Env, name: str, rows: dict | None = None, features=None, splits=("train",)) -> Path:
    """The corpus's 60 digit images (or ``rows``) saved as ``hf:`` folder ``name`` with these splits."""
    table = datasets.Dataset.from_dict(rows or hf_image_rows(e.c.x, e.c.y), features=features or hf_image_features())
    datasets.DatasetDict({split: table for split in splits}).save_to_disk(str(e.tmp / name))
    return e.tmp / name


def hf_empty_test(e: Env) -> Path:
    table = datasets.Dataset.from_dict(hf_image_rows(e.c.x, e.c.y), features=hf_image_features())
    empty = table.filter(lambda row: False)  # (a select([]) split is saved in a form load_from_disk cannot read)
    datasets.DatasetDict({"train": table, "test": empty}).save_to_disk(str(e.tmp / "empty-test"))
    return e.tmp / "empty-test"


def hf_string_labels(e: Env) -> Path:
    """Labels as strings, twelve of them for the ten digit classes."""
    rows = hf_image_rows(e.c.x, e.c.y)
    rows = {"image": rows["image"], "animal": [f"animal-{k % 12}" for k in range(60)]}
    features = datasets.Features({"image": datasets.Image(), "animal": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(e.tmp / "string-labels"))
    return e.tmp / "string-labels"


def hf_twelve_classes(e: Env) -> Path:
    rows = hf_image_rows(e.c.x, e.c.y)
    rows["label"][5] = 11
    return hf_variant(e, "hf-12", rows, hf_image_features(datasets.ClassLabel(names=[str(c) for c in range(12)])))


def hf_raw_text(e: Env) -> Path:
    rows = {"text": ["a fine example", "not a fine one"] * 30, "label": [0, 1] * 30}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=TOKEN_CLASSES)})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(e.tmp / "raw-text"))
    return e.tmp / "raw-text"


def parquet_with_moved_images(e: Env, moved: slice = slice(None)) -> Path:
    """Parquet rows that refer to image files by path; then the ``moved`` ones (all: the folder) are gone."""
    pngs = e.tmp / "gone-images"
    pngs.mkdir()
    rows = hf_image_rows(e.c.x, e.c.y)
    paths = []
    for k, image in enumerate(rows["image"]):
        image.save(pngs / f"{k:03d}.png")
        paths.append(str(pngs / f"{k:03d}.png"))
    table = datasets.Dataset.from_dict({**rows, "image": paths}, features=hf_image_features())
    table.to_parquet(str(e.tmp / "moved.parquet"))
    if moved == slice(None):
        pngs.rename(e.tmp / "elsewhere")
    for path in paths[moved]:
        Path(path).unlink(missing_ok=True)
    return e.tmp / "moved.parquet"


def hf(e: Env, where, *extra) -> list:
    return images(e, f"hf:{where}", *extra)


HF_CASES = [
    Case("hf-missing-folder", lambda e: hf(e, e.tmp / "absent-hf"), ("absent-hf",)),
    Case("hf-folder-not-a-dataset", lambda e: hf(e, write(e.tmp / "plain-folder" / "readme.txt", "hi").parent),
         ("plain-folder",)),
    Case("parquet-no-file-matches", lambda e: images(e, f"parquet:{e.tmp / 'none-*.parquet'}"), ("none-*.parquet",)),
    Case("parquet-garbage-file", lambda e: images(e, f"parquet:{write(e.tmp / 'bad.parquet', garbage())}"),
         ("bad.parquet",)),
    Case("hf-input-column-missing", lambda e: hf(e, e.c.hf, "--input-columns", "pixels"), ("pixels",)),
    Case("hf-label-column-missing", lambda e: hf(e, e.c.hf, "--label-column", "digit"), ("digit",)),
    Case("hf-input-column-not-images", lambda e: hf(e, e.c.hf, "--input-columns", "note"), ("note",)),
    Case("hf-two-image-columns", lambda e: hf(e, e.c.hf, "--input-columns", "image,note"), ("--input-columns",)),
    Case("hf-label-column-holds-images", lambda e: hf(e, e.c.hf, "--label-column", "image"), ("--label-column",)),
    Case("hf-float-labels", lambda e: hf(e, hf_variant(e, "float-labels", {**hf_image_rows(e.c.x, e.c.y),
                                                           "label": [0.5] * 60},
                                                       hf_image_features(datasets.Value("float32")))),
         ("float-labels",)),
    Case("hf-no-train-split", lambda e: hf(e, hf_variant(e, "no-train", splits=("test",))), ("no-train",)),
    Case("hf-empty-test-split", lambda e: hf(e, hf_empty_test(e)), ("empty-test",)),
    Case("hf-string-labels", lambda e: hf(e, hf_string_labels(e), "--label-column", "animal"), ("string-labels",)),
    Case("hf-labels-beyond-classes", lambda e: hf(e, hf_twelve_classes(e)), ("hf-12", "class")),
    Case("hf-images-of-another-size", lambda e: hf(e, hf_variant(e, "big-images", hf_image_rows(e.c.x, e.c.y,
                                                                                               size=16))),
         ("[1, 16, 16]", "[1, 8, 8]")),
    Case("hf-raw-text-column", lambda e: text(e, data=hf_raw_text(e)), ("raw-text", "tokeni")),
    Case("parquet-images-moved", lambda e: images(e, f"parquet:{parquet_with_moved_images(e)}"), ("gone-images",)),
    Case("parquet-some-images-moved", lambda e: images(e, f"parquet:{parquet_with_moved_images(e, slice(20, 30))}",
                                                       "--on-bad-image", "stop"), ("gone-images",)),
]


# ---------------------------------------------------------------------------------------------------------------
# pre-tokenised text against the text teachers (vocabulary 32, at most 32 positions, 3 classes)

def tokens(e: Env, name: str, edit: Callable[[dict], None] | None = None, label=None, drop=(),
           ids: str = "int64") -> Path:
    """60 rows like the teachers' training data, changed by ``edit``, saved as ``hf:`` folder ``name``."""
    rows = token_rows(60, seed=5)
    if edit:
        edit(rows)
    features = {"input_ids": datasets.List(datasets.Value(ids)),
                "attention_mask": datasets.List(datasets.Value("int64")),
                "label": label or datasets.ClassLabel(names=TOKEN_CLASSES)}
    for column in drop:
        rows.pop(column), features.pop(column)
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).save_to_disk(str(e.tmp / name))
    return e.tmp / name


def set_row(rows: dict, i: int, ids: list) -> None:
    rows["input_ids"][i], rows["attention_mask"][i] = ids, [1] * len(ids)


def low_ids_but_one(rows: dict) -> None:
    """Every row's ids below 16 but row 41's (31), every row at most 10 long but row 17's (20): what a student
    checked on its first two rows alone lets through."""
    for i, ids in enumerate(rows["input_ids"]):
        set_row(rows, i, [min(t, 15) for t in ids][:10])
    set_row(rows, 41, [1, 31, 31, 5])
    set_row(rows, 17, [1] + [5] * 19)


def hf_student(e: Env, name: str, **overrides) -> list:
    """``--student hf:NAME``, a one-layer BERT config that fits the text teachers' data unless ``overrides`` say."""
    values = {"model_type": "bert", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, **overrides}
    return ["--student", f"hf:{write(e.tmp / name, json.dumps(values))}"]


def float_ids(rows: dict) -> None:
    rows["input_ids"] = [[float(t) + 0.5 for t in ids] for ids in rows["input_ids"]]


TOKEN_CASES = [
    Case("tokens-ids-outside-vocabulary", lambda e: text(e, data=tokens(e, "tokens-vocab", lambda r: set_row(
        r, 9, [1, 40, 3]))), ("tokens-vocab", "vocab")),
    Case("tokens-negative-ids", lambda e: text(e, data=tokens(e, "tokens-negative", lambda r: set_row(
        r, 9, [1, -3, 3]))), ("tokens-negative", "vocab")),
    Case("tokens-rows-longer-than-teachers-take", lambda e: text(e, data=tokens(e, "tokens-long", lambda r: set_row(
        r, 9, [1] + [4] * 39))), ("tokens-long", "32")),
    Case("tokens-mask-of-another-length", lambda e: text(e, data=tokens(
        e, "tokens-ragged", lambda r: r["attention_mask"].__setitem__(4, [1, 1]))), ("attention_mask",)),
    Case("tokens-empty-row", lambda e: text(e, data=tokens(e, "tokens-empty", lambda r: set_row(r, 6, []))),
         ("tokens-empty",)),
    Case("tokens-labels-beyond-classes", lambda e: text(e, data=tokens(
        e, "tokens-labels", lambda r: r["label"].__setitem__(3, 5), label=datasets.Value("int64"))),
         ("tokens-labels", "class")),
    Case("tokens-string-labels", lambda e: text(e, data=tokens(
        e, "tokens-strings", lambda r: r.__setitem__("label", [f"topic-{k % 5}" for k in range(60)]),
        label=datasets.Value("string"))), ("tokens-strings",)),
    Case("tokens-without-attention-mask", lambda e: text(e, data=tokens(e, "tokens-ids-only",
                                                                        drop=("attention_mask",))),
         ("attention_mask",)),
    Case("tokens-unknown-input-column", lambda e: text(e, "--input-columns", "input_ids,nope"), ("nope",)),
    Case("tokens-float-ids", lambda e: text(e, "--input-columns", "input_ids,attention_mask", data=tokens(
        e, "tokens-float", float_ids, ids="float64")), ("input_ids",)),
    Case("tokens-for-image-teachers", lambda e: digits(e, "--data", f"hf:{e.tokens}"), ("token",)),
    Case("images-for-text-teachers", lambda e: text(e, "--data", "digits"), ("input_ids",)),
    Case("tokens-recipe-function-matching", lambda e: text(e, "--recipe", "function-matching"),
         ("function-matching",)),
    Case("tokens-normalise", lambda e: text(e, "--normalise", "0.5/0.5"), ("--normalise",)),
    Case("tokens-seq-len-beyond-teachers", lambda e: text(e, "--seq-len", "100"), ("--seq-len",)),
    Case("images-seq-len", lambda e: digits(e, "--seq-len", "8"), ("--seq-len",)),
]


# ---------------------------------------------------------------------------------------------------------------
# --student and --student-weights


def student_state_names() -> list[str]:
    from compressor.students import create_student

    return list(create_student("mlp:16", (1, 8, 8), 10).state_dict())


def safetensors(e: Env, name: str, tensors: dict) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(e.tmp / name))
    return e.tmp / name


STUDENT_CASES = [
    Case("student-unknown-family", lambda e: digits(e, "--student", "cnnn:8"), ("cnnn",)),
    Case("student-empty-spec", lambda e: digits(e, "--student", ""), ("--student",)),
    Case("student-mlp-zero-width", lambda e: digits(e, "--student", "mlp:0x10"), ("mlp:0x10",)),
    Case("student-cnn-widths-not-numbers", lambda e: digits(e, "--student", "cnn:abc"), ("cnn:abc",)),
    Case("student-from-teacher-scale-2", lambda e: digits(e, "--student", "from-teacher:2"), ("from-teacher:2",)),
    Case("student-timm-unknown-model", lambda e: digits(e, "--student", "timm:resnet9000"), ("resnet9000",)),
    Case("student-torchvision-unknown-model", lambda e: digits(e, "--student", "torchvision:resnet9000"),
         ("resnet9000",)),
    Case("student-from-teacher-for-text", lambda e: text(e, "--student", "from-teacher:0.5"), ("from-teacher",)),
    Case("student-hf-teacher-for-image-teachers", lambda e: digits(e, "--student", "hf:teacher/0.5"),
         ("hf:teacher",)),
    Case("student-cnn-for-text", lambda e: text(e, "--student", "cnn:8x16"), ("cnn:8x16",)),
    Case("student-timm-for-text", lambda e: text(e, "--student", "timm:resnet18"), ("timm:resnet18",)),
    Case("student-hf-teacher-scale-2", lambda e: text(e, "--student", "hf:teacher/2"), ("hf:teacher/2",)),
    Case("student-hf-config-missing", lambda e: text(e, "--student", f"hf:{e.tmp / 'absent.json'}"),
         ("absent.json",)),
    Case("student-hf-folder-without-config", lambda e: text(e, "--student", f"hf:{e.tmp}"), ("config.json",)),
    Case("student-hf-config-not-json", lambda e: text(e, "--student", f"hf:{write(e.tmp / 'broken.json', '{no')}"),
         ("broken.json",)),
    Case("student-hf-config-without-model-type", lambda e: text(e, *hf_student(e, "x.json", model_type=None)),
         ("model_type",)),
    Case("student-hf-config-unknown-model-type", lambda e: text(e, *hf_student(e, "x.json", model_type="bort")),
         ("bort",)),
    Case("student-hf-config-heads-do-not-divide", lambda e: text(e, *hf_student(
        e, "odd-heads.json", hidden_size=30, num_attention_heads=4)), ("odd-heads.json",)),
    Case("student-hf-vocabulary-smaller-than-data", lambda e: text(
        e, *hf_student(e, "small-vocab.json", vocab_size=16), data=tokens(e, "tokens-low", low_ids_but_one)),
         ("small-vocab.json", "vocab")),
    Case("student-hf-positions-fewer-than-data", lambda e: text(
        e, *hf_student(e, "short-positions.json", max_position_embeddings=16),
        data=tokens(e, "tokens-low", low_ids_but_one)), ("short-positions.json", "position")),
    Case("student-hf-config-for-image-teachers", lambda e: digits(e, *hf_student(e, "bert.json")), ("bert.json",)),
    Case("weights-missing", lambda e: digits(e, "--student-weights", e.tmp / "absent.safetensors"),
         ("absent.safetensors",)),
    Case("weights-empty-file", lambda e: digits(e, "--student-weights", write(e.tmp / "empty.safetensors", b"")),
         ("empty.safetensors",)),
    Case("weights-garbage", lambda e: digits(e, "--student-weights", write(e.tmp / "garbage.safetensors", garbage())),
         ("garbage.safetensors",)),
    Case("weights-a-pickle", lambda e: digits(e, "--student-weights", saved(e, "weights.pt", linear().state_dict())),
         ("weights.pt",)),
    Case("weights-a-folder", lambda e: digits(e, "--student-weights", folder(e, "weights-dir")), ("weights-dir",)),
    Case("weights-wrong-shapes", lambda e: digits(e, "--student-weights", safetensors(
        e, "shapes.safetensors", {name: torch.zeros(3, 3, 3) for name in student_state_names()})),
         ("shapes.safetensors",)),
    Case("weights-wrong-names", lambda e: digits(e, "--student-weights", safetensors(
        e, "names.safetensors", {"encoder.layer.0.weight": torch.zeros(4, 4)})), ("names.safetensors",)),
]


# ---------------------------------------------------------------------------------------------------------------
# caches, --resume, --out, and numeric flags


def cache_env_file(e: Env) -> list:
    e.monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(write(e.tmp / "env-cache-file", "x")))
    return digits(e)


def resumed(e: Env, last: bytes | Callable[[Path], None] | None, *extra) -> list:
    """``--resume`` into an --out whose checkpoints/last.pt is the corpus run's (None), ``last`` bytes, or written
    by ``last``; the rest of the command is the corpus run's, changed by ``extra``."""
    command, checkpoint = e.request.getfixturevalue("finished_run")
    path = e.tmp / "resumed" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    if last is None:
        shutil.copy(checkpoint, path)
    elif isinstance(last, bytes):
        path.write_bytes(last)
    else:
        last(path)
    return [*command, "--resume", "--out", e.tmp / "resumed", *extra]


def no_gpu(e: Env, what: str) -> None:
    import onnxruntime

    if torch.cuda.is_available() or (what == "ort" and "CUDAExecutionProvider" in
                                     onnxruntime.get_available_providers()):
        pytest.skip("a GPU is here: this capability is not missing")


CACHE_RESUME_OUT_CASES = [
    Case("teacher-cache-is-a-file", lambda e: digits(e, "--teacher-cache", write(e.tmp / "cache-file", "x")),
         ("cache-file",)),
    Case("teacher-cache-is-a-file-for-images", lambda e: images(e, folder_copy(e), "--teacher-cache",
                                                                write(e.tmp / "cache-file", "x")), ("cache-file",)),
    Case("teacher-cache-under-a-file", lambda e: digits(e, "--teacher-cache", write(e.tmp / "blocker", "x") / "sub"),
         ("blocker",)),
    Case("cache-dir-env-is-a-file", cache_env_file, ("env-cache-file",)),
    Case("no-cache-and-refresh", lambda e: digits(e, "--no-cache", "--refresh-teacher-cache"), ("--no-cache",)),
    Case("no-cache-and-top-k", lambda e: digits(e, "--no-cache", "--cache-top-k", "3"), ("--cache-top-k",)),
    Case("resume-garbage-last-pt", lambda e: resumed(e, garbage()), ("last.pt",)),
    Case("resume-empty-last-pt", lambda e: resumed(e, b""), ("last.pt",)),
    Case("resume-last-pt-not-a-checkpoint", lambda e: resumed(e, lambda p: torch.save({"epoch": 3}, p)),
         ("last.pt",)),
    Case("resume-last-pt-a-pickled-module", lambda e: resumed(e, lambda p: torch.save(linear(), p)), ("last.pt",)),
    Case("resume-last-pt-a-folder", lambda e: resumed(e, lambda p: p.mkdir()), ("last.pt",)),
    Case("resume-settings-changed", lambda e: resumed(e, None, "--lr", "0.01"), ("last.pt", "lr")),
    Case("resume-student-changed", lambda e: resumed(e, None, "--student", "mlp:32"), ("last.pt", "student")),
    Case("out-is-a-file", lambda e: digits(e, "--out", write(e.tmp / "a-file", "x")), ("a-file",)),
    Case("out-under-a-file", lambda e: digits(e, "--out", write(e.tmp / "a-file", "x") / "out"), ("a-file",)),
    Case("precision-the-target-lacks", lambda e: digits(e, "--target", "onnx", "--precision", "int8"),
         ("--precision int8",)),
    Case("torch-tensorrt-without-gpu", lambda e: no_gpu(e, "torch") or digits(e, "--target", "torch-tensorrt"),
         ("torch-tensorrt",), code=2),
    Case("ort-provider-cuda-without-it", lambda e: no_gpu(e, "ort") or digits(e, "--ort-provider", "cuda"),
         ("--ort-provider cuda",), code=2),
]

NUMERIC_CASES = [
    Case(f"flag{flag[1:]}={value}", lambda e, f=flag, v=value, x=extra: digits(e, *x, f, v), needles, code)
    for flag, value, extra, needles, code in [
        ("--temperature", "0", (), ("--temperature",), 1), ("--temperature", "nan", (), ("--temperature",), 1),
        ("--alpha", "1.5", (), ("--alpha",), 1), ("--epochs", "0", (), ("--epochs",), 1),
        ("--batch-size", "0", (), ("--batch-size",), 1), ("--lr", "0", (), ("--lr",), 1),
        ("--lr", "-0.1", (), ("--lr",), 1), ("--tune", "0", (), ("--tune",), 1), ("--seed", "-1", (), ("--seed",), 1),
        ("--max-train", "0", (), ("--max-train",), 1), ("--threads", "0", (), ("--threads",), 1),
        ("--warmup", "-1", (), ("--warmup",), 1), ("--duration", "-1", (), ("--duration",), 1),
        ("--max-accuracy-drop", "-1", (), ("--max-accuracy-drop",), 1),
        ("--student-budget", "0", ("--student", "auto"), ("--student-budget",), 1),
        ("--max-params", "0", ("--student", "auto"), ("--max-params",), 1),
        ("--max-latency-ms", "-1", ("--student", "auto"), ("--max-latency-ms",), 1),
        ("--bias-fix", "lots", ("--omit-classes", "3"), ("--bias-fix",), 1),
        ("--omit-classes", "dragon", (), ("dragon",), 1),
        ("--omit-classes", "0,1,2,3,4,5,6,7,8,9", (), ("0,1,2,3,4,5,6,7,8,9",), 1),
        ("--normalise", "0.1,0.2,0.3/0.2,0.2,0.2", (), ("--normalise",), 1),
        ("--normalise", "0.5/0", (), ("--normalise",), 1),
        ("--rounds", "0", (), ("--rounds",), 2), ("--batch-sizes", "0", (), ("--batch-sizes",), 2),
    ]
]

CASES = TEACHER_CASES + DATA_CASES + HF_CASES + TOKEN_CASES + STUDENT_CASES + CACHE_RESUME_OUT_CASES + NUMERIC_CASES


# ---------------------------------------------------------------------------------------------------------------


def snapshot(path: Path) -> dict | None:
    """What is at ``path``: None, or every file under it with its size and modification time."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


def test_the_corpus_is_large_and_named_once():
    assert len(CASES) >= 65
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_input_is_one_clear_line_before_any_work(case, corpus, tmp_path, monkeypatch, capsys, request):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))  # fresh caches: no state shared between cases
    env = Env(tmp_path, corpus, monkeypatch, request)
    args = [str(a) for a in case.build(env)]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    out = Path(args[max(i for i, arg in enumerate(args) if arg == "--out") + 1])  # the last --out counts
    before = snapshot(out)
    capsys.readouterr()  # what building the inputs printed (datasets' progress bars) is not the CLI's
    code = main(args)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "internal error:" not in output and "Traceback" not in output, output
    # click's usage errors (exit 2) print "Error: ..."; everything else the CLI's own "error: ..."
    errors = [line for line in output.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, output
    assert code == case.code, output
    flat = " ".join(output.split())
    for needle in case.needles:
        assert needle.format(**env.names) in flat, output
    assert not any(line.startswith("teacher cache ") for line in output.splitlines()), f"the teachers ran:\n{output}"
    assert snapshot(out) == before, f"--out {out} changed:\n{output}"


@pytest.mark.parametrize("case_id", ["npz-labels-beyond-classes", "student-unknown-family"])
def test_the_real_command_prints_that_one_line_and_nothing_else(case_id, corpus, tmp_path, monkeypatch, request):
    """In process, pytest's own warning filters hide what a library prints on the way (torch's deprecation notices);
    run as a person does, the whole output of a bad input is the one error line."""
    case = next(case for case in CASES if case.id == case_id)
    args = [str(a) for a in case.build(Env(tmp_path, corpus, monkeypatch, request))] + ["--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COMPRESSOR_CACHE_DIR": str(tmp_path / "cache")})
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == case.code and len(lines) == 1 and lines[0].startswith("error:"), lines
    assert not (tmp_path / "out").exists()
