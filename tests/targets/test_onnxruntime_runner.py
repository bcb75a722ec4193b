"""targets/onnxruntime.py: the session, what it records, and the input checks in front of it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from compressor.core.errors import CompressorError, MissingCapabilityError
from targets.onnxruntime import (
    PROVIDER_NAMES,
    OrtRunner,
    check_provider,
    load,
    physical_cores,
    session_providers,
)


def test_runner_records_providers_threads_and_versions(exported_mlp):
    _, artifact = exported_mlp
    runner = load(artifact, threads=2)
    assert runner.name == "onnxruntime fp32 (CPUExecutionProvider, 2 threads)"
    assert runner.info["providers"][-1] == "CPUExecutionProvider" and runner.info["threads"] == 2
    assert runner.info["versions"]["onnxruntime"] == ort.__version__
    assert runner.info["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}
    options = runner.session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_default_threads_are_the_physical_cores(mlp_onnx):
    runner = OrtRunner.from_path(mlp_onnx)
    assert runner.info["threads"] == physical_cores() >= 1
    assert f"{physical_cores()} thread" in runner.name


def test_runner_matches_torch(exported_cnn, make_inputs, run_torch):
    model, artifact = exported_cnn
    x = make_inputs(33, seed=3)
    np.testing.assert_allclose(load(artifact).infer(x), run_torch(model, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 1, 8, 8), np.float64), r"expected float32 input of shape \(batch, 1, 8, 8\), got float64"),
    (np.zeros((4, 1, 8, 9), np.float32), r"expected input of shape \(batch, 1, 8, 8\), got \(4, 1, 8, 9\)"),
    (np.zeros((1, 8, 8), np.float32), r"expected input of shape \(batch, 1, 8, 8\), got \(1, 8, 8\)"),
    ([[0.0] * 64], r"expected a numpy array of shape \(batch, 1, 8, 8\), got list"),
])
def test_runner_rejects_wrong_dtype_and_shape(exported_mlp, bad, message):
    with pytest.raises(CompressorError, match=message):
        load(exported_mlp[1], threads=1).infer(bad)


def test_missing_or_broken_files_are_compressor_errors(tmp_path):
    with pytest.raises(CompressorError, match="no such ONNX file"):
        OrtRunner.from_path(tmp_path / "absent.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(CompressorError, match="ONNX Runtime cannot load .*broken.onnx"):
        OrtRunner.from_path(broken)
    with pytest.raises(CompressorError, match="--threads 0"):
        OrtRunner.from_path(broken, threads=0)


def test_runner_module_does_not_need_torch(mlp_onnx, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, numpy as np; from targets.onnxruntime import OrtRunner; "
            f"y = OrtRunner.from_path({str(mlp_onnx)!r}, threads=1).infer(np.zeros((3, 1, 8, 8), np.float32)); "
            "assert y.shape == (3, 10), y.shape; assert 'torch' not in sys.modules, 'torch was imported'")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_an_execution_provider_is_chosen_or_refused_in_one_line(exported_mlp):
    _, artifact = exported_mlp
    runner = load(artifact, threads=1, provider="cpu")
    assert runner.info["providers"] == ["CPUExecutionProvider"] and runner.info["device"] == "cpu"
    assert session_providers("auto") == [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                                         if p in ort.get_available_providers()]
    for choice in ("cuda", "tensorrt"):
        if PROVIDER_NAMES[choice] in ort.get_available_providers():
            continue  # a GPU build: covered by the gpu test below
        with pytest.raises(MissingCapabilityError, match=f"--ort-provider {choice}: this onnxruntime .* only; "
                                                         "install onnxruntime-gpu") as raised:
            load(artifact, provider=choice)
        assert raised.value.exit_code == 2 and "\n" not in str(raised.value)
    with pytest.raises(CompressorError, match="--ort-provider rocm: choose one of auto, cpu, cuda, tensorrt"):
        check_provider("rocm")


def test_tensorrt_provider_options_cache_engines_beside_the_model(monkeypatch, tmp_path):
    """What a TensorRT-enabled onnxruntime-gpu is asked for; the provider list is built without running it."""
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: everything)
    (name, options), *rest = session_providers("tensorrt", tmp_path / "cache")
    assert name == "TensorrtExecutionProvider" and rest == everything[1:]
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert options["trt_timing_cache_enable"]
    assert session_providers("cuda") == everything[1:] and session_providers("cpu") == everything[2:]


@pytest.mark.gpu
def test_the_cuda_provider_runs_the_export_on_the_gpu(exported_mlp, make_inputs, run_torch):
    model, artifact = exported_mlp
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider (install onnxruntime-gpu)")
    runner = load(artifact, provider="cuda")
    assert runner.info["providers"][0] == "CUDAExecutionProvider" and runner.info["device"] == "cuda"
    x = make_inputs(64)
    np.testing.assert_allclose(runner.infer(x), run_torch(model, x), rtol=1e-3, atol=1e-4)
