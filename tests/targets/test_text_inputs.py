"""A model of several named int64 inputs (a text classifier's ``input_ids`` and ``attention_mask``) through every
CPU part of ``targets``: the ONNX export keeps both names and dtypes with dynamic batch and sequence axes, ONNX
Runtime at fp32/fp16/int8 matches PyTorch at other batch sizes and lengths, the harness times arrays by name, and
a bundle's metadata, Triton configs, ``Bundle.predict`` and ``client.py`` carry every input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from targets.benchmark import batches_from_pool, measure_latency
from targets.bundle import load_bundle, write_bundle
from targets.eager import EagerRunner
from targets.onnxruntime import export, load
from targets.parity import check_parity

VOCAB, CLASSES, NAMES = 40, 3, ("input_ids", "attention_mask")


class MaskedBag(nn.Module):
    """Embeddings of the real tokens averaged under the mask, then a linear layer: two int64 inputs, one output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, CLASSES))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()  # (N, L, 1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (N, 16)
        return self.head(pooled)


def tokens(n: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(n, length) int64 ids and mask, every third row padded after half its length."""
    rng = np.random.default_rng(seed)
    mask = np.ones((n, length), np.int64)
    mask[::3, max(1, length // 2):] = 0
    ids = np.where(mask == 1, rng.integers(1, VOCAB, (n, length)), 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def reference(model: nn.Module, feed: dict) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(*(torch.from_numpy(feed[name]) for name in NAMES)).numpy()


@pytest.fixture(scope="module")
def model():
    return MaskedBag().eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """The model exported at each ONNX Runtime precision, from an example of 2 rows of 5 tokens."""
    root = tmp_path_factory.mktemp("named")
    example = {name: torch.from_numpy(a) for name, a in tokens(2, 5).items()}
    return {precision: export(model, example, root / precision, precision,
                              **({"calibration": tokens(64, 12, seed=3)} if precision == "int8" else {}))
            for precision in ("fp32", "fp16", "int8")}


def test_the_export_keeps_every_input_name_and_dtype_with_batch_and_sequence_axes(exports):
    for artifact in exports.values():
        assert [spec.to_dict() for spec in artifact.inputs] == [
            {"name": name, "shape": ["batch", "sequence"], "dtype": "int64"} for name in NAMES]
        assert [spec.to_dict() for spec in artifact.outputs] == [
            {"name": "logits", "shape": ["batch", CLASSES], "dtype": "float32"}]


@pytest.mark.parametrize("precision, gate", [("fp32", "fp32"), ("fp16", "fp16"), ("int8", "fp16")])
@pytest.mark.parametrize("rows, length", [(1, 1), (7, 5), (33, 24)])
def test_each_precision_matches_pytorch_at_other_batch_sizes_and_lengths(model, exports, precision, gate, rows,
                                                                          length):
    feed = tokens(rows, length, seed=rows)
    runner = load(exports[precision], threads=1)
    result = check_parity(reference(model, feed), runner.infer(feed), gate)
    assert result.passed, result.failures


def test_the_runner_names_a_missing_or_wrong_input_in_one_line(exports):
    runner = load(exports["fp32"], threads=1)
    feed = tokens(4, 6)
    with pytest.raises(CompressorError, match=r"takes 2 inputs \(input_ids, attention_mask\); pass a dict"):
        runner.infer(feed["input_ids"])
    with pytest.raises(CompressorError, match="have no attention_mask; unknown mask"):
        runner.infer({"input_ids": feed["input_ids"], "mask": feed["attention_mask"]})
    with pytest.raises(CompressorError, match=r"expected int64 input 'attention_mask' of shape \(batch, sequence\), "
                                              "got float32"):
        runner.infer({**feed, "attention_mask": feed["attention_mask"].astype(np.float32)})
    with pytest.raises(CompressorError, match="different numbers of rows"):
        runner.infer({**feed, "attention_mask": feed["attention_mask"][:2]})


def test_int8_calibration_by_wrong_names_is_refused_before_the_export(model, tmp_path):
    example = {name: torch.from_numpy(a) for name, a in tokens(2, 5).items()}
    with pytest.raises(CompressorError, match="int8 calibration rows .* have no attention_mask"):
        export(model, example, tmp_path / "int8", "int8", calibration={"input_ids": tokens(8, 4)["input_ids"]})
    assert not (tmp_path / "int8").exists()


def test_the_harness_cuts_and_times_arrays_by_name(model, exports):
    pool = tokens(10, 7)
    batches = batches_from_pool(pool, 4)
    assert len(batches) == 2 and all(sorted(b) == sorted(NAMES) and b["input_ids"].shape == (4, 7) for b in batches)
    tiled = batches_from_pool(pool, 25)[0]
    assert tiled["attention_mask"].shape == (25, 7)
    np.testing.assert_array_equal(tiled["input_ids"][10:20], pool["input_ids"])
    for runner in (load(exports["fp32"], threads=1), EagerRunner(model)):
        stats = measure_latency(runner.infer, pool, 4, warmup_s=0.0, duration_s=0.0, min_iterations=3)
        assert stats.iterations == 3 and stats.batch_size == 4
    np.testing.assert_allclose(EagerRunner(model).infer(pool), reference(model, pool), rtol=1e-6)


def text_metadata() -> dict:
    inputs = [{"name": name, "shape": ["sequence"], "dtype": "int64"} for name in NAMES]
    return {"input": inputs[0], "inputs": inputs, "output": {"name": "logits", "shape": [CLASSES], "dtype": "float32"},
            "normalisation": None, "class_names": ["low", "middle", "high"], "precision": "fp32",
            "versions": {"numpy": np.__version__}, "max_length": 24, "serving": {"batch_sizes": [1, 8, 64]}}


@pytest.fixture
def text_bundle(exports, tmp_path) -> Path:
    return write_bundle(exports["fp32"].files["model"], text_metadata(), tmp_path / "bundle")


def test_the_bundles_triton_configs_declare_every_int64_input(text_bundle):
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    for name in ("student", "student_python"):
        text = (text_bundle / "triton" / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
            (input_name, "TYPE_INT64", [-1]) for input_name in NAMES]
        assert config.max_batch_size == 64 and list(config.dynamic_batching.preferred_batch_size) == [8, 64]
        assert "token ids" in text and "apply_normalisation" not in text


def test_bundle_predict_takes_arrays_by_name_and_refuses_what_the_model_cannot_take(model, text_bundle):
    bundle = load_bundle(text_bundle)
    feed = tokens(9, 11)
    np.testing.assert_allclose(bundle.predict(feed), reference(model, feed), rtol=1e-5, atol=1e-6)
    one = {name: a[0] for name, a in feed.items()}
    np.testing.assert_allclose(bundle.predict(one), reference(model, feed)[:1], rtol=1e-5, atol=1e-6)
    with pytest.raises(CompressorError, match="takes input_ids, attention_mask .* got attention_mask, ids"):
        bundle.predict({"ids": feed["input_ids"], "attention_mask": feed["attention_mask"]})
    with pytest.raises(CompressorError, match="longer than the 24 the model was trained on"):
        bundle.predict(tokens(2, 30))
    with pytest.raises(CompressorError, match="expected integer arrays of one shape"):
        bundle.predict({**feed, "attention_mask": feed["attention_mask"].astype(np.float32)})


def test_the_client_sends_every_input_in_its_dtype(text_bundle):
    spec = importlib.util.spec_from_file_location("text_client", text_bundle / "client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    served = client.ServedBundle.__new__(client.ServedBundle)  # no server: only the feed is built here
    served.metadata = json.loads((text_bundle / "metadata.json").read_text())
    served.inputs = served.metadata["inputs"]
    feed = served.feed({name: a.astype(np.int32) for name, a in tokens(3, 4).items()})
    assert list(feed) == list(NAMES) and all(a.dtype == np.int64 for a in feed.values())
    with pytest.raises(ValueError, match="no array for input attention_mask"):
        served.feed({"input_ids": tokens(3, 4)["input_ids"]})
    with pytest.raises(ValueError, match="pass a dict of arrays"):
        served.feed(tokens(3, 4)["input_ids"])


def test_gpu_targets_refuse_what_they_cannot_build_before_asking_for_a_gpu(model, tmp_path):
    from targets import tensorrt, torch_tensorrt

    example = {name: torch.from_numpy(a) for name, a in tokens(2, 5).items()}
    with pytest.raises(CompressorError, match="needs the longest sequence it will take"):
        tensorrt.export(model, example, tmp_path / "trt", "fp32")
    with pytest.raises(CompressorError, match="named int64 inputs go through --target tensorrt"):
        torch_tensorrt.export(model, example, tmp_path / "tt", "fp32")
    assert not any(tmp_path.iterdir())


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_text_engine_spans_batch_and_sequence_and_matches_pytorch(cuda_package, model, tmp_path, precision):
    from targets import tensorrt

    cuda_package("tensorrt")
    example = {name: torch.from_numpy(a) for name, a in tokens(2, 5).items()}
    artifact = tensorrt.export(model, example, tmp_path, precision, batch_sizes=(1, 8), max_sequence=24,
                               opt_sequence=10)
    assert artifact.metadata["sequence_profile"] == {"min": 1, "opt": 10, "max": 24}
    runner = tensorrt.load(artifact)
    for rows, length in ((1, 1), (9, 10), (70, 24)):  # 70 rows: split at the profile's max of 64
        feed = tokens(rows, length, seed=rows)
        assert check_parity(reference(model, feed), runner.infer(feed), precision).passed
    with pytest.raises(CompressorError, match="exceeds the engine's profile"):
        runner.infer(tokens(2, 30))
