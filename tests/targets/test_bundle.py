"""targets/bundle.py: write, load and serve a bundle with onnxruntime only; tampering and gaps are caught."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import targets
from compressor.errors import CompressorError
from targets.bundle import apply_normalisation, load_bundle, write_bundle
from targets.onnxruntime import OrtRunner

ROOT = Path(__file__).resolve().parents[2]
NORMALISATION = {"mean": [0.3], "std": [0.4]}


def metadata(normalisation=NORMALISATION) -> dict:
    return {"input": {"name": "input", "shape": [1, 8, 8], "dtype": "float32"},
            "output": {"name": "logits", "shape": [10], "dtype": "float32"},
            "normalisation": normalisation, "class_names": [f"digit {i}" for i in range(10)], "precision": "fp32",
            "versions": {"numpy": np.__version__}, "preprocessing": "pixels / 16"}


@pytest.fixture
def bundle_dir(tmp_path, mlp_onnx) -> Path:
    return write_bundle(mlp_onnx, metadata(), tmp_path / "out" / "bundle")


def test_apply_normalisation_is_per_channel_float32():
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2)
    norm = {"mean": [1.0, 2.0, 3.0], "std": [0.5, 2.0, 4.0]}
    got = apply_normalisation(x, norm)
    assert got.dtype == np.float32 and got.shape == x.shape
    want = (x.astype(np.float32) - np.float32([1, 2, 3])[None, :, None, None]) / np.float32([0.5, 2, 4])[None, :, None,
                                                                                                          None]
    assert np.array_equal(got, want)
    assert got[1, 2, 1, 1] == np.float32((23 - 3) / 4)
    assert apply_normalisation(x, None).dtype == np.float32
    assert np.array_equal(apply_normalisation(x, None), x.astype(np.float32))
    with pytest.raises(CompressorError, match="2 mean values for an input with 3 channels"):
        apply_normalisation(x, {"mean": [0, 0], "std": [1, 1, 1]})


def test_bundle_layout_and_metadata(bundle_dir, mlp_onnx):
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["metadata.json", "model.onnx", "triton"]
    assert not [p for p in bundle_dir.parent.iterdir() if p.name != "bundle"]  # no staging folders left behind
    written = json.loads((bundle_dir / "metadata.json").read_text())
    assert written["model_file"] == "model.onnx" and written["bundle_format"] == 1 and len(written["sha256"]) == 64
    assert written["normalisation"] == NORMALISATION and written["preprocessing"] == "pixels / 16"
    assert (bundle_dir / "model.onnx").read_bytes() == mlp_onnx.read_bytes()
    config = (bundle_dir / "triton" / "student" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "dims: [ 1, 8, 8 ]" in config and "dims: [ 10 ]" in config
    assert (bundle_dir / "triton" / "student" / "1" / "model.onnx").read_bytes() == mlp_onnx.read_bytes()


def test_predict_normalises_then_matches_onnxruntime(bundle_dir, mlp_onnx, make_inputs):
    raw = make_inputs(9) * 3 + 1
    bundle = load_bundle(bundle_dir)
    normalised = ((raw - np.float32(0.3)) / np.float32(0.4)).astype(np.float32)
    expected = OrtRunner.from_path(mlp_onnx, threads=1).infer(normalised)
    np.testing.assert_allclose(bundle.predict(raw), expected, rtol=0, atol=1e-6)
    assert np.array_equal(bundle.predict(raw), bundle.predict(normalised, normalised=True))
    assert not np.allclose(bundle.predict(raw, normalised=True), expected)  # normalisation really was applied
    one = bundle.predict(raw[0])  # a single example without the batch axis
    assert one.shape == (1, 10) and np.array_equal(one, bundle.predict(raw[:1]))
    assert bundle.predict_classes(raw) == [f"digit {i}" for i in expected.argmax(1)]
    assert bundle.class_names[0] == "digit 0" and bundle.metadata["precision"] == "fp32"


def test_without_normalisation_predict_feeds_the_input_as_is(tmp_path, mlp_onnx, make_inputs):
    bundle = load_bundle(write_bundle(mlp_onnx, metadata(normalisation=None), tmp_path / "plain"))
    x = make_inputs(4)
    np.testing.assert_allclose(bundle.predict(x), OrtRunner.from_path(mlp_onnx).infer(x), rtol=0, atol=1e-6)


def test_predict_rejects_the_wrong_shape(bundle_dir):
    with pytest.raises(CompressorError, match=r"expected input of shape \(N, 1, 8, 8\) or \(1, 8, 8\), got \(2, 64\)"):
        load_bundle(bundle_dir).predict(np.zeros((2, 64), np.float32))


def test_rewriting_replaces_the_old_bundle(bundle_dir, mlp_onnx):
    (bundle_dir / "stale.txt").write_text("from an older run")
    write_bundle(mlp_onnx, {**metadata(), "precision": "fp32", "class_names": None}, bundle_dir)
    assert not (bundle_dir / "stale.txt").exists()
    assert load_bundle(bundle_dir).predict_classes(np.zeros((1, 1, 8, 8)))[0].isdigit()
    assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["bundle"]


def test_tampered_model_is_refused(bundle_dir):
    model = bundle_dir / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(CompressorError, match=r"model.onnx: sha256 .* does not match .*re-export the bundle"):
        load_bundle(bundle_dir)


def test_missing_pieces_are_named(tmp_path, bundle_dir):
    with pytest.raises(CompressorError, match="no bundle here .*missing folder.*re-export"):
        load_bundle(tmp_path / "nowhere")
    (bundle_dir / "model.onnx").unlink()
    with pytest.raises(CompressorError, match="model.onnx: the bundle's model file is missing; re-export"):
        load_bundle(bundle_dir)
    (bundle_dir / "metadata.json").unlink()
    with pytest.raises(CompressorError, match="metadata.json: no bundle here"):
        load_bundle(bundle_dir)


def test_write_bundle_validates_the_metadata(tmp_path, mlp_onnx):
    incomplete = metadata()
    del incomplete["class_names"], incomplete["input"]["dtype"]
    with pytest.raises(ValueError, match="bundle metadata lacks class_names, input.dtype"):
        write_bundle(mlp_onnx, incomplete, tmp_path / "bundle")
    with pytest.raises(CompressorError, match="does not exist"):
        write_bundle(tmp_path / "absent.onnx", metadata(), tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_serving_a_bundle_never_imports_torch(bundle_dir):
    code = ("import sys, numpy as np, targets; "
            f"y = targets.load_bundle({str(bundle_dir)!r}).predict(np.zeros((2, 1, 8, 8), np.float32)); "
            "assert y.shape == (2, 10), y.shape; assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert targets.load_bundle is load_bundle
