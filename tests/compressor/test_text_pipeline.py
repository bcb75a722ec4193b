"""The main job on a text ensemble (three tiny BERTs of two named int64 inputs, from a local config): the student
is an ``hf:`` copy of the teachers' config, its export and the bundle carry both inputs with batch and sequence
axes, and what the bundle predicts is what the report scored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor.data.datasets import load_dataset
from targets.bundle import load_bundle

NAMES = ["input_ids", "attention_mask"]


@pytest.fixture(scope="module")
def report(text_run):
    return json.loads((text_run / "report.json").read_text())


def student_row(report, backend="onnxruntime"):
    return next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == backend)


def test_the_student_is_exported_with_both_int64_inputs_and_passes_parity(report):
    assert report["student"]["spec"] == "hf:teacher/0.5"
    assert report["parity"]["passed"]
    inputs = report["export"]["inputs"]
    assert [(i["name"], i["shape"], i["dtype"]) for i in inputs] == [(n, ["batch", "sequence"], "int64") for n in NAMES]
    assert report["benchmark"]["sequence_length"] >= 2
    assert {r["kind"] for r in report["rows"]} >= {"ensemble", "member", "student"}
    # the traced teachers too (TorchScript through the ONNX exporter), with both inputs: a like-for-like row
    assert report["ensemble_export"]["exported"] and report["ensemble_export"]["parity"]["passed"]
    assert [i["name"] for i in report["ensemble_export"]["artifact"]["inputs"]] == NAMES
    assert any(r["kind"] == "ensemble" and r["backend"] == "onnxruntime" for r in report["rows"])


def test_the_bundle_declares_every_input_and_predicts_what_the_report_scored(text_run, report, token_data):
    metadata = json.loads((text_run / "bundle" / "metadata.json").read_text())
    assert [(i["name"], i["shape"], i["dtype"]) for i in metadata["inputs"]] == [(n, ["sequence"], "int64")
                                                                                   for n in NAMES]
    assert metadata["max_length"] == 32 and metadata["vocab_size"] == 32 and metadata["class_names"]
    for model in ("student", "student_python"):
        config = (text_run / "bundle" / "triton" / model / "config.pbtxt").read_text()
        assert all(f'name: "{n}"\n    data_type: TYPE_INT64\n    dims: [ -1 ]' in config for n in NAMES)
    test = load_dataset(f"hf:{token_data}", seed=0).test
    logits = load_bundle(text_run / "bundle").predict(test.x.numpy())
    assert float((logits.argmax(1) == test.y).mean()) == pytest.approx(student_row(report)["accuracy"]["top1"],
                                                                        abs=1e-9)


def test_the_saved_student_takes_the_inputs_positionally_at_any_length(text_run, token_data):
    student = torch.jit.load(str(text_run / "student.pt"))
    test = load_dataset(f"hf:{token_data}", seed=0).test.x
    short, padded = test[:5], test[:5].at_length(20)
    with torch.no_grad():
        np.testing.assert_allclose(student(*short.values()).numpy(), student(*padded.values()).numpy(), atol=1e-5)
