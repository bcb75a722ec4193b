"""The main job's steps on their own: choose a student, distil it, export it, benchmark the rows; each the
pipeline's own function behind the same checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compressor
from compressor.core.errors import CompressorError, LabelError, MissingCapabilityError, OptionError
from tests.compressor.test_api import Rows, digits_splits

FAST = dict(batch_sizes=(1,), warmup=0.01, duration=0.02, rounds=1)


def test_choose_then_distill_then_export_then_benchmark(digits_nets, digits_data, tmp_path):
    data = digits_splits(digits_data)
    choice = compressor.choose_student(digits_nets, data, student="mlp", epochs=12, out=tmp_path / "run")
    assert choice.spec.startswith("mlp:") and choice.epochs == 12 and choice.selection["requested"] == "mlp"
    epochs = []
    distilled = compressor.distill(digits_nets, data, student=choice, out=tmp_path / "run", on_epoch=epochs.append)
    assert len(distilled.history) == 12 == len(epochs) and distilled.choice.spec == choice.spec
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
    x, y = digits_data.test.x, digits_data.test.y
    exported = compressor.export(distilled.student, example=x[:64], out=tmp_path / "export")
    assert exported.parity.passed and exported.artifact.files["model"].is_file()
    rows = compressor.benchmark({"student": distilled.student, "onnxruntime": exported}, x, labels=y, **FAST)
    assert [r["backend"] for r in rows] == ["PyTorch eager", "onnxruntime"]
    assert rows[0]["accuracy"]["top1"] == pytest.approx(rows[1]["accuracy"]["top1"], abs=1e-9)
    assert rows[0]["accuracy"]["top1"] > 0.5 and rows[1]["latency"]["1"]["median_ms"] > 0


def test_auto_is_screened_within_the_trials_given(digits_nets, digits_data, tmp_path):
    choice = compressor.choose_student(digits_nets, digits_splits(digits_data), screen_trials=2, epochs=2,
                                       budget=1, out=tmp_path / "run")
    screened = {t["spec"] for t in choice.selection["screen"]["trials"]}
    assert choice.spec in screened and len(screened) <= 2
    assert (tmp_path / "run" / "selection.json").is_file()


def test_the_steps_check_as_the_job_does(digits_nets, digits_data, tmp_path):
    d = digits_data
    y = d.train.y.copy()
    y[0] = 10
    with pytest.raises(LabelError, match="label"):
        compressor.distill(digits_nets, compressor.Data(train=Rows(d.train.x, y)), student="mlp:16",
                           out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(OptionError, match="example="):
        compressor.export(student)
    with pytest.raises(MissingCapabilityError):
        compressor.export(student, target="tensorrt", example=d.test.x[:8])
    with pytest.raises(CompressorError, match="row 'x' is a str"):
        compressor.benchmark({"x": "model.onnx"}, d.test.x[:8])
    assert isinstance(np.asarray(d.test.x), np.ndarray)


class TokenSum(torch.nn.Module):
    """A classifier of two named int64 inputs: the masked mean of the ids' embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(32, 8), torch.nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()  # (N, L, 1)
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


def test_a_model_of_named_inputs_is_exported_and_benchmarked(tmp_path):
    ids = torch.randint(1, 32, (40, 12))
    mask = (torch.arange(12) < torch.randint(3, 13, (40, 1))).long()
    feed = {"input_ids": ids, "attention_mask": mask}
    model = TokenSum().eval()
    exported = compressor.export(model, example=feed, out=tmp_path / "export")
    assert [spec.name for spec in exported.artifact.inputs] == ["input_ids", "attention_mask"]
    rows = compressor.benchmark({"eager": model, "onnxruntime": exported}, {k: v.numpy() for k, v in feed.items()},
                                **FAST)
    assert rows[1]["accuracy"]["agreement"] == 1.0 and rows[1]["latency"]["1"]["median_ms"] > 0
