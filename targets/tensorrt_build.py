"""Building a TensorRT 11 engine from an ONNX file with TensorRT's own builder API: the optimisation profile over
the batch sizes the benchmark will send, the network flags, parser errors in one line, the timing cache, and the
serialized plan written atomically. ``targets.tensorrt`` (the ``--target tensorrt`` module) calls
:func:`build_engine`; the profile helpers are shared with ``targets.torch_tensorrt``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from types import ModuleType

from compressor.core.errors import CompressorError, MissingCapabilityError, first_line
from compressor.core.fileio import atomic_path
from targets.bundle import TRITON_MAX_BATCH

DEFAULT_BATCH_SIZES = (1, 64)
# The profile's max is at least 64 and at least the largest requested size, which is the bundle's Triton
# max_batch_size, so config.pbtxt can send it full batches.
MIN_PROFILE_MAX = TRITON_MAX_BATCH


@dataclass(frozen=True)
class BatchProfile:
    """The batch axis of an engine's one optimisation profile: it runs min <= N <= max rows, tuned for opt rows."""

    min: int
    opt: int
    max: int

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def choose_profile(batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> BatchProfile:
    """The profile for the batch sizes a user will send, e.g. ``(1, 8, 64, 256)`` -> min 1, opt 64, max 256.

    - min is always 1: a runner splits a large batch into pieces of at most max rows, and the last piece can be
      any size, so every size from 1 must run.
    - opt is the upper median of the requested sizes, repeats counted (``(1, 1, 1, 64)`` -> 1): TensorRT picks its
      kernels by timing this shape, so it sits in the middle of what will be sent, and a size sent often wins.
    - max is the largest requested size (the bundle's Triton max_batch_size) and at least ``MIN_PROFILE_MAX`` (64).
    """
    sizes = sorted(_check_batch_sizes(batch_sizes))
    return BatchProfile(min=1, opt=sizes[len(sizes) // 2], max=max(sizes[-1], MIN_PROFILE_MAX))


def require_gpu_package(package: str, target: str) -> ModuleType:
    """The imported ``package`` ("tensorrt", "torch_tensorrt") once a CUDA GPU and the package are both here.

    Otherwise MissingCapabilityError (exit code 2), one line naming what is missing and the three ways out. The
    package is imported only when a GPU is visible, so a machine without one never pays for (or sees) its import.
    """
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append(f"a CUDA GPU (torch {torch.__version__} sees none)")
    if importlib.util.find_spec(package) is None:
        missing.append(f"the {package} package")
    elif not missing:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # torch_tensorrt prints its import failures
                return importlib.import_module(package)
        except Exception as exc:  # a broken install: ImportError, OSError from a missing libnvinfer, or plain Exception
            missing.append(f"a working {package} package ({type(exc).__name__}: {first_line(exc)})")
    raise MissingCapabilityError(
        f"--target {target} needs an NVIDIA GPU with CUDA and the {package} package, and this machine lacks "
        f"{' and '.join(missing)}; install compressor with the gpu extra on a CUDA machine (pip install -e '.[gpu]'), "
        "run the Docker image (docker build -t compressor .), or use --target onnxruntime on the CPU")


def network_flags(trt: ModuleType) -> int:
    """``create_network`` flags: none on TensorRT 11 (always strongly typed), STRONGLY_TYPED on TensorRT 10."""
    if int(str(trt.__version__).split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def describe_parser_errors(parser) -> str:
    """Every error ``trt.OnnxParser`` recorded, one clause each: "node 'fc1' (Gemm): <description>"."""
    clauses = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node, op_type = error.node_name(), error.node_operator()
        text = " ".join(str(error.desc()).split())  # one line, whatever the parser's layout
        clauses.append(f"node '{node}' ({op_type}): {text}" if node else text)
    return "; ".join(clauses) or "the parser recorded no error"


def build_engine(onnx_path: Path, plan_path: Path, profile: BatchProfile, timing_cache: Path,
                 sequence: BatchProfile | None = None) -> dict:
    """Parse ``onnx_path``, build it for the current GPU with one optimisation profile over the batch axis (and a
    text model's ``sequence`` axis), and write the serialized engine to ``plan_path``. The timing cache at
    ``timing_cache`` is loaded when present and saved after the build (both atomically). Returns the build record:
    seconds, bytes, profile shapes, GPU, cache."""
    import torch

    trt = require_gpu_package("tensorrt", "tensorrt")
    logger = error_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise CompressorError(f"TensorRT {trt.__version__}'s ONNX parser rejected {onnx_path}: "
                              f"{describe_parser_errors(parser)}; change those layers in the student, or use "
                              "--target onnxruntime")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)  # float32 layers stay float32 (see the module docstring)
    shapes = add_profile(builder, config, network, profile, onnx_path, sequence)
    cache, cache_record = attach_timing_cache(config, timing_cache)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        reason = "; ".join(logger.errors[:3]) or "TensorRT logged no error"
        raise CompressorError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path} on "
                              f"{torch.cuda.get_device_name()} ({reason}); use --target onnxruntime, or report "
                              "the model")
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(serialized)  # IHostMemory is a buffer
    saved = cache.serialize()
    with atomic_path(timing_cache) as tmp:
        tmp.write_bytes(saved)
    major, minor = torch.cuda.get_device_capability()
    return {
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "profile": profile.to_dict(),
        **({"sequence_profile": sequence.to_dict()} if sequence is not None else {}),
        "profile_shapes": shapes,
        "build_seconds": round(seconds, 3),
        "file_bytes": plan_path.stat().st_size,
        "timing_cache": {**cache_record, "saved_bytes": memoryview(saved).nbytes},
    }


def error_logger(trt: ModuleType):
    """A ``trt.ILogger`` that keeps errors for our messages and drops warnings and info (not for our users).
    It must outlive every builder, runtime and engine made with it."""

    class ErrorLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(" ".join(str(msg).split()))

    return ErrorLogger()


def add_profile(builder, config, network, profile: BatchProfile, onnx_path: Path,
                sequence: BatchProfile | None = None) -> dict:
    """Add one optimisation profile: every input's batch axis (-1 in the network) spans profile.min..max, and the
    second axis of a text model's inputs (-1 too) spans ``sequence``.min..max tokens."""
    optimisation = builder.create_optimization_profile()
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        dims = tuple(tensor.shape)  # (-1, C, H, W): -1 marks the dynamic batch axis; (-1, -1) for token ids
        has_sequence = len(dims) > 1 and dims[1] == -1
        if not dims or dims[0] != -1 or -1 in dims[1 + has_sequence:]:
            raise CompressorError(f"{onnx_path}: input '{tensor.name}' has shape {list(dims)}, but the engine needs a "
                                  "dynamic batch axis (and at most a dynamic sequence axis after it) and fixed other "
                                  "axes; export the model again")
        if has_sequence and sequence is None:
            raise CompressorError(f"{onnx_path}: input '{tensor.name}' has a dynamic sequence axis, and no longest "
                                  "sequence was given for the engine's profile; pass max_sequence (the teachers' "
                                  "longest input)")
        axes = [profile] + [sequence] * has_sequence  # the dynamic axes, in order
        low, opt, high = ((*(getattr(axis, bound) for axis in axes), *dims[1 + has_sequence:])
                          for bound in ("min", "opt", "max"))
        optimisation.set_shape(tensor.name, low, opt, high)
        shapes[tensor.name] = {"min": list(low), "opt": list(opt), "max": list(high)}
    config.add_optimization_profile(optimisation)
    return shapes


def choose_sequence_profile(max_sequence: int, opt_sequence: int | None = None) -> BatchProfile:
    """The token axis of a text model's profile: 1..max_sequence, tuned for ``opt_sequence`` (default the max)."""
    if isinstance(max_sequence, bool) or not isinstance(max_sequence, Integral) or max_sequence < 1:
        raise CompressorError(f"max_sequence {max_sequence!r}: give the longest input in tokens, at least 1")
    opt = max_sequence if opt_sequence is None else min(max(1, int(opt_sequence)), int(max_sequence))
    return BatchProfile(min=1, opt=opt, max=int(max_sequence))


def attach_timing_cache(config, path: Path) -> tuple[object, dict]:
    """Give ``config`` the timing cache stored at ``path``, or a new one when there is none or it is unusable
    (written by another TensorRT version or for another GPU: TensorRT refuses those, so the build starts afresh)."""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError as exc:
        raise CompressorError(f"cannot read the timing cache {path} ({exc.strerror or exc}); delete it or pass "
                              "another timing_cache") from exc
    record: dict = {"path": str(path), "loaded_bytes": len(data)}
    cache = None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # the bindings raise their own error types for a malformed cache
            cache = None
        if cache is None or not config.set_timing_cache(cache, False):
            record.update(loaded_bytes=0, note="the cache there was written by another TensorRT or GPU; replaced")
            cache = None
    if cache is None:
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache, record


def _check_batch_sizes(batch_sizes: Sequence[int]) -> list[int]:
    sizes = list(batch_sizes) if isinstance(batch_sizes, Sequence) else []
    if not sizes or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sizes):
        raise CompressorError(f"batch sizes {batch_sizes!r}: give one or more whole numbers of at least 1, "
                              "e.g. (1, 64); they set the engine's optimisation profile")
    return [int(s) for s in sizes]
