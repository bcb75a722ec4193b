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


def test_string_labels_become_the_sorted_distinct_strings_as_class_encode_column_makes_them(digits_data, tmp_path):
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    images = [Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L") for x in digits_data.train.x]
    rows = {"image": images, "label": [names[y] for y in digits_data.train.y]}
    rows["label"][0] = None  # a missing label: an unlabeled row
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "named"))
    data = load_dataset(f"hf:{tmp_path / 'named'}", read=ReadOptions(ImageSpec(1), tmp_path))
    assert data.class_names == sorted(names)
    encoded = datasets.load_from_disk(str(tmp_path / "named")).class_encode_column("label")
    assert encoded.features["label"].names == data.class_names  # the classes the fix in the docs would make
    labels = np.concatenate([data.train.y, data.val.y, data.test.y])
    assert (labels == -1).sum() == 1 and sorted(labels[labels >= 0]) == sorted(
        data.class_names.index(names[y]) for y in digits_data.train.y[1:])


def test_fractional_labels_stop_with_the_column_named(tmp_path):
    images = [Image.new("L", (8, 8))] * 20
    datasets.Dataset.from_dict({"image": images, "label": [0.5] * 20}).save_to_disk(str(tmp_path / "halves"))
    with pytest.raises(CompressorError, match=r"halves: the label column 'label' holds fractional values \(e.g. "
                                              r"0.5\); labels are class indices"):
        load_dataset(f"hf:{tmp_path / 'halves'}", read=ReadOptions(ImageSpec(1), tmp_path))


def test_parquet_rows_whose_image_files_moved_are_named_or_skipped_and_counted(digits_data, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    paths = []
    for n, x in enumerate(digits_data.train.x[:60]):
        paths.append(str(files / f"{n}.png"))
        Image.fromarray(np.round(x[0] * 255).astype(np.uint8), mode="L").save(paths[-1])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    table = datasets.Dataset.from_dict({"image": [{"path": p, "bytes": None} for p in paths],
                                       "label": digits_data.train.y[:60].tolist()}, features=features)
    table.to_parquet(str(tmp_path / "train.parquet"))
    (files / "7.png").rename(tmp_path / "7.png")  # moved after the Parquet file was written
    spec = f"parquet:{tmp_path / '*.parquet'}"
    with pytest.raises(CompressorError, match=r"1 image\(s\) cannot be read, the first .*\[train\]\[7\]: the image "
                                              r"file .*files/7.png named in column 'image' does not exist .* pass "
                                              r"--on-bad-image skip"):
        load_dataset(spec, read=ReadOptions(ImageSpec(1), tmp_path))
    data = load_dataset(spec, read=ReadOptions(ImageSpec(1), tmp_path, "skip"))
    assert sum(data.split_info["skipped_images"].values()) == 1
    assert len(data.train) + len(data.val) + len(data.test) == 59


def test_a_raw_text_column_is_told_to_be_tokenized_with_the_lines_that_do_it(tmp_path):
    rows = {"text": ["a good film", "a bad film"] * 10, "label": [1, 0] * 10}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "reviews"))
    with pytest.raises(CompressorError, match=r"reviews: column 'text' holds raw text; tokenize it first with the "
                                              r"teachers' tokenizer: tok = AutoTokenizer.from_pretrained\(.*\); "
                                              r"ds.map\(lambda b: tok\(b\['text'\], truncation=True\), batched=True\)"
                                              r".save_to_disk\(.*reviews-tokenized.*\), then pass --data hf:"):
        load_dataset(f"hf:{tmp_path / 'reviews'}")
    with pytest.raises(CompressorError, match="column 'text' holds raw text"):  # named as the input, the same
        load_dataset(f"hf:{tmp_path / 'reviews'}", read=ReadOptions(input_columns="text"))
