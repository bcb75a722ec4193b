"""compressor/data/hf.py: a Hugging Face dataset on disk (hf:DIR) and Parquet files (parquet:GLOB) with an image
column, decoded once into the data cache like an image folder, through the main job."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.core.preprocessing import ImageSpec
from compressor.data.datasets import ReadOptions, load_dataset

datasets = pytest.importorskip("datasets")
QUICK = ["--epochs", "2", "--student", "cnn:8x16", "--channels", "1", "--warmup", "0.01", "--duration", "0.02",
         "--no-progress"]


def as_hf(split) -> "datasets.Dataset":
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=[str(c) for c in range(10)]),
                                  "note": datasets.Value("string")})
    images = [Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L") for x in split.x]
    return datasets.Dataset.from_dict({"img": images, "digit": split.y.tolist(), "note": ["-"] * len(images)},
                                      features=features)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits_data):
    root = tmp_path_factory.mktemp("hf")
    splits = datasets.DatasetDict({"train": as_hf(digits_data.train), "test": as_hf(digits_data.test)})
    splits.save_to_disk(str(root / "digits"))
    splits["train"].to_parquet(str(root / "train.parquet"))
    return root


def test_a_saved_dataset_reads_its_image_and_label_columns_and_its_own_test_split(saved, digits_data, tmp_path):
    read = ReadOptions(ImageSpec(1), tmp_path, label_column="digit")
    data = load_dataset(f"hf:{saved / 'digits'}", read=read)
    assert data.class_names == [str(c) for c in range(10)] and data.input_shape == (1, 8, 8)
    assert len(data.test) == len(digits_data.test) and len(data.train) + len(data.val) == len(digits_data.train)
    assert data.split_info["input_column"] == "img"  # the first column of Image type
    assert sorted(data.test.y.tolist()) == sorted(digits_data.test.y.tolist())
    assert np.isclose(np.asarray(data.test.x, np.float32).mean() / 255, digits_data.test.x.mean(), atol=2e-3)


def test_parquet_files_carve_validation_and_test_from_train(saved, tmp_path):
    data = load_dataset(f"parquet:{saved / '*.parquet'}", read=ReadOptions(ImageSpec(1), tmp_path,
                                                                            label_column="digit"))
    assert len(data.train) > len(data.test) > len(data.val) > 0


def test_missing_columns_and_folders_are_one_line_errors(saved, tmp_path):
    with pytest.raises(CompressorError, match="no column 'pixels'"):
        load_dataset(f"hf:{saved / 'digits'}", read=ReadOptions(ImageSpec(1), tmp_path, input_columns="pixels"))
    with pytest.raises(CompressorError, match="no column 'label'"):
        load_dataset(f"hf:{saved / 'digits'}", read=ReadOptions(ImageSpec(1), tmp_path, label_column="label"))
    with pytest.raises(CompressorError, match="not an image"):
        load_dataset(f"hf:{saved / 'digits'}", read=ReadOptions(ImageSpec(1), tmp_path, input_columns="note",
                                                                 label_column="digit"))
    with pytest.raises(CompressorError, match="no such folder"):
        load_dataset(f"hf:{tmp_path / 'absent'}")
    with pytest.raises(CompressorError, match="no file matches"):
        load_dataset(f"parquet:{tmp_path / 'none-*.parquet'}")


def test_the_main_job_distils_from_a_saved_dataset(saved, digits_ensemble, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--teacher", str(digits_ensemble), "--data", f"hf:{saved / 'digits'}", "--label-column", "digit",
                 "--out", str(out), *QUICK])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["split"]["label_column"] == "digit"
    ensemble = next(r for r in report["rows"] if r["kind"] == "ensemble")
    assert ensemble["accuracy"]["top1"] > 0.9  # the digits teachers see the images they were trained on
