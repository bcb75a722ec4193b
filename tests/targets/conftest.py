"""Fixtures for the targets tests: two tiny students (an MLP and a CNN on 1×8×8 inputs) exported once per session.

Helpers are handed out as fixtures (``make_inputs``, ``run_torch``, ``make_mlp``) rather than imported from this
file: with a second ``conftest.py`` in ``tests/``, ``import conftest`` would be ambiguous.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import MissingCapabilityError

INPUT_SHAPE = (1, 8, 8)  # (C_in, H, W) like the digits set
NUM_CLASSES = 10


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, NUM_CLASSES))


def tiny_cnn() -> nn.Module:
    """Conv + batch norm with non-trivial running statistics, so a train-mode export would differ from eval."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, NUM_CLASSES))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def inputs(n: int, seed: int = 0) -> np.ndarray:
    """(n, 1, 8, 8) float32 inputs."""
    return np.random.default_rng(seed).standard_normal((n, *INPUT_SHAPE)).astype(np.float32)


def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """(N, C) eval-mode logits; the model's train/eval mode is left as it was."""
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(torch.from_numpy(x)).numpy()
    finally:
        model.train(was_training)


@pytest.fixture
def make_inputs():
    """``make_inputs(n, seed=0)`` -> (n, 1, 8, 8) float32."""
    return inputs


@pytest.fixture
def run_torch():
    """``run_torch(model, x)`` -> the model's (N, C) eval-mode logits as numpy."""
    return torch_logits


@pytest.fixture
def make_mlp():
    """``make_mlp()`` -> a fresh, untrained tiny MLP (seeded)."""
    return tiny_mlp


@pytest.fixture(scope="session")
def exported_mlp(tmp_path_factory):
    """(model, Artifact) for the MLP exported with --target onnxruntime."""
    from targets.onnxruntime import export

    model = tiny_mlp().eval()
    artifact = export(model, torch.from_numpy(inputs(2)), tmp_path_factory.mktemp("mlp") / "export")
    return model, artifact


@pytest.fixture(scope="session")
def exported_cnn(tmp_path_factory):
    """(model, Artifact) for the CNN exported with --target onnx; handed over in train mode on purpose."""
    from targets.onnx import export

    model = tiny_cnn().train()
    artifact = export(model, torch.from_numpy(inputs(2)), tmp_path_factory.mktemp("cnn") / "export")
    return model, artifact


@pytest.fixture
def mlp_onnx(tmp_path, exported_mlp) -> Path:
    """A private copy of the exported MLP's model.onnx, safe to tamper with."""
    path = tmp_path / "source" / "model.onnx"
    path.parent.mkdir()
    shutil.copyfile(exported_mlp[1].files["model"], path)
    return path


@pytest.fixture(scope="session")
def cuda_package():
    """``cuda_package(name)``: the imported package ``name`` when it and a CUDA GPU are present; skips otherwise."""
    def need(name: str):
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return pytest.importorskip(name, reason=f"needs the {name} package (pip install -e '.[gpu]')")
    return need


@pytest.fixture(scope="session")
def digits_mlp(digits_data) -> nn.Module:
    """A 64-128-10 MLP trained for 15 epochs on the digits training split (CPU, seeded): a real student for the
    GPU targets' parity tests."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))
    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(15):
        for rows in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
            optimiser.step()
    return model.eval()


@pytest.fixture
def no_gpu(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def assert_one_clear_line():
    """``check(error, *needles)``: a GPU target's refusal is one line, exit code 2, naming each needle."""
    def check(error: Exception, *needles: str) -> None:
        message = str(error)
        assert isinstance(error, MissingCapabilityError) and error.exit_code == 2
        assert "\n" not in message and "Traceback" not in message
        for needle in needles:
            assert needle in message, message
    return check
