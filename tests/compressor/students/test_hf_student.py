"""compressor/students/hf.py: transformers students from a local config or the teachers' own, scaled down."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.core.inference import parameter_count
from compressor.data.datasets import load_dataset
from compressor.students import create_student
from compressor.students.hf import HFClassifier, check_fits_data, scaled_config, student_config
from compressor.students.weights import load_student_weights
from compressor.teachers.formats import load_ensemble

transformers = pytest.importorskip("transformers")


def test_hf_teacher_scale_copies_the_teachers_config_smaller(text_ensemble, token_data):
    ensemble = load_ensemble(text_ensemble)
    example = load_dataset(f"hf:{token_data}").train.x[:2]
    config = ensemble.metadata["hf_config"]
    half = create_student("hf:teacher/0.5", (15,), 3, teacher_config=config, example=example)
    assert isinstance(half, HFClassifier) and half.model.config.hidden_size == 16
    assert half.model.config.vocab_size == config["vocab_size"]
    assert parameter_count(half) < ensemble.members[0].parameters
    assert half(**example.tensors).shape == (2, 3)
    assert scaled_config({**config, "num_hidden_layers": 4}, 0.25)["num_hidden_layers"] == 1
    with pytest.raises(CompressorError, match="records no Hugging Face config"):
        create_student("hf:teacher/0.5", (15,), 3, example=example)
    with pytest.raises(CompressorError, match="'2' is not a scale in"):
        create_student("hf:teacher/2", (15,), 3, teacher_config=config, example=example)


def test_hf_dir_or_config_file_and_local_weights(tmp_path, token_data):
    example = load_dataset(f"hf:{token_data}").train.x[:2]
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(tmp_path / "saved")
    from_dir = create_student(f"hf:{tmp_path / 'saved'}", (15,), 3, example=example)
    from_file = create_student(f"hf:{tmp_path / 'saved' / 'config.json'}", (15,), 3, example=example)
    assert from_dir.model.config.num_labels == from_file.model.config.num_labels == 3
    report = load_student_weights(from_dir, tmp_path / "saved" / "model.safetensors")
    assert report["loaded"] > 0  # every encoder tensor; the 2-class head is not the student's 3-class one
    assert torch.equal(from_dir.model.bert.embeddings.word_embeddings.weight,
                       model.bert.embeddings.word_embeddings.weight)
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CompressorError, match="no model_type"):
        create_student(f"hf:{tmp_path / 'bad.json'}", (15,), 3, example=example)
    with pytest.raises(CompressorError, match="no .*missing.json"):
        create_student(f"hf:{tmp_path / 'missing.json'}", (15,), 3, example=example)


def test_an_hf_config_is_held_against_the_datas_ids_and_rows_before_a_model_is_built(text_ensemble):
    teachers = load_ensemble(text_ensemble).metadata["hf_config"]  # vocabulary 32, 32 positions, 2 token types
    assert student_config("mlp:16", 3, teachers) is None  # other families: nothing to compare
    config, file = student_config("hf:teacher/0.5", 3, teachers)
    assert file is None and config.num_labels == 3 and config.hidden_size == 16
    check_fits_data("hf:teacher/0.5", config, file, "--data D", {"input_ids": 31, "token_type_ids": 1}, 32)
    with pytest.raises(CompressorError, match=r"type_vocab_size 2 in the teachers' config does not cover --data D "
                                              r"\(its largest token type id is 2\); set type_vocab_size to at least 3 "
                                              r"in a config of your own \(--student hf:CONFIG.json\)"):
        check_fits_data("hf:teacher/0.5", config, file, "--data D", {"input_ids": 31, "token_type_ids": 2}, 32)
    with pytest.raises(CompressorError, match="max_position_embeddings 32 in the teachers' config is shorter than "
                                              "--data D .rows of up to 40 tokens.; set max_position_embeddings to at "
                                              "least 40"):
        check_fits_data("hf:teacher/0.5", config, file, "--data D", {"input_ids": 31}, 40)
