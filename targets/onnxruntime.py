"""``--target onnxruntime``: the ONNX export run by an ONNX Runtime session with full graph optimisation.

``--precision fp32`` is the ONNX export itself. ``fp16`` and ``int8`` export that fp32 file to ``fp32/model.onnx``
(kept: the report times it beside the converted model) and convert it into ``model.onnx`` with ONNX Runtime's own
tools (``targets.quantize``): fp16 weights and arithmetic, or static INT8 in QDQ format calibrated on transfer-set
rows. Every precision keeps the fp32 export's input and output types (float32, or a text model's int64 token
ids), so callers feed the same arrays whatever was exported.

``OrtRunner`` is also the runner behind ``--target onnx``. Sessions use ``ORT_ENABLE_ALL`` (constant folding,
node fusions, layout transforms). The execution provider is ``--ort-provider``: ``auto`` puts
``CUDAExecutionProvider`` first when onnxruntime-gpu provides it, then the CPU; ``cpu``, ``cuda`` and ``tensorrt``
ask for one (``tensorrt``: ONNX Runtime's TensorRT provider, which builds and caches an engine beside the model on
first use; CUDA and the CPU stay behind it for the nodes TensorRT does not take). Intra-op threads default to ONNX
Runtime's own choice (one per physical core); ``info`` records the count and providers in use so a latency figure
can be reproduced.

No torch import at module level: loading and running need only numpy and onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compressor.core.errors import CompressorError, MissingCapabilityError, first_line
from targets.onnx_export import export_onnx, tensor_spec
from targets.base import Artifact
from targets.feeds import Feed, check_feed, example_specs

_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}


SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8")
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                   "tensorrt": "TensorrtExecutionProvider"}
TRT_CACHE_DIR = "ort-tensorrt-cache"  # beside the model: engines and timing caches of ONNX Runtime's TensorRT EP


def export(model, example_input, out_dir: Path, precision: str = "fp32",
           calibration: np.ndarray | None = None) -> Artifact:
    """Export ``model`` to ``out_dir/model.onnx`` at ``precision``; input "input" (N, ...) (or the example dict's
    names), output "logits" (N, C).

    fp32 is ``targets.onnx``'s export. fp16/int8 write the fp32 export to ``out_dir/fp32/model.onnx`` first
    (``files["fp32_model"]``) and convert it into ``out_dir/model.onnx`` (``files["model"]``). int8 needs
    ``calibration``: (M, ...) float32 transfer-set rows in the input layout, e.g. (512, 1, 8, 8), or arrays by input
    name for a model of named inputs. ``metadata``
    gains ``conversion``: the converter, its seconds, fp32 and converted bytes (and the int8 calibration details).
    """
    if precision not in SUPPORTED_PRECISIONS:
        raise CompressorError(f"--precision {precision}: --target onnxruntime exports "
                              f"{', '.join(SUPPORTED_PRECISIONS)}; choose one of them")
    if precision == "fp32":
        return export_onnx(model, example_input, out_dir, precision, target="onnxruntime")
    import onnx

    from targets import quantize  # onnxruntime.quantization and .transformers load only when converting

    out_dir = Path(out_dir)
    if precision == "int8":
        if calibration is None:
            raise CompressorError("--precision int8: int8 needs calibration rows from the transfer set to set its "
                                  "activation ranges; pass calibration=(M, ...) float32 inputs")
        # Bad rows fail here, before the export is spent: the example batch has the model's input layout.
        quantize.check_calibration(calibration, example_specs(example_input), out_dir / "model.onnx")

    fp32 = export_onnx(model, example_input, out_dir / "fp32", "fp32", target="onnxruntime")
    source, path = fp32.files["model"], out_dir / "model.onnx"
    conversion = quantize.convert(source, path, precision, calibration)

    graph = onnx.load(str(path), load_external_data=False).graph
    metadata = {**fp32.metadata, "file_bytes": conversion["bytes"], "conversion": conversion}
    metadata["versions"] = {**fp32.metadata["versions"], "onnxruntime": ort.__version__}
    return Artifact(target="onnxruntime", precision=precision, files={"model": path, "fp32_model": source},
                    inputs=[tensor_spec(value) for value in graph.input],
                    outputs=[tensor_spec(value) for value in graph.output],
                    metadata=metadata)


def load(artifact: Artifact, threads: int | None = None, provider: str = "auto") -> "OrtRunner":
    """An ``OrtRunner`` on ``artifact.files["model"]`` with the execution provider ``provider`` (PROVIDER_CHOICES)."""
    return OrtRunner.from_path(artifact.files["model"], threads=threads, precision=artifact.precision,
                               provider=provider)


class OrtRunner:
    """One ONNX Runtime session; ``infer`` maps (N, ...) inputs (one array, or arrays by input name) to (N, C)
    outputs, checking names, dtypes and shapes first."""

    def __init__(self, session: ort.InferenceSession, path: Path, threads: int, precision: str = "fp32"):
        self.session = session
        self.path = path
        # (name, shape, dtype) of every input in the graph's order; shape e.g. ("batch", 1, 8, 8), ints for fixed axes
        self.inputs = [(i.name, tuple(i.shape), np.dtype(_ORT_DTYPES.get(i.type, "float32")))
                       for i in session.get_inputs()]
        self.input_name, self.input_shape, self.input_dtype = self.inputs[0]
        self.output_name = session.get_outputs()[0].name
        providers = session.get_providers()
        self.name = f"onnxruntime {precision} ({providers[0]}, {threads} thread{'s' * (threads != 1)})"
        described = [{"name": name, "shape": list(shape), "dtype": dtype.name} for name, shape, dtype in self.inputs]
        self.info = {
            "providers": providers,
            "device": "cpu" if providers[0] == "CPUExecutionProvider" else "cuda",
            "threads": threads,
            "graph_optimization": "ORT_ENABLE_ALL",
            "model_file": str(path),
            "input": described[0],
            **({"inputs": described} if len(described) > 1 else {}),
            "versions": {"onnxruntime": ort.__version__, "numpy": np.__version__},
        }

    @classmethod
    def from_path(cls, path: str | os.PathLike, threads: int | None = None, precision: str = "fp32",
                  provider: str = "auto") -> "OrtRunner":
        """Open the .onnx file ``path``; ``threads=None`` lets ONNX Runtime use one thread per physical core."""
        path = Path(path)
        providers = session_providers(provider, path.parent / TRT_CACHE_DIR)
        if not path.is_file():
            raise CompressorError(f"{path}: no such ONNX file; export the model again")
        if threads is not None and threads < 1:
            raise CompressorError(f"--threads {threads}: must be at least 1 (or left out for ONNX Runtime's default)")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
        options.log_severity_level = 3  # errors only: its warnings about unused initializers are not for our users
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise CompressorError(f"ONNX Runtime cannot load {path} ({first_line(exc)}); "
                                  "export the model again") from exc
        return cls(session, path, threads or physical_cores(), precision)

    def infer(self, x: Feed) -> np.ndarray:
        """(N, ...) array of the model's input dtype, or arrays by input name -> (N, C) float32 logits."""
        feed = self.check_input(x)
        (y,) = self.session.run([self.output_name], {name: np.ascontiguousarray(a) for name, a in feed.items()})
        return y if y.dtype == np.float32 else y.astype(np.float32)

    def check_input(self, x: Feed) -> dict[str, np.ndarray]:
        """``x`` by input name, or CompressorError naming the expected and actual names, dtypes and shapes; ONNX
        Runtime's own message is cryptic."""
        return check_feed(x, self.path, self.inputs)


def check_provider(choice: str) -> None:
    """Refuse, in one line, an ``--ort-provider`` this onnxruntime build lacks (exit code 2), before any work."""
    if choice not in PROVIDER_CHOICES:
        raise CompressorError(f"--ort-provider {choice}: choose one of {', '.join(PROVIDER_CHOICES)}")
    available = ort.get_available_providers()
    if choice != "auto" and PROVIDER_NAMES[choice] not in available:
        raise MissingCapabilityError(
            f"--ort-provider {choice}: this onnxruntime {ort.__version__} offers {', '.join(available)} only; "
            f"install onnxruntime-gpu (the gpu extra) with CUDA{' and TensorRT' * (choice == 'tensorrt')} "
            f"libraries on a GPU machine, or use --ort-provider auto")


def session_providers(choice: str = "auto", trt_cache: Path | None = None) -> list:
    """The providers list for a session: ``auto`` is CUDA first when this build has it, then the CPU; ``cpu``,
    ``cuda`` and ``tensorrt`` name one, each with the ones below it behind for the nodes it does not take.
    TensorRT's engines and timing cache are kept in ``trt_cache``, so a second session starts without a build."""
    check_provider(choice)
    available = ort.get_available_providers()
    if choice == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    chain = {"cpu": ["cpu"], "cuda": ["cuda", "cpu"], "tensorrt": ["tensorrt", "cuda", "cpu"]}[choice]
    providers: list = [PROVIDER_NAMES[name] for name in chain if PROVIDER_NAMES[name] in available]
    if choice == "tensorrt":
        cache = str(trt_cache or Path(TRT_CACHE_DIR))
        providers[0] = ("TensorrtExecutionProvider", {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                                      "trt_timing_cache_enable": True, "trt_timing_cache_path": cache})
    return providers


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
