"""compressor/data/image_cache.py: the decoded-image cache is checked against its record before any pixel is used
(a damaged entry is decoded again, with one warning line), and ``--on-bad-image`` covers every unreadable file: the
first training row and Pillow's decompression bombs included.

No mocks: real PNG files written with Pillow (the bomb's header with zlib), read through ``load_dataset``, each test
with its own cache folder under ``tmp_path``."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.core.preprocessing import ImageSpec
from compressor.data.datasets import ReadOptions, load_dataset
from compressor.data.image_cache import CACHE_FORMAT, RECORD
from compressor.data.image_folder import split_listings

IMAGES, CLASSES, SIDE = 60, 3, 8
QUICK = ["--epochs", "2", "--student", "cnn:8x16", "--warmup", "0.01", "--duration", "0.02", "--rounds", "1",
         "--batch-sizes", "1", "--no-progress"]


def write_pngs(root: Path) -> Path:
    """60 seeded random 8 × 8 RGB PNGs in 3 class folders, ``root/train/<class>/<n>.png``."""
    rng = np.random.default_rng(0)
    for n in range(IMAGES):
        folder = root / "train" / f"class{n % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8), mode="RGB").save(folder / f"{n:03d}.png")
    return root


def load(root: Path, cache: Path, on_bad_image: str = "stop"):
    return load_dataset(str(root), seed=0, read=ReadOptions(ImageSpec(3), cache, on_bad_image))


def pixels(data) -> dict[str, np.ndarray]:
    return {split: np.array(getattr(data, split).x) for split in ("train", "val", "test")}  # copies, not maps


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def first_train_file(root: Path) -> Path:
    """The image ``load_dataset(seed=0)`` puts on the first training row (the split is a seeded permutation)."""
    return split_listings(root, 0, 0.1, 0.2)[0]["train"].files[0]


def write_bomb(path: Path, width: int, height: int) -> None:
    """A valid 1-bit grayscale PNG of ``width`` × ``height`` pixels, all black: a few kB on disk whatever its size,
    so its pixel count can exceed Pillow's decompression-bomb limit cheaply (rows are compressed as they come)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.fixture()
def folder(tmp_path) -> Path:
    return write_pngs(tmp_path / "images")


# ----------------------------------------------------------------------------------------------------------------
# A damaged entry is decoded again, never used


def _zero_pixels(path: Path) -> None:
    array = np.load(path, mmap_mode="r+")  # the header stays: the file still loads, every pixel black
    array[:] = 0
    array.flush()
    del array


def _record(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def _older_format(record: dict) -> None:
    record["format"] = "compressor.images/1"
    del record["files"]  # as a /1 entry was written: no checksums


DAMAGE = {
    "train-x.npy zeroed": ("train-x.npy", _zero_pixels, "train-x.npy does not match the checksum"),
    "val-x.npy truncated": ("val-x.npy", lambda p: p.write_bytes(p.read_bytes()[:200]), "val-x.npy does not match"),
    "train-good.npy missing": ("train-good.npy", Path.unlink, "train-good.npy is missing"),
    "an older format": (RECORD, lambda p: _record(p, _older_format), "'compressor.images/1', not"),
    "images.json not JSON": (RECORD, lambda p: p.write_text('{"format": '), "images.json is unreadable"),
    "a shape edited": (RECORD, lambda p: _record(p, lambda r: r["files"]["test-x.npy"].update(shape=[1, 3, 8, 8])),
                       "test-x.npy holds"),
    "rows edited": (RECORD, lambda p: _record(p, lambda r: r["rows"].update(train=3)), "train-good.npy marks"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_entry_is_decoded_again_with_one_warning_and_never_used(folder, tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    first = load(folder, cache)
    truth = pixels(first)
    (entry,) = (cache / "images").iterdir()
    record = json.loads((entry / RECORD).read_text())
    assert record["format"] == CACHE_FORMAT and len(record["files"]) == 6  # x and good for each split
    assert capsys.readouterr().err == ""
    name, spoil, why = DAMAGE[damage]
    spoil(entry / name)

    again = load(folder, cache)
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1, warned
    assert str(entry) in warned[0] and why in warned[0] and "decoding the images again" in warned[0]
    for split, array in pixels(again).items():
        assert np.array_equal(array, truth[split]), split  # the true pixels, decoded again
    assert np.array_equal(again.train.y, first.train.y)
    assert again.fingerprint() == first.fingerprint()  # the teacher cache's entry for these images still applies

    before = (entry / RECORD).stat().st_mtime_ns
    load(folder, cache)  # the rewritten entry is whole: read back, no warning
    assert warnings_in(capsys.readouterr().err) == [] and (entry / RECORD).stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_rerun_over_a_zeroed_train_x_warns_once_and_trains_as_the_first_run(folder, tmp_path, digits_ensemble,
                                                                              capsys):
    """The reported case, through the main job: train-x.npy zeroed between two runs. The rerun says so in one
    line, decodes the images again and trains exactly as the first run did (the same history), not on black."""
    cache = tmp_path / "cache"

    def compress(out: Path) -> dict:
        code = main(["--teacher", str(digits_ensemble), "--data", str(folder), "--channels", "1", "--out", str(out),
                     "--teacher-cache", str(cache), *QUICK])
        assert code == 0, capsys.readouterr().err
        return json.loads((out / "report.json").read_text())

    first = compress(tmp_path / "first")
    (entry,) = (cache / "images").iterdir()
    _zero_pixels(entry / "train-x.npy")
    capsys.readouterr()
    second = compress(tmp_path / "second")
    about_cache = [line for line in capsys.readouterr().err.splitlines() if "decoded-image cache" in line]
    assert len(about_cache) == 1 and about_cache[0].startswith("warning:") and "train-x.npy" in about_cache[0]
    assert second["teacher_cache"]["hit"] is True  # the same images, so the teachers' logits still apply
    def trained(report: dict) -> list[tuple]:  # what the pixels decide, without the epochs' timings
        history = report["student"]["training"]["history"]
        return [(epoch["train_loss"], epoch["train_accuracy"], epoch["val_accuracy"]) for epoch in history]

    assert trained(second) == trained(first)
    assert np.load(entry / "train-x.npy").any()


# ----------------------------------------------------------------------------------------------------------------
# --on-bad-image: the first training row, every row, decompression bombs


def test_an_unreadable_first_training_row_stops_naming_it_or_is_skipped(folder, tmp_path):
    first = first_train_file(folder)
    first.write_bytes(b"not a png")
    with pytest.raises(CompressorError) as raised:
        load(folder, tmp_path / "stop")
    message = str(raised.value)
    assert str(first) in message and "--on-bad-image skip" in message and "\n" not in message

    data = load(folder, tmp_path / "skip", "skip")
    assert data.split_info["skipped_images"]["train"] == 1
    assert len(data.train) + len(data.val) + len(data.test) == IMAGES - 1
    assert data.input_shape == (3, SIDE, SIDE)


def test_a_folder_of_which_no_training_image_decodes_is_one_error_naming_a_file(folder, tmp_path):
    for file in (folder / "train").rglob("*.png"):
        file.write_bytes(b"not a png")
    for on_bad_image in ("stop", "skip"):
        with pytest.raises(CompressorError, match="none of the .* training images can be read") as raised:
            load(folder, tmp_path / on_bad_image, on_bad_image)
        assert str(first_train_file(folder)) in str(raised.value) and "\n" not in str(raised.value)


@pytest.fixture()
def bomb_size():
    """Just over twice Pillow's documented Image.MAX_IMAGE_PIXELS (the default, untouched): where it raises
    DecompressionBombError rather than warn."""
    limit = 2 * Image.MAX_IMAGE_PIXELS
    width = 20_000
    return width, limit // width + 1


@pytest.mark.parametrize("row", ["the first training row", "another row"])
def test_a_decompression_bomb_is_skipped_and_counted_or_stops_naming_it(folder, tmp_path, bomb_size, row):
    target = first_train_file(folder) if row == "the first training row" else folder / "train" / "class1" / "001.png"
    write_bomb(target, *bomb_size)
    assert target.stat().st_size < 100_000  # a small file that would decode to 180 million pixels
    with pytest.raises(CompressorError) as raised:
        load(folder, tmp_path / "stop")
    message = str(raised.value)
    assert str(target) in message and "decompression-bomb limit" in message and "\n" not in message

    data = load(folder, tmp_path / "skip", "skip")
    assert sum(data.split_info["skipped_images"].values()) == 1
    assert len(data.train) + len(data.val) + len(data.test) == IMAGES - 1


def test_a_decompression_bomb_stops_the_main_job_in_one_line_before_out(folder, tmp_path, bomb_size, digits_ensemble,
                                                                         capsys):
    target = folder / "train" / "class2" / "002.png"
    write_bomb(target, *bomb_size)
    out = tmp_path / "run"
    code = main(["--teacher", str(digits_ensemble), "--data", str(folder), "--channels", "1", "--out", str(out),
                 "--teacher-cache", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and not out.exists()
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and str(target) in err and "decompression-bomb limit" in err
    assert "internal error" not in err
