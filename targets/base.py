"""The target interface every backend implements, and the registry that names the backends.

A target is a module (``targets/<name>.py``, the word the user types after ``--target``) with two functions::

    export(model, example_input, out_dir, precision) -> Artifact      # files + input/output spec + metadata
    load(artifact, threads=None) -> Runner                            # Runner.infer(np.ndarray) -> np.ndarray

A model of named inputs (a text classifier) takes a dict of arrays by name wherever one array goes
(``targets.feeds``): the example to export, the runner's ``infer``, the benchmark pool, the int8 calibration rows.

This is Polygraphy's loader/runner split: one comparator (``targets.parity``) and one timing harness
(``targets.benchmark``) work across every backend because each runner is just ``infer`` on numpy arrays.
This module imports no torch at import time; ``check_target_available`` imports it only to ask for CUDA.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol, runtime_checkable

import numpy as np

from compressor.core.errors import CompressorError, MissingCapabilityError


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; ``shape`` has strings for the dynamic axes: ("batch", 1, 8, 8), or
    ("batch", "sequence") for a text model's token ids."""

    name: str
    shape: tuple
    dtype: str  # numpy dtype name: "float32", "float16", "int64"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Artifact:
    """What ``export`` wrote: ``files["model"]`` is the main model file; ``metadata`` is JSON-safe."""

    target: str
    precision: str
    files: dict[str, Path]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-safe copy (paths as strings) for ``report.json``."""
        return {
            "target": self.target,
            "precision": self.precision,
            "files": {key: str(path) for key, path in self.files.items()},
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "metadata": dict(self.metadata),
        }


@runtime_checkable
class Runner(Protocol):
    """A loaded model on one backend: ``infer`` maps (N, ...) float32 inputs (or arrays by name, ``targets.feeds``)
    to (N, C) float32 logits.

    Every row of the report is a Runner, PyTorch eager included (``targets.eager``), and is timed by
    :func:`targets.benchmark.runner_measure`: a runner that times itself (CUDA events) defines
    ``measure(pool, batch_size, warmup_s, duration_s) -> LatencyStats`` and ``timed`` (what one timed call covers);
    for the others the harness times ``infer``."""

    name: str  # for people: "onnxruntime fp32 (CPUExecutionProvider, 2 threads)"
    info: dict  # providers, threads, versions: what a reader needs to reproduce a timing

    def infer(self, x: np.ndarray | dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class TargetInfo:
    """A registry row: where the target's module lives, whether it needs a CUDA GPU, and one line about it."""

    module: str
    needs_gpu: bool
    description: str
    precisions: tuple[str, ...] = ("fp32",)
    packages: tuple[str, ...] = ()  # optional packages it imports at run time (the gpu extra), checked up front
    named_inputs: bool = True       # exports models of several named (int64) inputs, a text classifier's


# The registry, explicit and in one place (no registration as an import side effect).
TARGETS: dict[str, TargetInfo] = {
    "onnx": TargetInfo("targets.onnx", False,
                       "a portable ONNX file (fp32), run with ONNX Runtime on the CPU"),
    "onnxruntime": TargetInfo("targets.onnxruntime", False,
                              "ONNX Runtime, full graph optimisation; CPU, or CUDA with onnxruntime-gpu installed",
                              ("fp32", "fp16", "int8")),
    "tensorrt": TargetInfo("targets.tensorrt", True,
                           "a TensorRT engine (.plan) built from the ONNX export; NVIDIA GPU",
                           ("fp32", "fp16", "int8"), ("tensorrt",)),
    "torch-tensorrt": TargetInfo("targets.torch_tensorrt", True,
                                 "torch_tensorrt.compile of the PyTorch student; NVIDIA GPU", ("fp32", "fp16"),
                                 ("torch_tensorrt",), named_inputs=False),
}


def list_targets() -> list[str]:
    """The names ``--target`` accepts, in registry order."""
    return list(TARGETS)


def get_target(name: str) -> ModuleType:
    """The module implementing target ``name``: it exposes ``export(...)`` and ``load(...)``.

    >>> get_target("onnxruntime").load(artifact).infer(x)   # doctest: +SKIP
    """
    info = _info(name)
    try:
        return importlib.import_module(info.module)
    except ModuleNotFoundError as exc:
        if exc.name != info.module:  # the module exists but one of its own imports is missing: not ours to hide
            raise
        raise MissingCapabilityError(_not_in_build(name)) from exc


def check_target_available(name: str, precision: str = "fp32") -> None:
    """Stop before any training when ``--target name --precision P`` cannot run here: a precision the target does
    not offer (``CompressorError``), no CUDA GPU, not in this build, or its package (tensorrt, torch_tensorrt) not
    installed (``MissingCapabilityError``, exit code 2).
    Each error is one line that names the target and the alternative.
    """
    info = _info(name)
    if precision not in info.precisions:
        offering = [other for other, row in TARGETS.items() if precision in row.precisions]
        raise CompressorError(f"--target {name} exports {', '.join(info.precisions)} only, not --precision "
                              f"{precision}; use --target {offering[0] if offering else name} for {precision}")
    if info.needs_gpu:
        import torch  # only here: asking for CUDA is the one thing this module needs torch for

        if not torch.cuda.is_available():
            raise MissingCapabilityError(
                f"--target {name} needs an NVIDIA GPU with CUDA, and this machine has none; "
                "use --target onnxruntime to run on the CPU")
    if importlib.util.find_spec(info.module) is None:
        raise MissingCapabilityError(_not_in_build(name))
    missing = [package for package in info.packages if importlib.util.find_spec(package) is None]
    if missing:
        raise MissingCapabilityError(
            f"--target {name} needs the {' and '.join(missing)} package, which is not installed here; install "
            "compressor with the gpu extra (pip install -e '.[gpu]'), run the Docker image (docker build -t "
            "compressor .), or use --target onnxruntime")


def check_target_inputs(name: str, named: bool) -> None:
    """Refuse, in one line, a model of named inputs (a text classifier) for a target that exports one input only."""
    if named and not _info(name).named_inputs:
        raise CompressorError(f"--target {name} exports models of one float32 input; a text model's named int64 "
                              "inputs go through --target tensorrt (an engine with a sequence profile) or onnxruntime")


def _info(name: str) -> TargetInfo:
    if name not in TARGETS:
        raise CompressorError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    return TARGETS[name]


def _not_in_build(name: str) -> str:
    source = TARGETS[name].module.replace(".", "/") + ".py"
    return (f"--target {name} is not available in this build of compressor (it has no {source}); "
            "use --target onnxruntime")
