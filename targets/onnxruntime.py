"""``--target onnxruntime``: the ONNX export run by an ONNX Runtime session with full graph optimisation.

``OrtRunner`` is also the runner behind ``--target onnx``. Sessions use ``ORT_ENABLE_ALL`` (constant folding,
node fusions, layout transforms) and ``CPUExecutionProvider``, with ``CUDAExecutionProvider`` first when
onnxruntime-gpu provides it. Intra-op threads default to ONNX Runtime's own choice (one per physical core);
``info`` records the count in use so a latency figure can be reproduced.

No torch import at module level: loading and running need only numpy and onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compressor.errors import CompressorError
from targets.base import Artifact

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


def export(model, example_input, out_dir: Path, precision: str = "fp32") -> Artifact:
    """The ONNX export of ``targets.onnx.export``, labelled ``target="onnxruntime"``; only fp32 for now."""
    from targets.onnx import export_onnx

    return export_onnx(model, example_input, out_dir, precision, target="onnxruntime")


def load(artifact: Artifact, threads: int | None = None) -> "OrtRunner":
    """An ``OrtRunner`` on ``artifact.files["model"]``."""
    return OrtRunner.from_path(artifact.files["model"], threads=threads, precision=artifact.precision)


class OrtRunner:
    """One ONNX Runtime session; ``infer`` maps (N, ...) inputs to (N, C) outputs, checking dtype and shape first."""

    def __init__(self, session: ort.InferenceSession, path: Path, threads: int, precision: str = "fp32"):
        self.session = session
        self.path = path
        model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
        self.input_name, self.output_name = model_input.name, model_output.name
        self.input_shape = tuple(model_input.shape)  # e.g. ("batch", 1, 8, 8); ints for fixed axes
        self.input_dtype = np.dtype(_ORT_DTYPES.get(model_input.type, "float32"))
        providers = session.get_providers()
        self.name = f"onnxruntime {precision} ({providers[0]}, {threads} thread{'s' * (threads != 1)})"
        self.info = {
            "providers": providers,
            "device": "cpu" if providers[0] == "CPUExecutionProvider" else "cuda",
            "threads": threads,
            "graph_optimization": "ORT_ENABLE_ALL",
            "model_file": str(path),
            "input": {"name": self.input_name, "shape": list(self.input_shape), "dtype": self.input_dtype.name},
            "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__},
        }

    @classmethod
    def from_path(cls, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32") -> "OrtRunner":
        """Open the .onnx file ``path``; ``threads=None`` lets ONNX Runtime use one thread per physical core."""
        path = Path(path)
        if not path.is_file():
            raise CompressorError(f"{path}: no such ONNX file; export the model again")
        if threads is not None and threads < 1:
            raise CompressorError(f"--threads {threads}: must be at least 1 (or left out for ONNX Runtime's default)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are not for our users
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=session_providers())
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CompressorError(f"ONNX Runtime cannot load {path} ({str(exc).splitlines()[0]}); "
                                  "export the model again") from exc
        return cls(session, path, threads or physical_cores(), precision)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """(N, ...) array of the model's input dtype -> (N, C) float32 logits."""
        self.check_input(x)
        (y,) = self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})
        return y if y.dtype == np.float32 else y.astype(np.float32)

    def check_input(self, x) -> None:
        """Raise CompressorError naming the expected and actual dtype/shape; ONNX Runtime's own message is cryptic."""
        expected = "(" + ", ".join(str(d) for d in self.input_shape) + ")"
        if not isinstance(x, np.ndarray):
            raise CompressorError(f"{self.path}: expected a numpy array of shape {expected}, got {type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise CompressorError(f"{self.path}: expected {self.input_dtype.name} input of shape {expected}, got "
                                  f"{x.dtype.name}; convert with x.astype(np.{self.input_dtype.name})")
        fixed_ok = all(not isinstance(want, int) or want == got for want, got in zip(self.input_shape, x.shape))
        if x.ndim != len(self.input_shape) or not fixed_ok:
            raise CompressorError(f"{self.path}: expected input of shape {expected}, got {tuple(x.shape)}")


def session_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it, then the CPU (always available)."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]


def physical_cores() -> int:
    """Physical cores this process may use: what ONNX Runtime picks for intra-op threads by default (Linux)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cores: set[tuple] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            fields: dict[str, str] = {}
            for line in [*cpuinfo, "\n"]:
                if line.strip():
                    key, _, value = line.partition(":")
                    fields[key.strip()] = value.strip()
                    continue
                if "processor" in fields:
                    cpu = int(fields["processor"])
                    if allowed is None or cpu in allowed:  # hyper-threads share a (package, core) pair
                        cores.add((fields.get("physical id"), fields.get("core id", str(cpu))))
                fields = {}
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1
