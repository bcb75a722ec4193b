"""compressor/data/loading.py: every kind of data checked against the teachers before they run (labels beyond
their classes, negative labels), and an image source's channels chosen from the evidence (the teachers' recorded
shape, the images' own modes, a probe of the teachers), with the reason in the report."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.cli import main
from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.data.loading import load_data
from compressor.teachers.formats import load_ensemble
from tests.conftest import digits_members, fit

QUICK = ["--epochs", "1", "--student", "cnn:8x16", "--warmup", "0.01", "--duration", "0.02", "--no-progress"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, digits_data) -> Path:
    """The digits MLP and CNN as TorchScript files behind an ``ensemble.toml`` that records no input shape and no
    class count: only running a member tells which input (1, 8, 8) and how many classes (10) they take."""
    folder = tmp_path_factory.mktemp("manifest")
    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    for k, member in enumerate(digits_members()):
        torch.jit.save(torch.jit.trace(fit(member, x, y, epochs=8, seed=k), x[:2]), folder / f"m{k}.pt")
    (folder / "ensemble.toml").write_text('[[members]]\npath = "m0.pt"\n[[members]]\npath = "m1.pt"\n')
    return folder / "ensemble.toml"


def write_digits(root: Path, data, mode: str = "L", classes=None) -> Path:
    """The digits as 8 × 8 PNGs in ``mode``, ROOT/<split>/<class>/<n>.png (train and test)."""
    classes = classes or [str(c) for c in range(10)]
    for split, part in (("train", data.train), ("test", data.test)):
        for n, (x, y) in enumerate(zip(part.x, part.y)):
            folder = root / split / classes[int(y)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L").convert(mode).save(folder / f"{n}.png")
    return root


def loaded(teacher: Path, data: str, tmp_path: Path, probe: bool = True, **options):
    ensemble = load_ensemble(teacher)
    config = RunConfig(teacher=teacher, data=data, teacher_cache=tmp_path / "cache", **options)
    return load_data(config, ensemble, probe=ensemble.probe if probe else None)


def test_npz_labels_beyond_the_teachers_classes_stop_before_they_run(manifest, digits_ensemble, tmp_path):
    x = np.random.default_rng(0).random((200, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "twelve.npz", x=x, y=np.arange(200) % 12)
    # the manifest records no class count: the probe (one member on zeros) tells it before the teacher pass
    with pytest.raises(CompressorError, match=r"twelve.npz: \d+ row\(s\) of the train split have the label\(s\) 10, 11 "
                                              r"but the teachers in .*ensemble.toml predict 10 classes \(0 to 9\); "
                                              r"drop or relabel those rows"):
        loaded(manifest, str(tmp_path / "twelve.npz"), tmp_path)
    with pytest.raises(CompressorError, match="twelve.npz: .* predict 10 classes"):  # an archive records it
        loaded(digits_ensemble, str(tmp_path / "twelve.npz"), tmp_path, probe=False)


def test_negative_labels_other_than_minus_one_stop_with_the_file_named(digits_ensemble, tmp_path):
    x = np.zeros((100, 1, 8, 8), np.float32)
    np.savez(tmp_path / "negative.npz", x=x, y=np.where(np.arange(100) % 5 == 0, -3, 1))
    with pytest.raises(CompressorError, match=r"negative.npz: .* negative label\(s\) -3; labels are class indices "
                                              r"from 0, with -1 for an unlabeled row: fix them in .*negative.npz"):
        loaded(digits_ensemble, str(tmp_path / "negative.npz"), tmp_path)
    np.savez(tmp_path / "unlabeled.npz", x=x, y=np.full(100, -1))  # -1 is unlabeled, not bad
    assert not loaded(digits_ensemble, str(tmp_path / "unlabeled.npz"), tmp_path)[0].labelled


def test_npz_string_labels_say_how_to_save_them(digits_ensemble, tmp_path):
    np.savez(tmp_path / "names.npz", x=np.zeros((50, 1, 8, 8), np.float32), y=np.array(["cat", "dog"] * 25))
    with pytest.raises(CompressorError, match=r"names.npz: y holds <U3 values, not class indices; save y as "
                                              r"integers .* np.unique\(names, return_inverse=True\)"):
        loaded(digits_ensemble, str(tmp_path / "names.npz"), tmp_path)


def test_idx_labels_beyond_the_teachers_classes(manifest, tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 8, 8))), ("labels-idx1", np.arange(n) % 11)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    with pytest.raises(CompressorError, match=r"--data .*idx: .* the label\(s\) 10 \(the classes '10'\) but the "
                                              r"teachers .* predict 10 classes"):
        loaded(manifest, str(folder), tmp_path)


def test_an_image_folder_with_more_classes_than_the_teachers(manifest, digits_data, tmp_path):
    root = write_digits(tmp_path / "eleven", digits_data, classes=[f"c{k:02d}" for k in range(1, 11)])
    (root / "train" / "c00").mkdir()  # an eleventh class folder, sorted first: every digit's label moves up one
    Image.new("L", (8, 8)).save(root / "train" / "c00" / "blank.png")
    (root / "test" / "c00").mkdir()
    with pytest.raises(CompressorError, match=r"eleven: .* the label\(s\) 10 \(the classes 'c10'\) but the "
                                              r"teachers .* predict 10 classes .* pass the data the teachers were "
                                              r"trained on"):
        loaded(manifest, str(root), tmp_path)


def test_hf_image_labels_beyond_the_teachers_classes(manifest, digits_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L") for x in digits_data.test.x]
    labels = [int(y) + 2 for y in digits_data.test.y]  # 0-9 shifted to 2-11: two beyond the teachers' 10
    datasets.Dataset.from_dict({"image": images, "label": labels}).save_to_disk(str(tmp_path / "shifted"))
    with pytest.raises(CompressorError, match=r"--data hf:.*shifted: .* the label\(s\) 10, 11 but the teachers in "
                                              r".*ensemble.toml predict 10 classes"):
        loaded(manifest, f"hf:{tmp_path / 'shifted'}", tmp_path)


def test_channels_come_from_the_images_modes_and_a_probe_of_the_teachers(manifest, digits_data, tmp_path):
    gray = write_digits(tmp_path / "gray", digits_data)
    dataset, _ = loaded(manifest, str(gray), tmp_path)
    assert dataset.input_shape == (1, 8, 8)
    assert dataset.split_info["channels"].startswith("1: every one of the 1000 image headers read is grayscale "
                                                      "(L 1000), and the teachers run on [1, 8, 8]")
    without_probe, _ = loaded(manifest, str(gray), tmp_path, probe=False)
    assert without_probe.split_info["channels"] == "1: every one of the 1000 image headers read is grayscale (L 1000)"
    # colour files for teachers that take one channel: the images prefer 3, the probe settles on 1
    colour = write_digits(tmp_path / "colour", digits_data, mode="RGB")
    dataset, _ = loaded(manifest, str(colour), tmp_path)
    assert dataset.input_shape == (1, 8, 8)
    assert dataset.split_info["channels"] == ("1: the image headers read show colour (RGB 1000), but the teachers "
                                              "run on [1, 8, 8] only")
    forced, _ = loaded(manifest, str(gray), tmp_path, channels=3)
    assert forced.split_info["channels"] == "3: --channels 3" and forced.input_shape == (3, 8, 8)


def test_the_teachers_recorded_input_shape_decides_the_channels(digits_ensemble, digits_data, tmp_path):
    colour = write_digits(tmp_path / "colour", digits_data, mode="RGB")
    dataset, _ = loaded(digits_ensemble, str(colour), tmp_path)
    assert dataset.split_info["channels"] == "1: the teachers' recorded input shape [1, 8, 8]"


def test_grayscale_pngs_with_a_manifest_of_torchscript_members_distil_end_to_end(manifest, digits_data, tmp_path,
                                                                                  capsys):
    """A manifest records no channels; the PNGs are mode L and the members take (1, 8, 8): the run takes 1 channel
    (it used to decode RGB and stop with "teacher member failed on inputs of shape [3, 8, 8]")."""
    folder = write_digits(tmp_path / "digits-png", digits_data)
    out = tmp_path / "run"
    code = main(["--teacher", str(manifest), "--data", str(folder), "--out", str(out), *QUICK])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["input_shape"] == [1, 8, 8] and "grayscale" in report["data"]["preprocessing"]
    assert report["data"]["split"]["channels"].startswith("1: every one of the 1000 image headers read is grayscale")
    assert json.loads((out / "bundle" / "metadata.json").read_text())["image"]["channels"] == 1


def test_inspect_reads_a_grayscale_folder_for_a_manifest_as_the_main_job_does(manifest, digits_data, tmp_path,
                                                                             monkeypatch, capsys):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_digits(tmp_path / "digits-png", digits_data)
    assert main(["inspect", str(manifest), "--data", str(folder)]) == 0, capsys.readouterr().err
    assert "accuracy on the test split" in capsys.readouterr().out
