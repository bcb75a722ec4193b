"""compressor/data/tokens.py: pre-tokenised int64 columns of a Hugging Face dataset as named inputs, checked
against text teachers (names, vocabulary, maximum length) with one-line errors."""

from __future__ import annotations

import pytest
import torch

from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.data.datasets import ReadOptions, load_dataset
from compressor.data.loading import check_seq_len, load_data
from compressor.teachers.formats import load_ensemble
from tests.conftest import token_rows

datasets = pytest.importorskip("datasets")


def test_token_columns_become_named_int64_inputs_with_the_class_names(token_data):
    data = load_dataset(f"hf:{token_data}", seed=0)
    assert data.named_inputs and data.class_names == ["low", "middle", "high"]
    assert data.train.x.names == ["input_ids", "attention_mask"] and data.train.x.dtype == torch.int64
    assert (len(data.train), len(data.val), len(data.test)) == (540, 60, 200)  # the dataset's own test split
    assert data.split_info["max_length"] == 15 and 4 <= data.split_info["median_length"] <= 15
    row = data.train.x[0]
    assert int(row.tensors["attention_mask"].sum()) == int(row.lengths[0]) == row.shape[1]
    assert data.fingerprint() == load_dataset(f"hf:{token_data}", seed=0).fingerprint()


def test_input_columns_name_the_token_columns_and_a_wrong_name_is_one_line(token_data):
    data = load_dataset(f"hf:{token_data}", read=ReadOptions(input_columns="input_ids"))
    assert data.train.x.names == ["input_ids"]
    with pytest.raises(CompressorError, match="no column 'input_idz'"):
        load_dataset(f"hf:{token_data}", read=ReadOptions(input_columns="input_ids,input_idz"))
    with pytest.raises(CompressorError, match="'label' is not a column of integer sequences"):
        load_dataset(f"hf:{token_data}", read=ReadOptions(input_columns="input_ids,label"))


def test_data_is_checked_against_the_teachers_inputs_vocabulary_and_length(token_data, text_ensemble, tmp_path):
    ensemble = load_ensemble(text_ensemble)
    dataset, normalisation = load_data(RunConfig(teacher=text_ensemble, data=f"hf:{token_data}"), ensemble)
    assert normalisation is None and dataset.train.x.names == ensemble.input_names
    with pytest.raises(CompressorError, match="token columns input_ids but the teachers .* take input_ids, "
                                              "attention_mask"):
        load_data(RunConfig(teacher=text_ensemble, data=f"hf:{token_data}", input_columns="input_ids"), ensemble)
    ensemble.metadata["vocab_size"] = 20
    with pytest.raises(CompressorError, match="outside the teachers' vocabulary of 20"):
        load_data(RunConfig(teacher=text_ensemble, data=f"hf:{token_data}"), ensemble)
    ensemble.metadata.update(vocab_size=32, max_length=8)
    with pytest.raises(CompressorError, match="a row of 15 tokens .* take at most 8; truncate"):
        load_data(RunConfig(teacher=text_ensemble, data=f"hf:{token_data}"), ensemble)
    with pytest.raises(CompressorError, match="gives one input tensor but the teachers .* take named inputs"):
        load_data(RunConfig(teacher=text_ensemble, data="digits"), ensemble)


def test_parquet_files_of_token_columns_read_as_the_same_named_inputs(token_data, tmp_path):
    """``parquet:GLOB`` (a Hub dataset's files) reads the same token columns as ``hf:DIR``; its one split is cut."""
    saved = datasets.load_from_disk(str(token_data))["train"]
    saved.to_parquet(str(tmp_path / "train-00000.parquet"))
    data = load_dataset(f"parquet:{tmp_path / '*.parquet'}", seed=0)
    assert data.named_inputs and data.train.x.names == ["input_ids", "attention_mask"]
    assert data.train.x.dtype == torch.int64 and len(data.train) + len(data.val) + len(data.test) == 600
    assert data.split_info["max_length"] == 15


def test_seq_len_must_fit_the_teachers_and_applies_to_text_only(token_data, text_ensemble, digits_ensemble):
    ensemble = load_ensemble(text_ensemble)  # max_length 32: the tiny BERTs' position embeddings
    dataset, _ = load_data(RunConfig(teacher=text_ensemble, data=f"hf:{token_data}"), ensemble)
    check_seq_len(32, dataset, ensemble, text_ensemble)
    with pytest.raises(CompressorError, match="--seq-len 40: give a length from 1 to the teachers' longest input "
                                              r"\(32 tokens"):
        check_seq_len(40, dataset, ensemble, text_ensemble)
    digits, _ = load_data(RunConfig(teacher=digits_ensemble, data="digits"), load_ensemble(digits_ensemble))
    with pytest.raises(CompressorError, match="--seq-len applies to text data"):
        check_seq_len(16, digits, load_ensemble(digits_ensemble), digits_ensemble)


def test_the_main_job_refuses_a_bad_seq_len_before_any_work(text_ensemble, token_data, tmp_path, capsys):
    from compressor.cli import main

    out = tmp_path / "run"
    assert main(["--teacher", str(text_ensemble), "--data", f"hf:{token_data}", "--seq-len", "40", "--out",
                 str(out), "--no-progress"]) != 0
    assert "--seq-len 40" in capsys.readouterr().err and not out.exists()


def test_token_labels_beyond_the_teachers_classes_stop_before_they_run(text_ensemble, tmp_path):
    rows = token_rows(60, seed=2)
    rows["label"] = [k % 5 for k in range(60)]  # 0-4 for teachers of 3 classes
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "attention_mask": datasets.List(datasets.Value("int64")),
                                  "label": datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "five"))
    with pytest.raises(CompressorError, match=r"--data hf:.*five: .* the label\(s\) 3, 4 but the teachers in "
                                              r".*text-ensemble.pt predict 3 classes \(0 to 2\); drop or relabel"):
        load_data(RunConfig(teacher=text_ensemble, data=f"hf:{tmp_path / 'five'}"), load_ensemble(text_ensemble))
