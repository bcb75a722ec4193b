"""targets/bundle.py: write, load and serve a bundle with onnxruntime only; tampering and gaps are caught."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import targets
from compressor.core.errors import CompressorError
from targets import bundle as bundle_module
from targets.bundle import load_bundle, write_bundle
from compressor.core.preprocessing import apply_normalisation
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


@pytest.fixture
def model_config_pb2():
    """Triton's own ``ModelConfig`` protobuf module; skips only where the dev extra is not installed."""
    return pytest.importorskip("tritonclient.grpc.model_config_pb2",
                               reason="validating config.pbtxt needs Triton's ModelConfig protobuf: "
                                      "pip install 'tritonclient[grpc]' (in the dev extra)")


def parse_triton_config(model_config_pb2, model_dir: Path):
    """``model_dir/config.pbtxt`` parsed as Triton parses it: an unknown field or enum name raises ParseError."""
    from google.protobuf import text_format

    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def check_triton_model(model_config_pb2, bundle_dir: Path, name: str, platform: str, suffix: str) -> None:
    """``bundle_dir/triton/name`` is a Triton model Triton loads as metadata.json describes it: batched, one input
    and one output of the same name, dtype and per-example dims, its file where Triton's defaults look."""
    written = json.loads((bundle_dir / "metadata.json").read_text())
    model_dir = bundle_dir / "triton" / name
    config = parse_triton_config(model_config_pb2, model_dir)
    assert config.name == model_dir.name == name
    assert config.platform == platform and not config.backend
    sizes = written.get("serving", {}).get("batch_sizes", [bundle_module.TRITON_MAX_BATCH])
    assert config.max_batch_size == max(sizes) > 0  # so dims below exclude the batch axis
    assert list(config.dynamic_batching.preferred_batch_size) == sorted(b for b in sizes if b > 1)
    assert config.dynamic_batching.max_queue_delay_microseconds == bundle_module.TRITON_QUEUE_DELAY_US
    assert len(config.instance_group) == 1 and config.instance_group[0].count == 1
    kind = model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)
    assert kind == ("KIND_GPU" if platform == "tensorrt_plan" else "KIND_AUTO")
    assert config.version_policy.latest.num_versions == 1
    assert len(config.input) == 1 and len(config.output) == 1
    for tensor, spec in ((config.input[0], written["input"]), (config.output[0], written["output"])):
        assert tensor.name == spec["name"]
        assert model_config_pb2.DataType.Name(tensor.data_type) == bundle_module.TRITON_DATA_TYPES[spec["dtype"]]
        assert list(tensor.dims) == spec["shape"]
    # the classification extension's labels: one class name per line, named by the output
    assert config.output[0].label_filename == bundle_module.LABELS_FILE
    assert (model_dir / "labels.txt").read_text().splitlines() == written["class_names"]
    # no file name in the config: Triton looks for model<suffix> (model.onnx for onnxruntime_onnx, model.plan for
    # tensorrt_plan) in the newest version folder, so the file must sit there
    assert not config.default_model_filename
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    assert [p.name for p in (model_dir / "1").iterdir()] == [f"model{suffix}"] == [written["model_file"]]
    assert (model_dir / "1" / written["model_file"]).read_bytes() == (bundle_dir / written["model_file"]).read_bytes()


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
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["client.py", "metadata.json", "model.onnx", "triton"]
    assert sorted(p.name for p in (bundle_dir / "triton").iterdir()) == ["student", "student_python"]
    assert not [p for p in bundle_dir.parent.iterdir() if p.name != "bundle"]  # no staging folders left behind
    written = json.loads((bundle_dir / "metadata.json").read_text())
    assert written["model_file"] == "model.onnx" and written["bundle_format"] == 1 and len(written["sha256"]) == 64
    assert written["normalisation"] == NORMALISATION and written["preprocessing"] == "pixels / 16"
    assert (bundle_dir / "model.onnx").read_bytes() == mlp_onnx.read_bytes()
    assert (bundle_dir / "triton" / "student" / "1" / "model.onnx").read_bytes() == mlp_onnx.read_bytes()


def test_triton_config_is_a_valid_model_config(bundle_dir, model_config_pb2):
    check_triton_model(model_config_pb2, bundle_dir, "student", "onnxruntime_onnx", ".onnx")
    config = parse_triton_config(model_config_pb2, bundle_dir / "triton" / "student")
    assert model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP32"
    assert list(config.input[0].dims) == [1, 8, 8] and list(config.output[0].dims) == [10]  # (C_in, H, W), (C,)


def test_triton_config_for_a_tensorrt_plan(tmp_path, model_config_pb2):
    """A .plan engine is only copied and hashed, never opened, so dummy bytes stand in for a TensorRT build."""
    plan = tmp_path / "engine" / "model.plan"
    plan.parent.mkdir()
    plan.write_bytes(b"not really a TensorRT engine")
    bundle_dir = write_bundle(plan, {**metadata(), "precision": "fp16", "model_name": "digits_mlp"},
                              tmp_path / "bundle")
    check_triton_model(model_config_pb2, bundle_dir, "digits_mlp", "tensorrt_plan", ".plan")
    config = parse_triton_config(model_config_pb2, bundle_dir / "triton" / "digits_mlp")
    # an fp16 engine keeps float32 input and output, as metadata says: Triton must be told FP32, not FP16
    assert [model_config_pb2.DataType.Name(t.data_type) for t in (*config.input, *config.output)] == ["TYPE_FP32"] * 2


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_bundle_declares_float32_io(tmp_path, exported_mlp, make_inputs, model_config_pb2,
                                                      precision):
    """fp16 and int8 ONNX Runtime exports keep float32 input and output (a Cast or Q/DQ pair at each end)."""
    from targets.onnxruntime import export

    artifact = export(exported_mlp[0], torch.from_numpy(make_inputs(2)), tmp_path / "export", precision,
                      calibration=make_inputs(64, seed=1) if precision == "int8" else None)
    spec_in, spec_out = artifact.inputs[0], artifact.outputs[0]  # as the pipeline's write_student_bundle reads them
    described = {**metadata(), "precision": precision,
                 "input": {"name": spec_in.name, "shape": [d for d in spec_in.shape if d != "batch"],
                           "dtype": spec_in.dtype},
                 "output": {"name": spec_out.name, "shape": [d for d in spec_out.shape if d != "batch"],
                            "dtype": spec_out.dtype}}
    bundle_dir = write_bundle(artifact.files["model"], described, tmp_path / "bundle")
    check_triton_model(model_config_pb2, bundle_dir, "student", "onnxruntime_onnx", ".onnx")
    config = parse_triton_config(model_config_pb2, bundle_dir / "triton" / "student")
    assert [model_config_pb2.DataType.Name(t.data_type) for t in (*config.input, *config.output)] == ["TYPE_FP32"] * 2
    assert list(config.input[0].dims) == [1, 8, 8] and list(config.output[0].dims) == [10]


def test_every_dtype_maps_to_a_triton_data_type(model_config_pb2):
    table = bundle_module.TRITON_DATA_TYPES  # numpy dtype name -> Triton DataType name
    assert set(table.values()) <= set(model_config_pb2.DataType.keys())
    assert table["float32"] == "TYPE_FP32" and table["float16"] == "TYPE_FP16" and table["bool"] == "TYPE_BOOL"


def test_triton_config_declares_other_dtypes_and_odd_names(tmp_path, mlp_onnx, model_config_pb2):
    """A float16 input is declared FP16, a symbolic axis -1; quotes and backslashes in names stay in the string."""
    described = {**metadata(), "model_name": 'the "best" student',
                 "input": {"name": 'scan "raw"\\1', "shape": [1, "height", 8], "dtype": "float16"},
                 "output": {"name": "logits", "shape": [10], "dtype": "int64"}}
    bundle_dir = write_bundle(mlp_onnx, described, tmp_path / "bundle")
    config = parse_triton_config(model_config_pb2, bundle_dir / "triton" / 'the "best" student')
    assert config.name == 'the "best" student' and config.input[0].name == 'scan "raw"\\1'
    assert model_config_pb2.DataType.Name(config.input[0].data_type) == "TYPE_FP16"
    assert model_config_pb2.DataType.Name(config.output[0].data_type) == "TYPE_INT64"
    assert list(config.input[0].dims) == [1, -1, 8]


def test_triton_config_refuses_what_triton_cannot_declare(tmp_path, mlp_onnx):
    """An unmappable dtype or model file stops the bundle before anything is written, instead of a wrong config."""
    described = {**metadata(), "input": {"name": "input", "shape": [1, 8, 8], "dtype": "complex64"}}
    with pytest.raises(CompressorError, match="input 'input' has dtype complex64, which Triton has no data type"):
        write_bundle(mlp_onnx, described, tmp_path / "bundle")
    scripted = tmp_path / "source" / "model.pt"
    scripted.write_bytes(b"a TorchScript archive")
    with pytest.raises(CompressorError, match=r"model.pt: .*takes .onnx or .plan model files, not .pt"):
        write_bundle(scripted, metadata(), tmp_path / "bundle")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def test_a_torch_export_program_is_bundled_without_a_triton_repository_and_says_why(tmp_path):
    program = tmp_path / "source" / "model.pt2"
    program.parent.mkdir()
    program.write_bytes(b"a torch.export archive")
    bundle = write_bundle(program, metadata(), tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == ["client.py", "metadata.json", "model.pt2"]
    written = json.loads((bundle / "metadata.json").read_text())
    assert written["model_file"] == "model.pt2" and written["triton"]["models"] == []
    assert "TorchScript, not a torch.export program" in written["triton"]["why"]


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


def test_bundle_folder_has_the_umask_mode_not_mkdtemps_0700(tmp_path, mlp_onnx):
    """The bundle is staged in a mkdtemp folder (0700); an inference server running as another user must read it."""
    previous = os.umask(0o022)
    try:
        folder = write_bundle(mlp_onnx, metadata(), tmp_path / "bundle")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "triton" / "student").stat().st_mode) == 0o755


@pytest.mark.parametrize("sizes, largest, preferred", [([1, 8, 64], 64, [8, 64]), ([1], 1, []), ([32, 4], 32, [4, 32])])
def test_the_triton_config_batches_as_the_run_timed(tmp_path, mlp_onnx, model_config_pb2, sizes, largest, preferred):
    bundle = write_bundle(mlp_onnx, {**metadata(), "serving": {"batch_sizes": sizes}}, tmp_path / "bundle")
    config = parse_triton_config(model_config_pb2, bundle / "triton" / "student")
    assert config.max_batch_size == largest and list(config.dynamic_batching.preferred_batch_size) == preferred
    check_triton_model(model_config_pb2, bundle, "student", "onnxruntime_onnx", ".onnx")


def test_a_bundle_without_class_names_has_no_labels_file(tmp_path, mlp_onnx, model_config_pb2):
    bundle = write_bundle(mlp_onnx, {**metadata(), "class_names": None}, tmp_path / "bundle")
    config = parse_triton_config(model_config_pb2, bundle / "triton" / "student")
    assert not config.output[0].label_filename and not (bundle / "triton" / "student" / "labels.txt").exists()


def test_the_python_backend_model_serves_the_same_onnx_file_on_the_cpu(bundle_dir, mlp_onnx, model_config_pb2):
    model_dir = bundle_dir / "triton" / "student_python"
    config = parse_triton_config(model_config_pb2, model_dir)
    assert config.backend == "python" and not config.platform
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    assert sorted(p.name for p in (model_dir / "1").iterdir()) == ["model.onnx", "model.py"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == mlp_onnx.read_bytes()
    assert (model_dir / "1" / "model.py").read_text() == (bundle_module.SERVING / "triton_python_model.py").read_text()
    compile((model_dir / "1" / "model.py").read_text(), "model.py", "exec")  # valid Python for the backend's stub


def test_the_clients_normalisation_is_the_pipelines(rng):
    from targets.serving.client import normalise

    x = rng.integers(0, 255, (4, 3, 5, 5)).astype(np.uint8)
    norm = {"mean": [10.0, 20.0, 30.0], "std": [2.0, 3.0, 4.0]}
    assert np.array_equal(normalise(x, norm), apply_normalisation(x, norm))
    assert np.array_equal(normalise(x, {"mean": [1.5], "std": [0.5]}), apply_normalisation(x, {"mean": [1.5],
                                                                                              "std": [0.5]}))
    assert np.array_equal(normalise(x, None), apply_normalisation(x, None))
