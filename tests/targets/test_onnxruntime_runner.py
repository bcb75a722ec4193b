"""targets/onnxruntime.py: the session, what it records, and the input checks in front of it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from compressor.errors import CompressorError
from targets.onnxruntime import OrtRunner, load, physical_cores


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
