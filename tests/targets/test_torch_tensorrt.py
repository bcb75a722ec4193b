"""targets/torch_tensorrt.py: one-line errors and the fp16 wrapper on every machine; compiled programs with
``pytest -m tensorrt``, held to the parity gate of their precision (DESIGN.md, Parity).

The ``tensorrt`` tests need torch_tensorrt and a CUDA GPU, and skip saying which is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError, MissingCapabilityError
from targets.base import Artifact
from targets.parity import check_parity
from targets.tensorrt_build import BatchProfile
from targets.torch_tensorrt import DESCRIPTION_FILE, Float16IO, export, load

REPO = Path(__file__).resolve().parents[2]


# ---- on every machine ------------------------------------------------------------------------------------------

def test_importing_the_module_imports_neither_torch_tensorrt_nor_tensorrt():
    code = ("import sys, targets.torch_tensorrt; "
            "loaded = {'tensorrt', 'torch_tensorrt'} & set(sys.modules); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_float16_wrapper_keeps_float32_io_and_computes_in_float16(make_mlp, make_inputs):
    model = make_mlp().eval()
    wrapped = Float16IO(make_mlp().eval().half())
    x = torch.from_numpy(make_inputs(16))
    with torch.no_grad():
        y, reference = wrapped(x), model(x)
    assert y.dtype == torch.float32 and y.shape == (16, 10)
    assert all(p.dtype == torch.float16 for p in wrapped.parameters())
    assert check_parity(reference.numpy(), y.numpy(), "fp16").passed


def test_export_and_load_without_a_gpu_stop_in_one_line(assert_one_clear_line, no_gpu, make_mlp, make_inputs, tmp_path):
    with pytest.raises(MissingCapabilityError) as caught:
        export(make_mlp(), torch.from_numpy(make_inputs(2)), tmp_path / "out", "fp16")
    assert_one_clear_line(caught.value, "--target torch-tensorrt needs an NVIDIA GPU", "torch_tensorrt package",
                          "lacks a CUDA GPU", "pip install -e '.[gpu]'", "docker build", "--target onnxruntime")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MissingCapabilityError) as caught:
        load(Artifact("torch-tensorrt", "fp32", {"model": tmp_path / "model.pt2"}, [], []))
    assert_one_clear_line(caught.value, "lacks a CUDA GPU")


def test_a_gpu_without_the_package_names_the_package(assert_one_clear_line, monkeypatch,
                                                     make_mlp, make_inputs, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails, find_spec finds nothing
    with pytest.raises(MissingCapabilityError) as caught:
        export(make_mlp(), torch.from_numpy(make_inputs(2)), tmp_path / "out", "fp32")
    assert_one_clear_line(caught.value, "lacks the torch_tensorrt package;")


def test_requests_it_cannot_serve_are_refused_with_the_target_that_can(no_gpu, make_mlp, make_inputs, tmp_path):
    example = torch.from_numpy(make_inputs(2))
    with pytest.raises(CompressorError, match="compiles fp32 and fp16; use --target tensorrt for int8") as caught:
        export(make_mlp(), example, tmp_path, "int8")
    assert not isinstance(caught.value, MissingCapabilityError)
    scripted = torch.jit.trace(make_mlp().eval(), example)
    with pytest.raises(CompressorError, match="is TorchScript, which torch.export cannot trace; use --target tensorrt"):
        export(scripted, example, tmp_path, "fp32")
    with pytest.raises(CompressorError, match="batch sizes"):
        export(make_mlp(), example, tmp_path, "fp32", batch_sizes=())
    with pytest.raises(CompressorError, match="--threads 0"):
        load(Artifact("torch-tensorrt", "fp32", {"model": tmp_path / "model.pt2"}, [], []), threads=0)
    assert not list(tmp_path.iterdir())


# ---- with torch_tensorrt and a CUDA GPU (pytest -m tensorrt) -------------------------------------------------------

@pytest.fixture(scope="module")
def torch_tensorrt_gpu(cuda_package):
    return cuda_package("torch_tensorrt")


@pytest.fixture(scope="module")
def digits_student(torch_tensorrt_gpu, digits_mlp) -> nn.Module:
    """The conftest's trained digits MLP, once this machine has what the tests below need."""
    return digits_mlp


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_program_passes_the_parity_gate_of_its_precision(torch_tensorrt_gpu, digits_student, digits_data, tmp_path,
                                                         precision, run_torch):
    x, y = digits_data.test.x, digits_data.test.y  # (360, 1, 8, 8): more rows than the profile's max
    artifact = export(digits_student, torch.from_numpy(x[:2]), tmp_path / "export", precision)

    path = artifact.files["model"]
    assert path == tmp_path / "export" / "model.pt2" and path.is_file()
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    with zipfile.ZipFile(path) as archive:  # the description travels inside the program
        inside = next(name for name in archive.namelist() if name.endswith(DESCRIPTION_FILE))
        assert json.loads(archive.read(inside))["profile"] == {"min": 1, "opt": 64, "max": 64}
    meta = artifact.metadata
    assert meta["partition"]["tensorrt_engines"] >= 1 and meta["compile_seconds"] > 0
    assert meta["versions"]["torch_tensorrt"] == torch_tensorrt_gpu.__version__
    # the caller's student is left on the CPU, in float32
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in digits_student.parameters())

    runner = load(artifact)
    assert runner.info["device"] == "cuda" and runner.profile == BatchProfile(1, 64, 64)
    reference = run_torch(digits_student, x)
    result = check_parity(reference, runner.infer(x), precision, labels=y)
    assert result.passed, result.failures
    if precision == "fp16":
        fp32 = load(Artifact("torch-tensorrt", "fp32", {"model": artifact.files["fp32_model"]}, artifact.inputs,
                             artifact.outputs))
        assert check_parity(reference, fp32.infer(x), "fp32").passed


@pytest.mark.tensorrt
def test_batches_above_the_profile_max_are_split(torch_tensorrt_gpu, digits_student, digits_data, tmp_path,
                                                 run_torch):
    x = digits_data.test.x[:200]  # pieces of 64, 64, 64 and 8
    # opt 1: torch.export must still trace a dynamic batch axis (it traces with TRACE_ROWS rows, not opt)
    artifact = export(digits_student, torch.from_numpy(x[:2]), tmp_path, "fp32", batch_sizes=(1, 1, 8))
    runner = load(artifact)
    assert runner.profile == BatchProfile(1, 1, 64)
    logits = runner.infer(x)
    assert logits.shape == (200, 10) and logits.dtype == np.float32
    assert check_parity(run_torch(digits_student, x), logits, "fp32").passed
    assert runner.infer(x[:0]).shape == (0, 10)
