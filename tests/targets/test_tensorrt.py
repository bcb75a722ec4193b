"""targets/tensorrt.py: pure helpers and one-line errors on every machine; real engines with ``pytest -m tensorrt``.

The ``tensorrt`` tests build engines from an MLP trained on scikit-learn's digits and hold each to the parity gate of
its precision (DESIGN.md, Parity). Where TensorRT or a CUDA GPU is missing they skip and say which.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError, MissingCapabilityError
from targets.base import Artifact
from targets.parity import check_parity
from targets.tensorrt import batch_slices, check_input, export, load
from targets.tensorrt_build import (BatchProfile, add_profile, attach_timing_cache, choose_profile,
                                     choose_sequence_profile, describe_parser_errors, network_flags)

REPO = Path(__file__).resolve().parents[2]


# ---- on every machine ------------------------------------------------------------------------------------------

def test_importing_the_module_imports_neither_tensorrt_nor_torch():
    code = ("import sys, targets.tensorrt; "
            "loaded = {'tensorrt', 'torch', 'torch_tensorrt'} & set(sys.modules); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("sizes, expected", [
    ((1, 64), (1, 64, 64)),  # the default: tuned for full batches
    ((1, 8, 64, 256), (1, 64, 256)),  # upper median; max is the largest asked for
    ((1, 1, 1, 64), (1, 1, 64)),  # repeats count: the size asked for most
    ((8,), (1, 8, 64)),  # min is always 1 (split batches end in any size); max at least Triton's 64
    ((32, 16), (1, 32, 64)),  # order does not matter
    ((100, 1), (1, 100, 100)),
    ([np.int64(4), 2], (1, 4, 64)),  # numpy integers are whole numbers too
])
def test_profile_from_batch_sizes(sizes, expected):
    assert choose_profile(sizes) == BatchProfile(*expected)


@pytest.mark.parametrize("sizes", [(), (0,), (-1, 4), (2.5,), (True,), "64", None])
def test_bad_batch_sizes_are_refused_by_name(sizes):
    with pytest.raises(CompressorError, match="give one or more whole numbers of at least 1"):
        choose_profile(sizes)


@pytest.mark.parametrize("rows, limit, expected", [
    (0, 64, []),
    (1, 64, [(0, 1)]),
    (64, 64, [(0, 64)]),
    (130, 64, [(0, 64), (64, 128), (128, 130)]),
])
def test_batch_slices_cover_every_row_once(rows, limit, expected):
    assert [(s.start, s.stop) for s in batch_slices(rows, limit)] == expected


def test_network_flags_ask_for_strong_typing_only_where_it_is_not_the_only_mode():
    def fake_trt(version: str):
        return SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=5))

    assert network_flags(fake_trt("11.0.0.14")) == 0  # TensorRT 11: always strongly typed, the flag is ignored
    assert network_flags(fake_trt("10.16.1.11")) == 1 << 5


def test_parser_errors_name_every_node_on_one_line():
    class Error:
        def __init__(self, node, op_type, desc):
            self.node, self.op_type, self.text = node, op_type, desc

        def node_name(self):
            return self.node

        def node_operator(self):
            return self.op_type

        def desc(self):
            return self.text

    errors = [Error("det", "Det", "No importer registered for op: Det.\nAttempting plugin..."),
              Error("", "", "Model has no graph")]
    parser = SimpleNamespace(num_errors=len(errors), get_error=errors.__getitem__)
    assert describe_parser_errors(parser) == ("node 'det' (Det): No importer registered for op: Det. Attempting "
                                              "plugin...; Model has no graph")
    assert describe_parser_errors(SimpleNamespace(num_errors=0)) == "the parser recorded no error"


class FakeBuilderConfig:
    """The slice of trt.IBuilderConfig/Builder that the profile and the timing cache use; records every call."""

    def __init__(self, accepts_cache: bool = True):
        self.accepts_cache = accepts_cache
        self.profiles, self.shapes, self.attached = [], [], []

    def create_optimization_profile(self):
        return SimpleNamespace(set_shape=lambda name, low, opt, high: self.shapes.append((name, low, opt, high)))

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)

    def create_timing_cache(self, data):
        return SimpleNamespace(data=bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False  # a cache from another GPU is refused, never silently used
        self.attached.append(cache.data)
        return self.accepts_cache or not cache.data


def test_the_profile_spans_the_batch_axis_of_every_input():
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="input", shape=(-1, 1, 8, 8)))
    config = FakeBuilderConfig()
    shapes = add_profile(config, config, network, BatchProfile(1, 64, 256), Path("model.onnx"))
    assert config.shapes == [("input", (1, 1, 8, 8), (64, 1, 8, 8), (256, 1, 8, 8))] and len(config.profiles) == 1
    assert shapes == {"input": {"min": [1, 1, 8, 8], "opt": [64, 1, 8, 8], "max": [256, 1, 8, 8]}}


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (-1, 1, -1, 8), ()])
def test_a_graph_without_one_dynamic_batch_axis_is_refused(shape):
    network = SimpleNamespace(num_inputs=1, get_input=lambda i: SimpleNamespace(name="input", shape=shape))
    config = FakeBuilderConfig()
    with pytest.raises(CompressorError, match="needs a dynamic batch axis"):
        add_profile(config, config, network, BatchProfile(1, 64, 64), Path("model.onnx"))


def test_a_text_model_profile_spans_batch_and_sequence_of_every_input():
    inputs = [SimpleNamespace(name=name, shape=(-1, -1)) for name in ("input_ids", "attention_mask")]
    network = SimpleNamespace(num_inputs=2, get_input=lambda i: inputs[i])
    config = FakeBuilderConfig()
    shapes = add_profile(config, config, network, BatchProfile(1, 8, 64), Path("model.onnx"),
                         choose_sequence_profile(64, 20))
    assert config.shapes == [(name, (1, 1), (8, 20), (64, 64)) for name in ("input_ids", "attention_mask")]
    assert shapes["attention_mask"] == {"min": [1, 1], "opt": [8, 20], "max": [64, 64]}
    with pytest.raises(CompressorError, match="dynamic sequence axis, and no longest sequence was given"):
        add_profile(config, config, network, BatchProfile(1, 8, 64), Path("model.onnx"))


def test_timing_cache_is_new_when_absent_and_loaded_when_present(tmp_path):
    path = tmp_path / "timing.cache"
    config = FakeBuilderConfig()
    cache, record = attach_timing_cache(config, path)
    assert cache.data == b"" and record == {"path": str(path), "loaded_bytes": 0}
    path.write_bytes(b"timings")
    cache, record = attach_timing_cache(config, path)
    assert cache.data == b"timings" and record == {"path": str(path), "loaded_bytes": 7}


def test_a_timing_cache_tensorrt_refuses_is_replaced_with_a_note(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"from another GPU")
    config = FakeBuilderConfig(accepts_cache=False)
    cache, record = attach_timing_cache(config, path)
    assert cache.data == b"" and config.attached == [b"from another GPU", b""]
    assert record["loaded_bytes"] == 0 and "another TensorRT or GPU" in record["note"]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 1, 8, 8), np.float64), r"expected float32 input of shape \(batch, 1, 8, 8\), got float64"),
    (np.zeros((4, 1, 8, 9), np.float32), r"expected input of shape \(batch, 1, 8, 8\), got \(4, 1, 8, 9\)"),
    (np.zeros((1, 8, 8), np.float32), r"expected input of shape \(batch, 1, 8, 8\), got \(1, 8, 8\)"),
    ([[0.0] * 64], r"expected a numpy array of shape \(batch, 1, 8, 8\), got list"),
])
def test_input_checks_say_what_was_expected(bad, message):
    with pytest.raises(CompressorError, match=message):
        check_input(bad, Path("model.plan"), ("batch", 1, 8, 8), np.dtype(np.float32))
    check_input(np.zeros((3, 1, 8, 8), np.float32), Path("model.plan"), ("batch", 1, 8, 8), np.dtype(np.float32))


@pytest.fixture
def gpu_without_tensorrt(monkeypatch):
    """A CUDA machine without the package: ``import tensorrt`` fails and find_spec finds nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_export_without_a_gpu_stops_in_one_line_before_writing(assert_one_clear_line, no_gpu,
                                                               make_mlp, make_inputs, tmp_path):
    with pytest.raises(MissingCapabilityError) as caught:
        export(make_mlp(), torch.from_numpy(make_inputs(2)), tmp_path / "out", "fp32")
    assert_one_clear_line(caught.value, "--target tensorrt needs an NVIDIA GPU", "lacks a CUDA GPU",
                          "pip install -e '.[gpu]'", "docker build", "--target onnxruntime")
    assert not (tmp_path / "out").exists()


def test_load_without_a_gpu_stops_in_one_line(assert_one_clear_line, no_gpu, tmp_path):
    artifact = Artifact("tensorrt", "fp32", {"model": tmp_path / "model.plan"}, [], [])
    with pytest.raises(MissingCapabilityError) as caught:
        load(artifact)
    assert_one_clear_line(caught.value, "lacks a CUDA GPU", "--target onnxruntime")


def test_a_gpu_without_the_package_names_the_package(assert_one_clear_line, gpu_without_tensorrt,
                                                     make_mlp, make_inputs, tmp_path):
    with pytest.raises(MissingCapabilityError) as caught:
        export(make_mlp(), torch.from_numpy(make_inputs(2)), tmp_path / "out", "fp16")
    assert_one_clear_line(caught.value, "lacks the tensorrt package;", "pip install -e '.[gpu]'")
    assert "CUDA GPU (" not in str(caught.value)
    with pytest.raises(MissingCapabilityError, match="lacks the tensorrt package"):
        load(Artifact("tensorrt", "fp32", {"model": tmp_path / "model.plan"}, [], []))


def test_bad_requests_are_refused_before_the_gpu_is_asked_for(no_gpu, make_mlp, make_inputs, tmp_path):
    example = torch.from_numpy(make_inputs(2))
    with pytest.raises(CompressorError, match="builds fp32, fp16, int8") as caught:
        export(make_mlp(), example, tmp_path, "int4")
    assert not isinstance(caught.value, MissingCapabilityError)
    with pytest.raises(CompressorError, match="int8 needs calibration rows") as caught:
        export(make_mlp(), example, tmp_path, "int8")
    assert not isinstance(caught.value, MissingCapabilityError)
    with pytest.raises(CompressorError, match=r"have shape \(5, 64\), but the model takes \(M, 1, 8, 8\)"):
        export(make_mlp(), example, tmp_path, "int8", calibration=np.zeros((5, 64), np.float32))
    with pytest.raises(CompressorError, match="batch sizes"):
        export(make_mlp(), example, tmp_path, "fp32", batch_sizes=(0,))
    with pytest.raises(CompressorError, match="--threads 0"):
        load(Artifact("tensorrt", "fp32", {"model": tmp_path / "model.plan"}, [], []), threads=0)


# ---- with TensorRT and a CUDA GPU (pytest -m tensorrt) -------------------------------------------------------------

@pytest.fixture(scope="module")
def tensorrt_gpu(cuda_package):
    return cuda_package("tensorrt")


@pytest.fixture(scope="module")
def digits_student(tensorrt_gpu, digits_mlp) -> nn.Module:
    """The conftest's trained digits MLP, once this machine has what the tests below need."""
    return digits_mlp


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_passes_the_parity_gate_of_its_precision(tensorrt_gpu, digits_student, digits_data, tmp_path,
                                                        precision, run_torch):
    x, y = digits_data.test.x, digits_data.test.y  # (360, 1, 8, 8): more rows than the profile's max
    calibration = {"calibration": digits_data.train.x[:512]} if precision == "int8" else {}
    artifact = export(digits_student, torch.from_numpy(x[:2]), tmp_path / "export", precision, **calibration)

    assert artifact.files["model"] == tmp_path / "export" / "model.plan" and artifact.files["model"].is_file()
    assert (tmp_path / "export" / "timing.cache").is_file()  # the default cache sits beside the plan
    meta = artifact.metadata
    assert meta["tensorrt"] == tensorrt_gpu.__version__ and meta["gpu"] == torch.cuda.get_device_name()
    assert meta["profile"] == {"min": 1, "opt": 64, "max": 64} and meta["build_seconds"] > 0
    assert meta["preflight"].startswith("model.onnx will build with TensorRT 11")
    assert [spec.dtype for spec in artifact.inputs + artifact.outputs] == ["float32", "float32"]

    runner = load(artifact)
    assert runner.info["device"] == "cuda" and runner.info["profile"] == meta["profile"]
    reference = run_torch(digits_student, x)
    result = check_parity(reference, runner.infer(x), precision, labels=y)
    assert result.passed, result.failures

    if precision != "fp32":  # the fp32 engine kept beside it is what the pipeline times for comparison
        fp32 = load(Artifact("tensorrt", "fp32", {"model": artifact.files["fp32_model"]}, artifact.inputs,
                             artifact.outputs))
        assert check_parity(reference, fp32.infer(x), "fp32").passed


@pytest.mark.tensorrt
def test_a_shared_timing_cache_is_loaded_by_the_next_build(tensorrt_gpu, digits_student, digits_data, tmp_path):
    cache = tmp_path / "shared" / "timing.cache"
    example = torch.from_numpy(digits_data.test.x[:2])
    first = export(digits_student, example, tmp_path / "a", "fp32", timing_cache=cache)
    saved = cache.stat().st_size
    assert first.metadata["timing_cache"] == {"path": str(cache), "loaded_bytes": 0, "saved_bytes": saved}
    assert saved > 0 and not (tmp_path / "a" / "timing.cache").exists()

    second = export(digits_student, example, tmp_path / "b", "fp32", timing_cache=cache)
    record = second.metadata["timing_cache"]
    assert record["loaded_bytes"] == saved and "note" not in record and record["saved_bytes"] >= saved
    x = digits_data.test.x
    assert check_parity(load(first).infer(x), load(second).infer(x), "fp32").passed


@pytest.mark.tensorrt
def test_batches_above_the_profile_max_are_split(tensorrt_gpu, digits_student, digits_data, tmp_path, run_torch):
    x = digits_data.test.x[:200]  # pieces of 64, 64, 64 and 8
    artifact = export(digits_student, torch.from_numpy(x[:2]), tmp_path, "fp32", batch_sizes=(1, 4, 8))
    runner = load(artifact)
    assert runner.profile == BatchProfile(1, 4, 64)
    logits = runner.infer(x)
    assert logits.shape == (200, 10) and logits.dtype == np.float32
    assert check_parity(run_torch(digits_student, x), logits, "fp32").passed
    np.testing.assert_array_equal(logits[:64], runner.infer(x[:64]))  # the same engine call on the same rows
    assert runner.infer(x[:0]).shape == (0, 10)
