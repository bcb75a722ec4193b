"""Reduced precision for ``--target onnxruntime``: an fp32 ONNX file converted to fp16, or quantized to INT8 (QDQ).

Both steps use ONNX Runtime's own tools rather than hand-written graph surgery (DESIGN.md, ONNX Runtime):

- fp16: ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` stores weights and runs
  arithmetic in float16 while the graph input and output stay float32 (a Cast at each end; int64 token ids stay
  int64), so callers, parity and the serving bundle keep feeding what they fed the fp32 file. The converter
  appends its input Casts at the end of the node list, which ``onnx.checker`` rejects as unsorted; ``OnnxModel.graph_topological_sort`` (same package) puts them first.
- int8: ``quant_pre_process`` (shape inference + ONNX Runtime's basic graph optimisation), then ``quantize_static``
  in QDQ format, calibrated by MinMax on rows of the transfer set (the data the student was distilled on).

numpy, onnx and onnxruntime only: no torch import here. (``quant_pre_process`` loads ``onnxruntime.tools``, which
imports torch itself when it is installed; without torch both conversions run all the same.)
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quant_pre_process, quantize_static)

from compressor.core.errors import CompressorError, first_line
from compressor.core.fileio import atomic_path
from targets.feeds import Feed, by_name, feed_rows, take_rows

FP16_CONVERTER = "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)"
INT8_METHOD = "onnxruntime.quantization.quantize_static"
CALIBRATION_BATCH_SIZE = 64
# MinMax keeps every batch's intermediate outputs in memory until it reduces them; folding them into the running
# min/max every 16 batches gives the same ranges with memory bounded by 16 batches, whatever the calibration size.
MAX_INTERMEDIATE_BATCHES = 16


def convert_fp16(src: Path, dst: Path) -> Path:
    """Write ``dst``: the fp32 ONNX file ``src`` with float16 weights and arithmetic, float32 input and output.

    The result passes ``onnx.checker`` (full check) before it is renamed into place; returns ``dst``.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src, dst = Path(src), Path(dst)
    proto = _load(src)
    try:
        half = convert_float_to_float16(proto, keep_io_types=True)
        OnnxModel.graph_topological_sort(half.graph)  # the converter's input Casts sit last; the checker wants order
    except Exception as exc:  # the converter raises bare ValueError/RuntimeError/KeyError
        raise CompressorError(f"fp16 conversion of {src} failed ({type(exc).__name__}: {first_line(exc)}); "
                              "export with --precision fp32, or report the model") from exc
    with atomic_path(dst) as tmp:
        onnx.save_model(half, tmp)
        _check(tmp, dst, "fp16")
    return dst


def quantize_int8(src: Path, dst: Path, calibration: Feed, batch_size: int = CALIBRATION_BATCH_SIZE,
                  quantize_bias: bool = True) -> dict:
    """Write ``dst``: ``src`` quantized to INT8 (QDQ), activation ranges calibrated on ``calibration``.

    ``calibration`` is (M, ...) rows of the transfer set in the model's input layout, e.g. (512, 1, 8, 8) float32,
    or arrays by input name (a text model's (M, L) int64 token ids); it is fed in consecutive batches of
    ``batch_size`` rows, in order, so the same rows give the same file. ``quantize_bias=False`` keeps biases float32 instead of int32 behind a DequantizeLinear: TensorRT
    dequantizes only int8/fp8/int4/fp4 tensors, so ``--target tensorrt`` turns it off. Returns JSON-safe metadata:
    method, calibration rows, per_channel, activation/weight types, versions.
    """
    src, dst = Path(src), Path(dst)
    specs = _input_specs(src)
    rows = check_calibration(calibration, specs, src)
    # ONNX Runtime's symbolic shape inference cannot follow a text model's sequence axis through its position
    # embeddings (it stops at Min(max_positions, sequence)); ONNX's own shape inference, which still runs, can.
    symbolic = not any(isinstance(d, str) for _, shape in specs for d in shape[1:])
    if batch_size < 1:
        raise CompressorError(f"calibration batch size {batch_size} for {src}: must be at least 1")

    # Choices, each for the GPU path as much as for the CPU:
    # - QDQ (QuantizeLinear/DequantizeLinear pairs around float ops) is the format TensorRT reads for explicit
    #   quantization and the one ORT's CPU kernels are optimised for since 1.11; QOperator is ORT-only.
    # - QInt8 for activations and weights, both symmetric (zero point 0): TensorRT accepts only symmetric int8,
    #   and ORT's docs recommend exactly this for GPU/TensorRT. ActivationSymmetric costs one bit on ReLU outputs
    #   (their negative half is unused); the parity gate measures whether that matters for the student.
    # - per-channel weight scales: one outlier output row no longer coarsens the whole matrix; both ORT and
    #   TensorRT run it, and for small students the accuracy it saves is worth more than its small CPU cost.
    # - reduce_range off: 7-bit weights only avoid u8s8 saturation on pre-VNNI x86 CPUs; with s8 activations and
    #   the accuracy gate checking the result, full 8-bit range is the better default.
    # - MinMax calibration: deterministic and exact over the rows given (Entropy/Percentile histogram and clip).
    options = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8,
               "per_channel": True, "reduce_range": False, "calibrate_method": CalibrationMethod.MinMax,
               "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True,
                                 "CalibMaxIntermediateOutputs": MAX_INTERMEDIATE_BATCHES,
                                 "QuantizeBias": quantize_bias}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as work, atomic_path(dst) as tmp:
        prepared = Path(work) / "prepared.onnx"  # shape-inferred and optimised fp32: an intermediate, not kept
        try:
            with contextlib.chdir(work):  # a failed shape inference leaves its scratch files in the cwd: here
                quant_pre_process(str(src.resolve()), str(prepared), skip_symbolic_shape=not symbolic)
            with _root_log_errors_only():  # per-channel's "axis out of range" for 1-D (LayerNorm) weights: per-tensor
                quantize_static(str(prepared), str(tmp), _BatchReader(rows, batch_size), **options)
        except Exception as exc:  # onnxruntime raises ValueError/RuntimeError/its own Fail types
            raise CompressorError(f"INT8 quantization of {src} failed ({type(exc).__name__}: {first_line(exc)}); "
                                  "export with --precision fp16 or fp32, or report the model") from exc
        _check(tmp, dst, "int8")
    seconds = time.perf_counter() - started

    nodes = [node.op_type for node in onnx.load(str(dst), load_external_data=False).graph.node]
    return {
        "method": INT8_METHOD,
        "preprocess": "onnxruntime.quantization.quant_pre_process",
        "format": "QDQ",
        "calibrate_method": "MinMax",
        "calibration_rows": feed_rows(rows),
        "calibration_batch_size": int(batch_size),
        "per_channel": True,
        "reduce_range": False,
        "activation_type": "QInt8",
        "weight_type": "QInt8",
        "symmetric_activations": True,
        "symmetric_weights": True,
        "quantize_bias": quantize_bias,
        "quantize_linear_nodes": nodes.count("QuantizeLinear"),
        "dequantize_linear_nodes": nodes.count("DequantizeLinear"),
        "seconds": round(seconds, 3),
        "versions": {"onnxruntime": ort.__version__, "onnx": onnx.__version__},
    }


def convert(src: Path, dst: Path, precision: str, calibration: Feed | None, quantize_bias: bool = True) -> dict:
    """Write ``dst``: the fp32 ONNX ``src`` at ``precision`` ("fp16" or "int8"), and return the conversion's record
    (converter, int8 calibration details, seconds, fp32 and converted bytes) for the artifact's metadata."""
    started = time.perf_counter()
    record: dict = {"converter": FP16_CONVERTER if precision == "fp16" else INT8_METHOD}
    if precision == "fp16":
        convert_fp16(src, dst)
    else:
        record.update(quantize_int8(src, dst, calibration, quantize_bias=quantize_bias))
    record.update(seconds=round(time.perf_counter() - started, 3), fp32_bytes=Path(src).stat().st_size,
                  bytes=Path(dst).stat().st_size)
    return record


def check_calibration(calibration: Feed, inputs: list[tuple[str, tuple]], src: Path) -> dict[str, np.ndarray]:
    """``calibration`` by input name, each array C-contiguous (float32, or int64 for integer inputs such as token
    ids), or CompressorError naming ``src`` and the fix.

    ``inputs`` is (name, shape) of each model input, the batch axis first; string or None entries are dynamic.
    """
    named = by_name(calibration, [name for name, _ in inputs], f"the int8 calibration rows for {src}")
    rows = {name: _calibration_array(named[name], name, shape, src) for name, shape in inputs}
    if len({len(array) for array in rows.values()}) > 1:
        raise CompressorError(f"the int8 calibration arrays for {src} hold different numbers of rows; pass the same "
                              "transfer-set rows for every input")
    return rows


def _calibration_array(values, name: str, input_shape: tuple, src: Path) -> np.ndarray:
    expected = "(M, " + ", ".join(str(d) for d in input_shape[1:]) + ")"
    what = "" if name == "input" else f" for input {name!r}"
    try:
        array = np.asarray(values)
        rows = np.ascontiguousarray(array, dtype=np.int64 if array.dtype.kind in "iu" else np.float32)
    except (TypeError, ValueError) as exc:
        raise CompressorError(f"the int8 calibration rows{what} for {src} are not a numeric array ({exc}); pass "
                              f"transfer-set inputs of shape {expected}") from exc
    if rows.ndim >= 1 and len(rows) == 0:
        raise CompressorError(f"the int8 calibration set for {src} is empty; pass at least one transfer-set row "
                              f"of shape {expected}")
    fixed_ok = all(not isinstance(want, int) or want == got for want, got in zip(input_shape[1:], rows.shape[1:]))
    if rows.ndim != len(input_shape) or not fixed_ok:
        raise CompressorError(f"the int8 calibration rows{what} for {src} have shape {rows.shape}, but the model "
                              f"takes {expected}; pass transfer-set inputs in the model's input layout")
    if rows.dtype.kind == "f" and not np.isfinite(rows).all():
        bad = int((~np.isfinite(rows)).sum())
        raise CompressorError(f"the int8 calibration rows for {src} contain {bad} NaN/Inf values; clean the "
                              "transfer set (or drop those rows) before quantizing")
    return rows


class _BatchReader(CalibrationDataReader):
    """Feeds ``{name: rows[name][i:i + batch_size]}`` for consecutive batches, in order, then None."""

    def __init__(self, rows: dict[str, np.ndarray], batch_size: int):
        self.batches = iter([take_rows(rows, slice(start, start + batch_size))  # (≤batch_size, ...) each
                             for start in range(0, feed_rows(rows), batch_size)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def _input_specs(src: Path) -> list[tuple[str, tuple]]:
    """(name, shape) of every graph input of ``src``: ints for fixed axes, strings (or None) for dynamic ones."""
    return [(value.name, tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                               for dim in value.type.tensor_type.shape.dim))
            for value in _load(src).graph.input]


@contextlib.contextmanager
def _root_log_errors_only():
    """The quantizer logs its notes on the root logger; they are not for our users."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _load(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise CompressorError(f"{src}: no such ONNX file; export the model with --precision fp32 first")
    try:
        return onnx.load(str(src))
    except Exception as exc:  # google.protobuf.message.DecodeError and friends
        raise CompressorError(f"{src} is not a readable ONNX file ({first_line(exc)}); export the model again"
                              ) from exc


def _check(tmp: Path, dst: Path, precision: str) -> None:
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CompressorError(f"the {precision} model {dst} fails onnx.checker ({first_line(exc)}); this is a "
                              "converter bug, please report it with the model") from exc
