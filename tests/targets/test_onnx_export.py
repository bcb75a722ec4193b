"""targets/onnx.py and the registry in targets/base.py: real exports, checked by onnx and run by ONNX Runtime."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from compressor.core.errors import CompressorError, MissingCapabilityError
from targets import get_target, list_targets
from targets.base import Artifact, Runner, TensorSpec, check_target_available

INPUT_SHAPE, NUM_CLASSES = (1, 8, 8), 10  # the conftest students'


@pytest.mark.parametrize("fixture", ["exported_mlp", "exported_cnn"])
def test_export_writes_one_checked_file_with_a_dynamic_batch(request, fixture):
    model, artifact = request.getfixturevalue(fixture)
    path = artifact.files["model"]
    assert path.name == "model.onnx" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no .data side file, no temp files
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto, full_check=True)
    assert all(init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert artifact.inputs == [TensorSpec("input", ("batch", *INPUT_SHAPE), "float32")]
    assert artifact.outputs == [TensorSpec("logits", ("batch", NUM_CLASSES), "float32")]
    assert artifact.precision == "fp32" and artifact.metadata["file_bytes"] == path.stat().st_size
    assert artifact.metadata["opset"] >= 17 and artifact.metadata["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("fixture", ["exported_mlp", "exported_cnn"])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_onnxruntime_matches_torch_for_any_batch_size(request, fixture, batch, make_inputs, run_torch):
    model, artifact = request.getfixturevalue(fixture)
    runner = get_target(artifact.target).load(artifact, threads=1)
    x = make_inputs(batch, seed=batch)
    got = runner.infer(x)
    assert got.shape == (batch, NUM_CLASSES) and got.dtype == np.float32
    np.testing.assert_allclose(got, run_torch(model, x), rtol=0, atol=1e-5)


def test_export_uses_eval_mode_and_restores_the_callers_mode(exported_cnn, make_inputs, run_torch):
    model, artifact = exported_cnn  # exported while in train mode
    assert model.training
    runner = get_target("onnx").load(artifact)
    x = make_inputs(16)
    # batch norm used its running statistics, not the batch's: run_torch evaluates in eval mode
    np.testing.assert_allclose(runner.infer(x), run_torch(model, x), atol=1e-5)


MODES_SEEN: list[bool] = []  # module level: the exporter may copy the module and its attributes


class ModeSpy(torch.nn.Module):
    """Records the train/eval mode each time the exporter traces its forward."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x):
        MODES_SEEN.append(self.training)
        return self.linear(x.flatten(1))


def test_export_traces_in_eval_mode(tmp_path, make_inputs):
    spy = ModeSpy().train()
    MODES_SEEN.clear()
    get_target("onnx").export(spy, torch.from_numpy(make_inputs(2)), tmp_path)
    assert MODES_SEEN and not any(MODES_SEEN)
    assert spy.training  # the caller's mode is restored


def test_artifact_to_dict_is_json_safe(exported_cnn):
    _, artifact = exported_cnn
    data = json.loads(json.dumps(artifact.to_dict()))
    assert data["files"]["model"] == str(artifact.files["model"])
    assert data["inputs"][0] == {"name": "input", "shape": ["batch", *INPUT_SHAPE], "dtype": "float32"}
    assert data["target"] == "onnx"
    assert isinstance(artifact, Artifact) and isinstance(get_target("onnx").load(artifact), Runner)


def test_export_is_quiet_and_a_batch_of_one_still_gives_a_dynamic_batch(tmp_path, capfd, make_inputs, make_mlp,
                                                                        run_torch):
    model = make_mlp()
    artifact = get_target("onnx").export(model, torch.from_numpy(make_inputs(1)), tmp_path)
    out, err = capfd.readouterr()
    assert out == "" and "torchvision" not in err  # the exporter's progress lines and log lines are held back
    x = make_inputs(5)
    np.testing.assert_allclose(get_target("onnx").load(artifact).infer(x), run_torch(model, x), atol=1e-5)


def test_export_into_a_file_fails_cleanly(tmp_path, make_inputs, make_mlp):
    not_a_dir = tmp_path / "export"
    not_a_dir.write_text("I am a file")
    with pytest.raises(CompressorError, match="cannot create the export folder"):
        get_target("onnx").export(make_mlp(), torch.from_numpy(make_inputs(2)), not_a_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and not_a_dir.read_text() == "I am a file"


class Unexportable(torch.nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_failed_export_keeps_the_old_model_and_leaves_no_temp_files(tmp_path, make_inputs):
    (tmp_path / "model.onnx").write_bytes(b"previous export")
    with pytest.raises(CompressorError, match=r"ONNX export of Unexportable failed \(RuntimeError: boom\)"):
        get_target("onnxruntime").export(Unexportable(), torch.from_numpy(make_inputs(2)), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert (tmp_path / "model.onnx").read_bytes() == b"previous export"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_only_fp32_is_exported_for_now(tmp_path, precision, make_inputs, make_mlp):
    with pytest.raises(CompressorError, match="fp16/int8 export is not available yet"):
        get_target("onnx").export(make_mlp(), torch.from_numpy(make_inputs(2)), tmp_path, precision)
    assert not list(tmp_path.iterdir())


def test_registry_names_and_lookups():
    assert list_targets() == ["onnx", "onnxruntime", "tensorrt", "torch-tensorrt"]
    module = get_target("onnxruntime")
    assert callable(module.export) and callable(module.load)
    with pytest.raises(CompressorError, match="unknown target 'tflite'; choose one of: onnx, onnxruntime, tensorrt"):
        get_target("tflite")
    with pytest.raises(CompressorError, match="unknown target"):
        check_target_available("tflite")
    check_target_available("onnxruntime")  # the CPU targets are always available
    check_target_available("onnxruntime", "int8")


def test_a_precision_the_target_does_not_offer_is_refused_with_the_target_that_does():
    with pytest.raises(CompressorError) as info:
        check_target_available("onnx", "int8")
    assert str(info.value) == ("--target onnx exports fp32 only, not --precision int8; use --target onnxruntime "
                               "for int8")
    assert not isinstance(info.value, MissingCapabilityError)  # bad input (exit 1), not a missing GPU (exit 2)


@pytest.mark.parametrize("name", ["tensorrt", "torch-tensorrt"])
def test_tensorrt_targets_resolve_to_their_modules_everywhere(name):
    module = get_target(name)  # importing them needs neither a GPU nor TensorRT: both are asked for at call time
    assert module.__name__ == "targets." + name.replace("-", "_")
    assert callable(module.export) and callable(module.load)


@pytest.mark.parametrize("name, package", [("tensorrt", "tensorrt"), ("torch-tensorrt", "torch_tensorrt")])
def test_a_gpu_without_the_package_stops_before_training(monkeypatch, name, package):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, package, None)  # find_spec finds nothing
    with pytest.raises(MissingCapabilityError, match=f"--target {name} needs the {package} package") as info:
        check_target_available(name)
    assert info.value.exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a CUDA GPU")
def test_tensorrt_needs_a_gpu_and_says_what_to_use_instead():
    with pytest.raises(MissingCapabilityError) as info:
        check_target_available("tensorrt")
    assert info.value.exit_code == 2
    assert str(info.value) == ("--target tensorrt needs an NVIDIA GPU with CUDA, and this machine has none; "
                               "use --target onnxruntime to run on the CPU")
