"""targets/quantize.py and ``--target onnxruntime --precision fp16|int8``: real ONNX files, real ONNX Runtime.

The model is the conftest MLP (64 -> 32 -> 10, about 2.4k parameters) with its last layer fitted in closed form
(ridge regression on one-hot targets) to ten Gaussian clusters: trained-ish weights with realistic logit margins
and unit-scale inputs, in milliseconds and without a training loop.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from compressor.core.errors import CompressorError
from targets import quantize
from targets.onnxruntime import export, load
from targets.parity import check_parity

CLASSES, FEATURES = 10, 64
CENTERS = np.random.default_rng(0).standard_normal((CLASSES, FEATURES)).astype(np.float32)  # (10, 64)


def clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 1, 8, 8) float32 points around the ten centres, and their (n,) cluster labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = CENTERS[y] + 0.7 * rng.standard_normal((n, FEATURES)).astype(np.float32)
    return x.reshape(n, 1, 8, 8).astype(np.float32), y


@pytest.fixture(scope="module")
def fitted_mlp(exported_mlp):
    """The conftest MLP (a copy, eval mode) whose last Linear is fitted to the clusters by ridge regression."""
    model = copy.deepcopy(exported_mlp[0]).eval()
    x, y = clusters(1000, seed=1)
    with torch.no_grad():
        hidden = model[:3](torch.from_numpy(x)).double().numpy()  # (1000, 32) after Flatten, Linear, ReLU
        design = np.hstack([hidden, np.ones((len(hidden), 1))])  # (1000, 33), the last column for the bias
        targets = 8.0 * np.eye(CLASSES)[y] - 4.0  # (1000, 10): logits of +4 for the class, -4 elsewhere
        solution = np.linalg.solve(design.T @ design + 1e-2 * np.eye(design.shape[1]), design.T @ targets)
        model[4].weight.copy_(torch.from_numpy(solution[:-1].T.astype(np.float32)))  # (10, 32)
        model[4].bias.copy_(torch.from_numpy(solution[-1].astype(np.float32)))  # (10,)
    return model


@pytest.fixture(scope="module")
def held_out(fitted_mlp):
    """(x, reference logits, labels): 2000 held-out rows, labelled with the fp32 model's own argmax."""
    x, _ = clusters(2000, seed=2)
    with torch.no_grad():
        reference = fitted_mlp(torch.from_numpy(x)).numpy()  # (2000, 10)
    return x, reference, reference.argmax(1)


@pytest.fixture(scope="module")
def calibration():
    return clusters(256, seed=3)[0]  # (256, 1, 8, 8): stands in for transfer-set rows


@pytest.fixture(scope="module")
def fp16_export(fitted_mlp, tmp_path_factory):
    return export(fitted_mlp, torch.from_numpy(clusters(2, 9)[0]), tmp_path_factory.mktemp("fp16") / "export", "fp16")


@pytest.fixture(scope="module")
def int8_export(fitted_mlp, calibration, tmp_path_factory):
    return export(fitted_mlp, torch.from_numpy(clusters(2, 9)[0]), tmp_path_factory.mktemp("int8") / "export", "int8",
                  calibration=calibration)


def io_dtypes(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    return [value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]]


def test_fp16_stores_half_weights_keeps_float32_io_and_passes_the_fp16_gate(fp16_export, held_out):
    artifact = fp16_export
    path, fp32_path = artifact.files["model"], artifact.files["fp32_model"]
    assert path == path.parent / "model.onnx" and fp32_path == path.parent / "fp32" / "model.onnx"
    proto = onnx.load(str(path))
    floats = [init for init in proto.graph.initializer
              if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(init.data_type == onnx.TensorProto.FLOAT16 for init in floats)
    assert io_dtypes(path) == [onnx.TensorProto.FLOAT] * 2
    assert [spec.dtype for spec in [*artifact.inputs, *artifact.outputs]] == ["float32", "float32"]
    assert artifact.inputs[0].shape == ("batch", 1, 8, 8) and artifact.precision == "fp16"

    x, reference, labels = held_out
    runner = load(artifact)
    assert runner.input_dtype == np.float32 and "onnxruntime fp16" in runner.name
    candidate = runner.infer(x)
    assert candidate.dtype == np.float32 and candidate.shape == (2000, 10)
    result = check_parity(reference, candidate, "fp16", labels=labels)
    assert result.passed, result.failures  # measured: mean cosine 1.0000, agreement 100%, max |diff| ~4e-3

    conversion = artifact.metadata["conversion"]
    assert conversion["converter"] == quantize.FP16_CONVERTER
    assert conversion["bytes"] == path.stat().st_size < conversion["fp32_bytes"] == fp32_path.stat().st_size
    assert artifact.metadata["file_bytes"] == path.stat().st_size


def test_int8_is_qdq_runs_on_float32_and_passes_the_accuracy_gate(int8_export, held_out, calibration):
    artifact = int8_export
    path = artifact.files["model"]
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert io_dtypes(path) == [onnx.TensorProto.FLOAT] * 2 and artifact.precision == "int8"

    x, reference, labels = held_out
    runner = load(artifact, threads=1)
    assert runner.input_dtype == np.float32
    assert runner.infer(x[:1]).shape == (1, 10)  # the batch axis stays dynamic
    result = check_parity(reference, runner.infer(x), "int8", labels=labels)
    assert result.passed, result.failures  # measured: 0.0 points dropped, agreement 100%, mean cosine 0.99996

    conversion = artifact.metadata["conversion"]
    assert conversion["calibration_rows"] == len(calibration) == 256
    assert conversion["format"] == "QDQ" and conversion["per_channel"] is True
    assert conversion["activation_type"] == conversion["weight_type"] == "QInt8"
    assert conversion["versions"]["onnxruntime"] and conversion["seconds"] >= 0
    assert conversion["bytes"] < conversion["fp32_bytes"] == artifact.files["fp32_model"].stat().st_size


def test_int8_is_deterministic_byte_for_byte(int8_export, calibration, tmp_path):
    again = tmp_path / "again.onnx"
    quantize.quantize_int8(int8_export.files["fp32_model"], again, calibration)
    assert again.read_bytes() == int8_export.files["model"].read_bytes()


def test_exports_leave_no_temporary_files(fp16_export, int8_export):
    for artifact in (fp16_export, int8_export):
        root = artifact.files["model"].parent
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["fp32", "fp32/model.onnx", "model.onnx"]


@pytest.mark.parametrize("rows, message", [
    (np.zeros((0, 1, 8, 8), np.float32), r"calibration set for .*model\.onnx is empty; pass at least one"),
    (np.zeros((16, 64), np.float32), r"have shape \(16, 64\), but the model takes \(M, 1, 8, 8\)"),
    (np.zeros((16, 1, 8, 9), np.float32), r"have shape \(16, 1, 8, 9\), but the model takes \(M, 1, 8, 8\)"),
    (np.full((4, 1, 8, 8), np.nan, np.float32), r"contain 256 NaN/Inf values; clean the transfer set"),
    ([["a"]], r"not a numeric array"),
])
def test_bad_calibration_is_refused_naming_the_file(int8_export, tmp_path, rows, message):
    source = int8_export.files["fp32_model"]
    with pytest.raises(CompressorError, match=message) as info:
        quantize.quantize_int8(source, tmp_path / "out.onnx", rows)
    assert str(source) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_int8_export_without_calibration_or_with_bad_rows_stops_before_exporting(fitted_mlp, tmp_path):
    example = torch.from_numpy(clusters(2, 9)[0])
    with pytest.raises(CompressorError, match="int8 needs calibration rows from the transfer set"):
        export(fitted_mlp, example, tmp_path / "none", "int8")
    with pytest.raises(CompressorError, match=r"have shape \(8, 64\), but the model takes \(M, 1, 8, 8\)"):
        export(fitted_mlp, example, tmp_path / "wrong", "int8", calibration=np.zeros((8, 64), np.float32))
    with pytest.raises(CompressorError, match="--target onnxruntime exports fp32, fp16, int8"):
        export(fitted_mlp, example, tmp_path / "bf16", "bf16")
    assert list(tmp_path.iterdir()) == []  # nothing exported, nothing left


def test_a_failing_quantizer_is_a_compressor_error_and_leaves_nothing(int8_export, calibration, tmp_path,
                                                                       monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where our and ORT's temporary folders go

    def half_written(model_input, model_output, *args, **kwargs):
        Path(model_output).write_bytes(b"partial")
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : calibration session broke\nsecond line")

    monkeypatch.setattr(quantize, "quantize_static", half_written)
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old model")
    source = int8_export.files["fp32_model"]
    with pytest.raises(CompressorError, match="INT8 quantization of .* failed .RuntimeError: .*calibration session "
                                              "broke.; export with --precision fp16 or fp32") as info:
        quantize.quantize_int8(source, out / "model.onnx", calibration)
    assert str(source) in str(info.value) and "second line" not in str(info.value)
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_bytes() == b"old model"
    assert list(scratch.iterdir()) == []


def test_missing_or_unreadable_source_files_are_compressor_errors(tmp_path, calibration):
    with pytest.raises(CompressorError, match="no such ONNX file"):
        quantize.convert_fp16(tmp_path / "absent.onnx", tmp_path / "out.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    with pytest.raises(CompressorError, match="is not a readable ONNX file"):
        quantize.quantize_int8(broken, tmp_path / "out.onnx", calibration)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx"]


def test_calibration_under_a_wrong_input_name_is_named(int8_export, calibration, tmp_path):
    with pytest.raises(CompressorError, match=r"the model's inputs are input, but the arrays given have no input; "
                                              r"unknown pixels"):
        quantize.quantize_int8(int8_export.files["fp32_model"], tmp_path / "out.onnx", {"pixels": calibration})
    assert not (tmp_path / "out.onnx").exists()


def test_conversions_run_without_torch(int8_export, tmp_path):
    """A serving box without torch can convert: block the import (onnxruntime.tools imports torch if present)."""
    source = int8_export.files["fp32_model"]
    code = ("import sys, numpy as np; sys.modules['torch'] = None; from targets import quantize; "
            f"quantize.convert_fp16({str(source)!r}, {str(tmp_path / 'h.onnx')!r}); "
            f"quantize.quantize_int8({str(source)!r}, {str(tmp_path / 'q.onnx')!r}, "
            "np.ones((3, 1, 8, 8), np.float32))")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.onnx", "q.onnx"]


def test_int8_for_tensorrt_keeps_biases_float_so_the_preflight_passes(fitted_mlp, calibration, tmp_path):
    """ONNX Runtime's default int8 graph dequantizes int32 biases, which TensorRT cannot; quantize_bias=False (what
    --target tensorrt asks for) keeps them float32 and the graph passes the preflight."""
    from targets.onnx import export as export_onnx
    from targets.tensorrt_preflight import preflight

    fp32 = export_onnx(fitted_mlp, torch.from_numpy(clusters(2, 9)[0]), tmp_path / "fp32").files["model"]
    verdicts = {}
    for quantize_bias in (True, False):
        path = tmp_path / f"int8-bias-{quantize_bias}.onnx"
        meta = quantize.quantize_int8(fp32, path, calibration, quantize_bias=quantize_bias)
        assert meta["quantize_bias"] is quantize_bias
        verdicts[quantize_bias] = preflight(path)
    assert not verdicts[True].ok and "int32" in verdicts[True].summary()
    assert verdicts[False].ok, verdicts[False].summary()
