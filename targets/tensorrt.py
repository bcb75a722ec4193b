"""``--target tensorrt``: the student's ONNX export built into a TensorRT 11 engine (``model.plan``) for this GPU.

``export`` runs three steps, one function each:

1. ``export_graph``: the ONNX graph at the requested precision. fp32 is ``targets.onnx``'s export; fp16 and int8
   convert that file with ``targets.quantize`` (float16 weights and arithmetic; int8 as QDQ calibrated on
   transfer-set rows). Input and output stay float32 in every precision, so callers always feed float32.
2. ``check_graph``: ``targets.tensorrt_preflight`` on that graph, so nodes the parser would reject fail by name
   before a build is attempted.
3. ``build_engine``: ``trt.Builder`` -> network -> ``trt.OnnxParser`` -> one optimisation profile over the batch
   axis (and, for a text model's int64 inputs, the sequence axis up to ``max_sequence`` tokens) ->
   ``build_serialized_network`` -> ``model.plan`` (atomic), with a timing cache read before and saved after.

For fp16/int8 the fp32 graph is built too (``fp32/model.plan``, ``files["fp32_model"]``): the report times what the
precision buys on the same backend, as ``--target onnxruntime`` keeps its fp32 file.

Precision lives in the graph, not in the builder. TensorRT 11 networks are always strongly typed (its
``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` survives only for old code, and is ignored): each layer runs in the
types its tensors have in the ONNX graph, and the FP16/INT8 builder flags and INT8 calibrators are gone. So fp16 is
a float16 graph, int8 a graph with QuantizeLinear/DequantizeLinear pairs, and the builder config names no precision.
Two consequences:

- int8 biases stay float32 (``quantize_int8(quantize_bias=False)``): ONNX Runtime's default stores them as int32
  behind a DequantizeLinear, and TensorRT's dequantize layer takes int8/fp8/int4/fp4 inputs only.
- ``BuilderFlag.TF32`` (on by default) is cleared: it lets float32 matrix products round their inputs to 10-bit
  mantissas, an error the fp32 parity gate (1e-4 of the largest logit) is tight enough to catch.

TensorRT 10 (which the gpu extra still admits) builds weakly typed networks unless asked, so there
``network_flags`` sets STRONGLY_TYPED and both versions build the same typed network.

``tensorrt`` and ``torch`` are imported inside the functions that use them: this module imports, and raises its
one-line errors, on a machine that has neither. ``require_gpu_package`` is the one place that checks.
API reference: the TensorRT 11 Python bindings' docstrings (NVIDIA/TensorRT ``python/docstrings/infer/pyCoreDoc.h``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from compressor.core.errors import CompressorError
from targets.onnx_export import export_onnx, tensor_spec
from targets.base import Artifact
from targets.feeds import Feed, check_array, check_feed, example_specs, feed_rows, is_named, take_rows
from targets.tensorrt_build import (DEFAULT_BATCH_SIZES, BatchProfile, build_engine, choose_profile,
                                     choose_sequence_profile, error_logger, require_gpu_package)

MODEL_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"
SUPPORTED_PRECISIONS = ("fp32", "fp16", "int8")
# TensorRT DataType name -> numpy/torch dtype name, for the engine's I/O tensors
DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "UINT8": "uint8",
               "INT32": "int32", "INT64": "int64", "BOOL": "bool"}


def batch_slices(rows: int, limit: int) -> list[slice]:
    """Consecutive slices covering ``rows`` rows, each at most ``limit`` long: (130, 64) -> [0:64, 64:128, 128:130]."""
    return [slice(start, min(start + limit, rows)) for start in range(0, rows, limit)]


def export(model, example_input, out_dir: Path, precision: str = "fp32", calibration: Feed | None = None,
           batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, timing_cache: str | Path | None = None,
           max_sequence: int | None = None, opt_sequence: int | None = None) -> Artifact:
    """Build ``model`` into ``out_dir/model.plan`` for this GPU at ``precision``; input "input" (N, ...), output
    "logits" (N, C), both float32, for 1 <= N <= the profile's max (``choose_profile(batch_sizes)``).

    ``example_input`` is one batch, e.g. (2, 1, 8, 8) float32, or a dict of (2, L) int64 token ids by input name
    for a text model, whose sequence axis spans 1..``max_sequence`` tokens (required), tuned for ``opt_sequence``
    (default the max). int8 needs ``calibration``: (M, ...) float32 transfer-set rows (arrays by name for a text
    model). ``timing_cache`` defaults to ``out_dir/timing.cache``; pass one path to share kernel timings
    between builds. ``files``: "model" (the plan), "onnx" (the graph it was built from) and, for fp16/int8,
    "fp32_model"/"fp32_onnx". ``metadata``: TensorRT version, GPU, profile, build seconds, timing cache, preflight.
    """
    if precision not in SUPPORTED_PRECISIONS:
        raise CompressorError(f"--precision {precision}: --target tensorrt builds {', '.join(SUPPORTED_PRECISIONS)}; "
                              "choose one of them")
    profile = choose_profile(batch_sizes)
    sequence = None
    if is_named(example_input):
        if max_sequence is None:
            raise CompressorError("--target tensorrt: a text model's engine needs the longest sequence it will take "
                                  "(max_sequence, the teachers' longest input) for its optimisation profile")
        sequence = choose_sequence_profile(max_sequence, opt_sequence)
    out_dir = Path(out_dir)
    if precision == "int8":
        from targets import quantize

        if calibration is None:
            raise CompressorError("--precision int8: int8 needs calibration rows from the transfer set to set its "
                                  "activation ranges; pass calibration=(M, ...) float32 inputs")
        quantize.check_calibration(calibration, example_specs(example_input), out_dir / MODEL_FILE)
    trt = require_gpu_package("tensorrt", "tensorrt")  # before any file is written
    cache = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE_FILE

    graph = export_graph(model, example_input, out_dir / "onnx", precision, calibration)
    preflight = check_graph(graph.files["model"])
    build = build_engine(graph.files["model"], out_dir / MODEL_FILE, profile, cache, sequence)
    files = {"model": out_dir / MODEL_FILE, "onnx": graph.files["model"]}
    metadata = {**graph.metadata, "onnx_file_bytes": graph.metadata["file_bytes"], **build, "preflight": preflight,
                "batch_sizes": [int(size) for size in batch_sizes], "strongly_typed": True, "tf32": False,
                "versions": {**graph.metadata["versions"], "tensorrt": trt.__version__}}
    if precision != "fp32":  # the same graph in fp32, built alike: what the precision buys, on this backend
        check_graph(graph.files["fp32_model"])
        fp32_build = build_engine(graph.files["fp32_model"], out_dir / "fp32" / MODEL_FILE, profile, cache,
                                  sequence)
        files.update(fp32_model=out_dir / "fp32" / MODEL_FILE, fp32_onnx=graph.files["fp32_model"])
        metadata["fp32_engine"] = {key: fp32_build[key] for key in ("build_seconds", "file_bytes", "timing_cache")}
    return Artifact(target="tensorrt", precision=precision, files=files, inputs=graph.inputs, outputs=graph.outputs,
                    metadata=metadata)


def export_graph(model, example_input, out_dir: Path, precision: str, calibration: Feed | None) -> Artifact:
    """The ONNX graph TensorRT will parse, in ``out_dir/model.onnx``; fp16/int8 keep the fp32 export as
    ``files["fp32_model"]`` (``out_dir/fp32/model.onnx``). ``metadata`` is the export's, plus ``conversion``."""
    from targets import quantize
    if precision == "fp32":
        return export_onnx(model, example_input, out_dir, "fp32", target="tensorrt")
    import onnx

    fp32 = export_onnx(model, example_input, out_dir / "fp32", "fp32", target="tensorrt")
    source, path = fp32.files["model"], out_dir / "model.onnx"
    conversion = quantize.convert(source, path, precision, calibration, quantize_bias=False)
    graph = onnx.load(str(path), load_external_data=False).graph
    return Artifact(target="tensorrt", precision=precision, files={"model": path, "fp32_model": source},
                    inputs=[tensor_spec(value) for value in graph.input],
                    outputs=[tensor_spec(value) for value in graph.output],
                    metadata={**fp32.metadata, "file_bytes": conversion["bytes"], "conversion": conversion})


def check_graph(path: Path) -> str:
    """``targets.tensorrt_preflight`` on ``path``: its one-line verdict, or CompressorError with every issue."""
    from targets.tensorrt_preflight import preflight

    result = preflight(path)
    if not result.ok:
        raise CompressorError(f"{result.summary()} (checked {path} before building); change those layers in the "
                              "student, or use --target onnxruntime")
    return result.summary()


def load(artifact: Artifact, threads: int | None = None) -> "TensorRTRunner":
    """A ``TensorRTRunner`` on ``artifact.files["model"]`` (a ``.plan`` built by ``export`` on this kind of GPU).

    ``threads`` is part of the common interface; host threads do not change how a GPU engine runs, so it is only
    checked (at least 1 when given) and recorded.
    """
    check_threads(threads)
    require_gpu_package("tensorrt", "tensorrt")
    return TensorRTRunner(artifact.files["model"], artifact.precision, threads)


class TensorRTRunner:
    """One deserialized engine and its execution context; ``infer`` maps (N, ...) float32 (or a text model's int64
    arrays by input name) to (N, C) float32 logits.

    Buffers are allocated once per input, for the profile's largest shape (max rows, and max tokens for a text
    model): flat pinned host and device tensors from torch, the device ones bound to the engine by address, so a
    smaller batch is a contiguous prefix of them. Each engine call copies its rows into the pinned inputs, enqueues
    H2D copies -> ``execute_async_v3`` -> D2H copy on the runner's own torch CUDA stream (TensorRT synchronises extra
    on the default stream), and waits for that stream: the same stages ``targets.cuda_timing`` times for PyTorch.
    Batches larger than the profile's max run in pieces of at most max rows; the profile is read from the engine.
    """

    def __init__(self, path: str | Path, precision: str = "fp32", threads: int | None = None):
        import torch

        trt = require_gpu_package("tensorrt", "tensorrt")
        self.path = Path(path)
        if not self.path.is_file():
            raise CompressorError(f"{self.path}: no such TensorRT engine; export the model again")
        self.device = torch.device("cuda", torch.cuda.current_device())  # creates the CUDA context TensorRT joins
        self.logger = error_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            reason = "; ".join(self.logger.errors[:2]) or "not a TensorRT engine"
            raise CompressorError(f"{self.path}: TensorRT {trt.__version__} cannot load this engine ({reason}); an "
                                  "engine runs only with the TensorRT version and GPU it was built for, so export "
                                  "it again on this machine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if not inputs or len(outputs) != 1:
            raise CompressorError(f"{self.path}: the engine has inputs {inputs} and outputs {outputs}; compressor "
                                  "runs engines with one output")
        (self.output_name,) = outputs
        # (name, shape, dtype) per input: -1 axes named "batch" (the first) and "sequence"; the profile's max shape
        self.inputs = [(n, tuple(("batch" if i == 0 else "sequence") if d == -1 else d
                                 for i, d in enumerate(self.engine.get_tensor_shape(n))),
                        np.dtype(self._dtype_name(n))) for n in inputs]
        self.max_shapes = {n: tuple(int(d) for d in self.engine.get_tensor_profile_shape(n, 0)[2]) for n in inputs}
        self.input_name, self.input_shape, self.input_dtype = self.inputs[0]
        self.output_shape = tuple(self.engine.get_tensor_shape(self.output_name))  # (-1, C)
        low, opt, high = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.profile = BatchProfile(int(low[0]), int(opt[0]), int(high[0]))

        def buffers(name: str, elements: int) -> tuple:
            dtype = getattr(torch, self._dtype_name(name))
            return (torch.empty(elements, dtype=dtype, pin_memory=True),
                    torch.empty(elements, dtype=dtype, device=self.device))
        self.buffers = {n: buffers(n, int(np.prod(self.max_shapes[n]))) for n in inputs}  # (host, device), flat
        self.host_out, self.device_out = buffers(self.output_name, self.profile.max * int(self.output_shape[1]))
        for name, (_, device_in) in self.buffers.items():
            self.context.set_tensor_address(name, device_in.data_ptr())
        self.context.set_tensor_address(self.output_name, self.device_out.data_ptr())
        self.stream = torch.cuda.Stream(self.device)

        gpu = torch.cuda.get_device_name(self.device)
        described = [{"name": n, "shape": list(shape), "dtype": dtype.name} for n, shape, dtype in self.inputs]
        self.name = f"tensorrt {precision} ({gpu}, batch {self.profile.min}..{self.profile.max})"
        self.info = {
            "device": "cuda",
            "gpu": gpu,
            "threads": threads,
            "profile": self.profile.to_dict(),
            "model_file": str(self.path),
            "input": described[0],
            **({"inputs": described, "max_shapes": {n: list(s) for n, s in self.max_shapes.items()}}
               if len(described) > 1 else {}),
            "versions": {"tensorrt": trt.__version__, "torch": torch.__version__, "numpy": np.__version__},
        }

    def infer(self, x: Feed) -> np.ndarray:
        """(N, ...) array of the engine's input dtype, or arrays by input name -> (N, C) float32 logits; N above the
        profile's max is split."""
        feed = check_feed(x, self.path, self.inputs)
        for name, array in feed.items():
            longest = self.max_shapes[name][1:]
            if any(got > most for got, most in zip(array.shape[1:], longest)):
                raise CompressorError(f"{self.path}: input {name!r} of shape {tuple(array.shape)} exceeds the engine's "
                                      f"profile (at most {list(longest)} after the batch axis); cut the sequences or "
                                      "export again with a larger max_sequence")
        rows = feed_rows(feed)
        if rows == 0:
            return np.empty((0, *self.output_shape[1:]), np.float32)
        pieces = [self._run(take_rows(feed, part)) for part in batch_slices(rows, self.profile.max)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """One engine call on (n, ...) rows per input, 1 <= n <= profile.max; returns a fresh (n, C) float32 array."""
        import torch

        n = feed_rows(feed)
        for name, array in feed.items():
            if not self.context.set_input_shape(name, array.shape):
                raise CompressorError(f"{self.path}: the engine refused input {name!r} of shape {tuple(array.shape)} "
                                      f"(profile batch {self.profile.min}..{self.profile.max}); export it again")
            host_in, _ = self.buffers[name]
            host_in[:array.size].numpy()[...] = array.reshape(-1)  # the previous call synchronised: buffer is free
        out = n * int(self.output_shape[1])
        with torch.cuda.stream(self.stream):
            for name, array in feed.items():
                host_in, device_in = self.buffers[name]
                device_in[:array.size].copy_(host_in[:array.size], non_blocking=True)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                reason = "; ".join(self.logger.errors[-2:]) or "TensorRT logged no error"
                raise CompressorError(f"{self.path}: the engine failed to run a batch of {n} ({reason})")
            self.host_out[:out].copy_(self.device_out[:out], non_blocking=True)
        self.stream.synchronize()
        return self.host_out[:out].numpy().reshape(n, -1).astype(np.float32)  # a copy: the buffer is reused

    def _dtype_name(self, tensor: str) -> str:
        dtype = self.engine.get_tensor_dtype(tensor)
        if dtype.name not in DTYPE_NAMES:
            raise CompressorError(f"{self.path}: tensor '{tensor}' is {dtype.name}, which compressor cannot feed or "
                                  "read; export with float32 (or int64 token) inputs and a float32 output")
        return DTYPE_NAMES[dtype.name]


def check_input(x, path: Path, input_shape: tuple, dtype: np.dtype) -> None:
    """CompressorError naming the expected and actual dtype/shape of a one-input model's input; TensorRT's own
    message is cryptic. ``input_shape`` has "batch" (or any string) for the dynamic axis: ("batch", 1, 8, 8)."""
    check_array(x, path, "input", input_shape, dtype)


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise CompressorError(f"--threads {threads}: must be at least 1 (or left out)")
