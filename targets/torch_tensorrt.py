"""``--target torch-tensorrt``: the PyTorch student compiled by Torch-TensorRT and saved as an ExportedProgram.

``export`` compiles with ``torch_tensorrt.compile(model, ir="dynamo", arg_inputs=[Input(min, opt, max)])``: the
student is traced by ``torch.export`` with a dynamic batch axis, and every subgraph Torch-TensorRT can convert
becomes a TensorRT engine inside the returned ``torch.fx.GraphModule``. ``torch_tensorrt.save(...,
output_format="exported_program")`` writes it to ``model.pt2`` (``torch.export.save`` expects that suffix), with
``compressor.json`` inside (profile, precision, I/O) so ``load`` needs only the file. ``load`` reads it back with
``torch_tensorrt.load(...).module()``, which registers the engine op that ``torch.export.load`` must resolve.

Choices, against Torch-TensorRT 2.13 (pytorch/TensorRT ``py/torch_tensorrt/dynamo/_compiler.py`` and
``docsrc/user_guide``), which builds on TensorRT 11:

- Precision is carried by the model. The dynamo path builds strongly typed networks and ignores
  ``enabled_precisions`` (kept for the TorchScript/FX frontends): a layer runs in the dtype PyTorch gives it. So fp16
  compiles a float16 copy of the student behind a cast at each end (``Float16IO``): float16 weights and arithmetic,
  float32 input and output, the same contract as the fp16 ONNX file. Torch-TensorRT's rule-based autocast
  (``enable_autocast``) would pick per-layer precisions instead; an explicit cast keeps fp16 meaning one thing.
- ``min_block_size=1``: the default (5) leaves graphs of fewer than five convertible ops, such as a small MLP, in
  PyTorch. Ops without a converter still run in PyTorch; ``metadata["partition"]`` counts engines and PyTorch parts.
- ``disable_tf32=True``, for the same reason as ``targets.tensorrt``: the fp32 parity gate would see TF32 rounding.
- The timing cache defaults to ``out_dir/timing.cache`` instead of Torch-TensorRT's shared temp-folder file.
- The profile is ``targets.tensorrt.choose_profile`` (min 1, opt the median requested size, max >= 64); ``infer``
  splits batches above max.

A TorchScript module (the traced teacher ensemble) cannot go through ``torch.export``: CompressorError says so and
points to ``--target tensorrt``, which exports TorchScript through ONNX. ``torch_tensorrt`` (and with it
``tensorrt``) is imported inside the functions that need it, so this module imports on any machine with torch.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line, root_cause
from targets.base import Artifact, TensorSpec, check_target_inputs
from targets.tensorrt import batch_slices, check_input, check_threads
from targets.tensorrt_build import DEFAULT_BATCH_SIZES, BatchProfile, choose_profile, require_gpu_package

MODEL_FILE = "model.pt2"
DESCRIPTION_FILE = "compressor.json"  # inside model.pt2, beside the program
TIMING_CACHE_FILE = "timing.cache"
SUPPORTED_PRECISIONS = ("fp32", "fp16")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
TRACE_ROWS = 2  # rows of the example batch torch.export traces with: any size but 0 and 1 (always <= profile max)


def export(model, example_input, out_dir: Path, precision: str = "fp32",
           batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, timing_cache: str | Path | None = None) -> Artifact:
    """Compile ``model`` (an ``nn.Module``, left as it is) into ``out_dir/model.pt2``: (N, ...) float32 in, (N, C)
    float32 logits out, for 1 <= N <= the profile's max. ``example_input`` is one batch, e.g. (2, 1, 8, 8); only its
    shape after the batch axis is used. fp16 also compiles the fp32 student (``files["fp32_model"]``). ``metadata``:
    versions, GPU, profile, compile seconds, partition, bytes."""
    if precision not in SUPPORTED_PRECISIONS:
        raise CompressorError(f"--precision {precision}: --target torch-tensorrt compiles fp32 and fp16; use --target "
                              f"tensorrt for {precision} (a QDQ graph calibrated on the transfer set)")
    check_target_inputs("torch-tensorrt", isinstance(example_input, dict))
    if isinstance(model, torch.jit.ScriptModule):
        raise CompressorError(f"--target torch-tensorrt compiles nn.Modules through torch.export, and "
                              f"{type(model).__name__} is TorchScript, which torch.export cannot trace; use --target "
                              "tensorrt (TorchScript goes through ONNX)")
    profile = choose_profile(batch_sizes)
    torch_tensorrt = require_gpu_package("torch_tensorrt", "torch-tensorrt")  # before any file is written
    out_dir = Path(out_dir)
    cache = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE_FILE
    row_shape = tuple(int(d) for d in example_input.shape[1:])  # e.g. (1, 8, 8)

    record = compile_and_save(torch_tensorrt, model, row_shape, out_dir / MODEL_FILE, precision, profile, cache)
    files = {"model": out_dir / MODEL_FILE}
    if precision == "fp16":
        fp32 = compile_and_save(torch_tensorrt, model, row_shape, out_dir / "fp32" / MODEL_FILE, "fp32", profile,
                                cache)
        files["fp32_model"] = out_dir / "fp32" / MODEL_FILE
        record["fp32_program"] = {key: fp32[key] for key in ("compile_seconds", "file_bytes", "partition")}
    classes = record.pop("classes")
    return Artifact(target="torch-tensorrt", precision=precision, files=files,
                    inputs=[TensorSpec(INPUT_NAME, ("batch", *row_shape), "float32")],
                    outputs=[TensorSpec(OUTPUT_NAME, ("batch", classes), "float32")], metadata=record)


class Float16IO(nn.Module):
    """``inner`` (already float16) behind float32 I/O: (N, ...) float32 -> float16 -> inner -> (N, C) float32."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(torch.float16)).to(torch.float32)


def compile_and_save(torch_tensorrt, model: nn.Module, row_shape: tuple, path: Path, precision: str,
                     profile: BatchProfile, timing_cache: Path) -> dict:
    """Compile a copy of ``model`` on the current GPU for (N, *row_shape) float32 inputs, N in the profile, and save
    it to ``path`` with its description inside. Returns the record for ``metadata`` (and "classes", the C of the
    (N, C) output, for the caller)."""
    import tensorrt  # already imported by torch_tensorrt; read here for its version only

    device = torch.device("cuda", torch.cuda.current_device())
    module = copy.deepcopy(model).eval().to(device)  # the caller's student keeps its device, dtype and mode
    if precision == "fp16":
        module = Float16IO(module.half())
    # torch.export traces with the Input's example tensor, by default of the opt shape; an example batch of 1 would
    # be specialised to a constant (the 0/1 rule) and fail the dynamic axis, so it traces with TRACE_ROWS rows.
    spec = torch_tensorrt.Input(min_shape=(profile.min, *row_shape), opt_shape=(profile.opt, *row_shape),
                                max_shape=(profile.max, *row_shape), dtype=torch.float32,
                                torch_tensor=torch.zeros((TRACE_ROWS, *row_shape), device=device))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with _quiet():
            compiled = torch_tensorrt.compile(module, ir="dynamo", arg_inputs=[spec], min_block_size=1,
                                              disable_tf32=True, timing_cache_path=str(timing_cache))
    except Exception as exc:  # torch.export and every converter raise their own types
        cause = root_cause(exc)
        raise CompressorError(f"Torch-TensorRT could not compile {type(model).__name__} at {precision} "
                              f"({type(cause).__name__}: {first_line(cause)}); the student's forward must be "
                              "traceable by torch.export, or use --target tensorrt") from exc
    seconds = time.perf_counter() - started
    partition = _partition(compiled)
    if partition["tensorrt_engines"] == 0:
        raise CompressorError(f"Torch-TensorRT put none of {type(model).__name__}'s layers into TensorRT, so "
                              "--target torch-tensorrt would time plain PyTorch; use --target tensorrt")
    with torch.no_grad():
        probe = _single_output(compiled(torch.zeros((profile.min, *row_shape), device=device)))  # (1, C)
    classes = int(probe.shape[-1])

    versions = {"torch": torch.__version__, "torch_tensorrt": torch_tensorrt.__version__,
                "tensorrt": tensorrt.__version__}
    description = {"format": 1, "precision": precision, "profile": profile.to_dict(),
                   "input": {"name": INPUT_NAME, "shape": ["batch", *row_shape], "dtype": "float32"},
                   "output": {"name": OUTPUT_NAME, "shape": ["batch", classes], "dtype": "float32"},
                   "versions": versions}
    _save(torch_tensorrt, compiled, path, [spec], {DESCRIPTION_FILE: json.dumps(description)})
    major, minor = torch.cuda.get_device_capability(device)
    return {"compiler": 'torch_tensorrt.compile(ir="dynamo", min_block_size=1, disable_tf32=True)',
            "gpu": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}",
            "profile": profile.to_dict(), "compile_seconds": round(seconds, 3), "file_bytes": path.stat().st_size,
            "partition": partition, "timing_cache": str(timing_cache), "strongly_typed": True, "tf32": False,
            "versions": versions, "classes": classes}


def load(artifact: Artifact, threads: int | None = None) -> "TorchTensorRTRunner":
    """A ``TorchTensorRTRunner`` on ``artifact.files["model"]``. ``threads`` does not change how the GPU runs the
    program; it is checked (at least 1 when given) and recorded."""
    check_threads(threads)
    torch_tensorrt = require_gpu_package("torch_tensorrt", "torch-tensorrt")
    return TorchTensorRTRunner.from_path(torch_tensorrt, artifact.files["model"], artifact.precision, threads)


class TorchTensorRTRunner:
    """A loaded Torch-TensorRT program; ``infer`` maps (N, ...) float32 to (N, C) float32 logits on the GPU.

    Each call copies the batch to the GPU, runs the program under ``torch.no_grad`` and copies the logits back
    (the copy back waits for the engines). Batches above the profile's max run in pieces of at most max rows.
    """

    def __init__(self, module, path: Path, description: dict, precision: str, threads: int | None = None):
        self.module = module
        self.path = path
        self.profile = BatchProfile(**description["profile"])
        self.input_shape = tuple(description["input"]["shape"])  # ("batch", 1, 8, 8)
        self.input_dtype = np.dtype(description["input"]["dtype"])
        self.output_shape = tuple(description["output"]["shape"])  # ("batch", C)
        self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(self.device)
        self.name = f"torch-tensorrt {precision} ({gpu}, batch {self.profile.min}..{self.profile.max})"
        self.info = {
            "device": "cuda",
            "gpu": gpu,
            "threads": threads,
            "profile": self.profile.to_dict(),
            "model_file": str(path),
            "input": {"name": INPUT_NAME, "shape": list(self.input_shape), "dtype": self.input_dtype.name},
            "versions": {**description.get("versions", {}), "numpy": np.__version__},
        }

    @classmethod
    def from_path(cls, torch_tensorrt, path: str | Path, precision: str = "fp32",
                  threads: int | None = None) -> "TorchTensorRTRunner":
        """Load ``path`` (a ``model.pt2`` written by ``export``) onto the current GPU."""
        path = Path(path)
        if not path.is_file():
            raise CompressorError(f"{path}: no such Torch-TensorRT program; export the model again")
        extra = {DESCRIPTION_FILE: ""}  # torch.export.load fills in the stored text
        try:
            # a failed torch.export.load prints its traceback before torch_tensorrt.load tries torch.jit.load
            with contextlib.redirect_stderr(io.StringIO()), _quiet():
                module = torch_tensorrt.load(str(path), extra_files=extra).module()
        except Exception as exc:  # torch.export.load, then torch.jit.load, each with their own errors
            raise CompressorError(f"{path}: Torch-TensorRT {torch_tensorrt.__version__} cannot load this program "
                                  f"({first_line(root_cause(exc))}); its engines run only with the versions and "
                                  "GPU they were built for, so export it again on this machine") from exc
        try:
            description = json.loads(extra[DESCRIPTION_FILE])
            BatchProfile(**description["profile"])
        except (ValueError, TypeError, KeyError) as exc:
            raise CompressorError(f"{path}: no readable {DESCRIPTION_FILE} inside, so it was not written by "
                                  "--target torch-tensorrt; export the model again") from exc
        return cls(module, path, description, precision, threads)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, ...) float32 -> (N, C) float32 logits; N above the profile's max is split."""
        check_input(x, self.path, self.input_shape, self.input_dtype)
        if len(x) == 0:
            return np.empty((0, *self.output_shape[1:]), np.float32)
        pieces = []
        with torch.no_grad():
            for rows in batch_slices(len(x), self.profile.max):
                batch = torch.from_numpy(np.ascontiguousarray(x[rows])).to(self.device)  # (n, ...)
                logits = _single_output(self.module(batch))  # (n, C) on the GPU
                pieces.append(logits.to(torch.float32).cpu().numpy())
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _partition(compiled) -> dict:
    """How the compiled GraphModule runs: TensorRT engines, and submodules Torch-TensorRT left to PyTorch."""
    from torch_tensorrt.dynamo.runtime import TorchTensorRTModule

    children = [child for _, child in compiled.named_children()]
    engines = sum(isinstance(child, TorchTensorRTModule) for child in children)
    return {"tensorrt_engines": engines, "pytorch_submodules": len(children) - engines}


def _save(torch_tensorrt, compiled, path: Path, inputs: list, extra_files: dict) -> None:
    """``torch_tensorrt.save`` into a staging folder beside ``path``, then a rename: a crash leaves no half file.
    (``fileio.atomic_path`` names its temporary ``*.tmp``; ``torch.export.save`` wants the ``.pt2`` suffix.)"""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise CompressorError(f"cannot write {path} ({exc.strerror or exc}); choose another --out") from exc
    try:
        staged = staging / path.name
        with _quiet():
            torch_tensorrt.save(compiled, str(staged), output_format="exported_program", arg_inputs=inputs,
                                extra_files=extra_files)
        os.replace(staged, path)
    except OSError as exc:
        raise CompressorError(f"could not write {path}: {exc.strerror or exc}; free disk space or choose another "
                              "--out") from exc
    except Exception as exc:  # re-export of the compiled graph inside torch_tensorrt.save
        cause = root_cause(exc)
        raise CompressorError(f"Torch-TensorRT could not save {path} ({type(cause).__name__}: "
                              f"{first_line(cause)}); use --target tensorrt") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """Torch-TensorRT's INFO/WARNING log lines and Future/Deprecation/User warnings kept off the user's terminal."""
    log = logging.getLogger("torch_tensorrt")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.simplefilter("ignore", category)
            yield
    finally:
        log.setLevel(level)


def _single_output(output) -> torch.Tensor:
    """The one (N, C) tensor a compiled student returns (a tuple or list of one when the graph was re-exported)."""
    if isinstance(output, (tuple, list)) and len(output) == 1:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise CompressorError(f"the compiled student returned {type(output).__name__}, not one (N, C) tensor")
    return output
