"""compressor/data/image_folder.py and lazy.py: an image folder read from disk, decoded once into the data cache,
streamed back lazily, preprocessed by the bundle's own function, through the whole main job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.core.preprocessing import ImageSpec, apply_normalisation, load_image
from compressor.data.datasets import Dataset, ReadOptions, Split, load_dataset
from compressor.data.loading import align_classes
from compressor.data.lazy import LazyInputs
from targets.bundle import load_bundle

QUICK = ["--epochs", "2", "--student", "cnn:8x16", "--warmup", "0.01", "--duration", "0.02", "--no-progress"]


def write_folder(root: Path, data, splits=("train", "test"), classes=None) -> Path:
    """The digits as 8 × 8 grayscale PNGs, DIR/<split>/<class>/<n>.png, pixel / 16 scaled to 0..255."""
    classes = classes or [str(c) for c in range(10)]
    sources = {"train": data.train, "test": data.test}
    for split in splits:
        part = sources[split]
        for n, (x, y) in enumerate(zip(part.x, part.y)):
            folder = root / split / classes[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L").save(folder / f"{n:05d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory, digits_data) -> Path:
    return write_folder(tmp_path_factory.mktemp("images") / "digits-png", digits_data)


def test_a_folder_is_decoded_once_into_the_cache_and_read_back_lazily(folder, tmp_path):
    spec = ImageSpec(channels=1)
    data = load_dataset(str(folder), seed=0, read=ReadOptions(spec, tmp_path))
    assert data.class_names == [str(c) for c in range(10)] and data.input_shape == (1, 8, 8)
    assert isinstance(data.train.x, np.memmap) and data.train.x.dtype == np.uint8  # on disk, not in RAM
    assert len(data.test) == len(list((folder / "test").rglob("*.png")))  # the folder's own test split
    assert len(data.train) + len(data.val) == len(list((folder / "train").rglob("*.png")))
    records = list((tmp_path / "images").glob("*/images.json"))
    assert len(records) == 1
    before = records[0].stat().st_mtime_ns
    again = load_dataset(str(folder), seed=0, read=ReadOptions(spec, tmp_path))
    assert records[0].stat().st_mtime_ns == before  # read back, not decoded again
    assert again.fingerprint() == data.fingerprint()
    assert load_dataset(str(folder), seed=1, read=ReadOptions(spec, tmp_path)).fingerprint() != data.fingerprint()
    # a row read from the cache is the file decoded by the bundle's function
    row = np.asarray(data.test.x[0], dtype=np.float32) * data.test.scale
    first = sorted((folder / "test").rglob("*.png"))
    assert any(np.array_equal(row, load_image(f, spec)) for f in first)


def test_lazy_inputs_index_like_the_normalised_tensor():
    raw = np.random.default_rng(0).integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    norm = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]}
    lazy = LazyInputs(raw, norm, 1 / 255)
    dense = torch.from_numpy(apply_normalisation(raw.astype(np.float32) * np.float32(1 / 255), norm))
    assert len(lazy) == 20 and lazy.shape == dense.shape
    rows = torch.tensor([3, 0, 19, 3])
    mask = torch.arange(20) % 3 == 0
    for index in (slice(2, 9), rows, mask, slice(None)):
        torch.testing.assert_close(lazy[index], dense[index])
    torch.testing.assert_close(lazy[5], dense[5])
    torch.testing.assert_close(torch.from_numpy(lazy.numpy()), dense)


def test_the_main_job_on_an_image_folder_bundles_a_predictor_that_reproduces_the_report(folder, digits_ensemble,
                                                                                         tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--teacher", str(digits_ensemble), "--data", str(folder), "--channels", "1", "--out", str(out),
                 *QUICK])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == str(folder) and "Pillow" in report["data"]["preprocessing"]
    student = next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == "onnxruntime")
    bundle = load_bundle(out / "bundle")
    assert bundle.metadata["image"]["channels"] == 1
    files = sorted((folder / "test").rglob("*.png"))
    labels = np.array([int(f.parent.name) for f in files])
    predicted = bundle.predict_images(files).argmax(1)
    assert float((predicted == labels).mean()) == pytest.approx(student["accuracy"]["top1"], abs=1e-9)


def test_bad_folders_stop_with_the_folder_named(digits_data, tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    with pytest.raises(CompressorError, match="holds no images"):
        load_dataset(str(empty), read=ReadOptions(cache_root=tmp_path))
    odd = write_folder(tmp_path / "odd", digits_data)
    os.rename(odd / "test" / "9", odd / "test" / "nine")
    with pytest.raises(CompressorError, match="classes of .*test differ"):
        load_dataset(str(odd), read=ReadOptions(cache_root=tmp_path))


def test_an_unreadable_image_stops_or_is_skipped(digits_data, tmp_path, digits_ensemble, capsys):
    broken = write_folder(tmp_path / "broken", digits_data)
    bad = broken / "train" / "3" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(CompressorError, match="bad.png"):
        load_dataset(str(broken), read=ReadOptions(ImageSpec(1), tmp_path))
    data = load_dataset(str(broken), read=ReadOptions(ImageSpec(1), tmp_path, "skip"))
    assert sum(data.split_info["skipped_images"].values()) == 1
    assert main(["--teacher", str(digits_ensemble), "--data", str(broken), "--out", str(tmp_path / "run"),
                 *QUICK]) == 1
    assert "--on-bad-image skip" in capsys.readouterr().err


def _labelled(names: list[str], labels: list[int]) -> Dataset:
    split = Split(np.zeros((len(labels), 1, 2, 2), np.float32), np.array(labels, dtype=np.int64))
    return Dataset("folder", "DIR", "Pillow", list(names), split, Split(split.x, split.y.copy()),
                   Split(split.x[:1], np.array([-1])))


def test_folder_classes_in_another_order_than_the_teachers_are_renumbered_to_theirs():
    # sorted folder names (ImageFolder's order) against the teachers' own order, "/" saved as "-" on disk
    data = _labelled(["ankle boot", "bag", "t-shirt-top"], [0, 1, 2, 2])
    align_classes(data, ["t-shirt/top", "Bag", "ankle boot"])
    assert data.train.y.tolist() == [2, 1, 0, 0] and data.val.y.tolist() == [2, 1, 0, 0]
    assert data.test.y.tolist() == [-1]  # unlabeled rows stay unlabeled
    assert data.class_names == ["t-shirt/top", "Bag", "ankle boot"] and "renumbered" in data.split_info["class_order"]


def test_folder_classes_named_otherwise_than_the_teachers_keep_their_positions_and_say_so():
    data = _labelled(["n01", "n02"], [0, 1])
    align_classes(data, ["cat", "dog"])
    assert data.train.y.tolist() == [0, 1] and data.class_names == ["n01", "n02"]
    assert "by position" in data.split_info["class_order"]
    same = _labelled(["cat", "dog"], [0, 1])
    align_classes(same, ["cat", "dog"])
    assert same.split_info == {}


def test_a_dangling_symlink_among_the_images_is_named_or_skipped_and_counted(digits_data, tmp_path):
    root = write_folder(tmp_path / "linked", digits_data)
    (root / "train" / "3" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(CompressorError, match=r"linked: 1 image\(s\) cannot be read, the first .*train/3/gone.png"
                                              r".*pass --on-bad-image skip"):
        load_dataset(str(root), read=ReadOptions(ImageSpec(1), tmp_path))
    data = load_dataset(str(root), read=ReadOptions(ImageSpec(1), tmp_path, "skip"))
    assert sum(data.split_info["skipped_images"].values()) == 1
    assert len(data.train) + len(data.val) == len(digits_data.train)  # every real file is kept


def test_a_class_folder_linking_nowhere_is_named_or_kept_empty_so_no_label_moves(digits_data, tmp_path):
    root = write_folder(tmp_path / "classes", digits_data, classes=[f"c{k}" for k in range(10)])
    for split in ("train", "test"):
        (root / split / "c10").symlink_to(tmp_path / "moved-away", target_is_directory=True)
    with pytest.raises(CompressorError, match=r"the class folder .*train/c10 links to .*moved-away, which does not "
                                              r"exist; fix or remove the link, or pass --on-bad-image skip"):
        load_dataset(str(root), read=ReadOptions(ImageSpec(1), tmp_path))
    data = load_dataset(str(root), read=ReadOptions(ImageSpec(1), tmp_path, "skip"))
    names = data.class_names  # "c10" keeps its place (between c1 and c2), so every other label means what it did
    assert names == sorted(f"c{k}" for k in range(11))
    assert data.split_info["skipped_class_folders"] == [str(root / "train" / "c10"), str(root / "test" / "c10")]
    assert sorted(names[y] for y in data.test.y) == sorted(f"c{y}" for y in digits_data.test.y)


def test_images_laid_out_otherwise_are_told_what_the_folder_holds_and_the_layout_expected(digits_data, tmp_path):
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    for n in range(3):
        Image.new("L", (8, 8)).save(flat / "train" / f"{n}.png")
    with pytest.raises(CompressorError, match=r"flat/train holds 3 images directly, without class folders; an image "
                                              r"folder is laid out as .*flat/train/<class>/\*.png"):
        load_dataset(str(flat), read=ReadOptions(cache_root=tmp_path))
    root = write_folder(tmp_path / "split", digits_data)
    with pytest.raises(CompressorError, match=r"split/train names the train split itself .* pass its parent, --data "
                                              r".*split, laid out as .*split/train/<class>/\*.png"):
        load_dataset(str(root / "train"), read=ReadOptions(cache_root=tmp_path))
    (root / "test").rename(tmp_path / "classes-here")
    with pytest.raises(CompressorError, match=r"its class folders \(0, 1, 2, 3, 4\) sit directly in it; move them "
                                              r"into .*classes-here/train/"):
        load_dataset(str(tmp_path / "classes-here"), read=ReadOptions(cache_root=tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressorError, match=r"empty holds nothing; give an image folder laid out as .* or a folder "
                                              r"of MNIST-format IDX files"):
        load_dataset(str(tmp_path / "empty"))
