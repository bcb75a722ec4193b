"""The fp32 ONNX export every ONNX-based target starts from (``--target onnx``, ``onnxruntime``, ``tensorrt``): one
self-contained file with a dynamic batch axis, checked by ``onnx.checker``, written atomically.

Exporter choice (torch 2.13): ``torch.onnx.export(..., dynamo=True)`` with ``dynamic_shapes`` and
``external_data=False``. It is the exporter PyTorch maintains (the TorchScript one, ``dynamo=False``, warns that
it is deprecated), it names the dynamic axis ``"batch"`` in the graph, and it runs onnxscript's graph optimiser.
We take the in-memory ``ONNXProgram`` (``f=None``) and save its proto ourselves through ``atomic_path``, so the
weights are embedded in ``model.onnx`` (no ``model.onnx.data`` side file) and a failure leaves no partial file.
The exporter's progress lines, its "torchvision is not installed" log lines and its FutureWarnings are kept off
the user's terminal: our own progress is what people read.

A model of named inputs (``example_input`` a dict, e.g. a text classifier's ``input_ids`` and ``attention_mask``)
is called positionally in the dict's order; the graph inputs take the dict's names and dtypes (int64 stays int64),
and every input of two or more axes shares a second dynamic axis ``"sequence"``.

A TorchScript module (a teacher ensemble benchmarked on the target) cannot be traced by torch.export; it goes
through the TorchScript exporter instead (``dynamo=False``), with the same names and dynamic axes.

torch is imported inside ``export_onnx`` only, so serving an ONNX file needs no torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path

from compressor.core.errors import CompressorError, first_line, root_cause
from compressor.core.fileio import atomic_path
from targets.base import Artifact, TensorSpec
from targets.feeds import BATCH_AXIS, SEQUENCE_AXIS, example_specs, is_named

MODEL_FILE = "model.onnx"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
SUPPORTED_PRECISIONS = ("fp32",)


def export_onnx(model, example_input, out_dir: Path, precision: str, target: str) -> Artifact:
    """The shared fp32 ONNX export behind ``--target onnx`` and ``--target onnxruntime``; ``target`` names the artifact.

    Only fp32 is exported here; ``targets.onnxruntime.export`` calls this for its fp32 base file and converts that
    to fp16/int8 itself, so ``--target onnx`` stays a portable fp32 file.
    """
    import onnx
    import onnxscript
    import torch

    if precision not in SUPPORTED_PRECISIONS:
        raise CompressorError(f"--precision {precision}: fp16/int8 export is not available yet for --target {target} "
                              f"(a portable fp32 file); use --precision fp32, or --target onnxruntime for {precision}")
    out_dir = _make_dir(Path(out_dir))
    path = out_dir / MODEL_FILE

    was_training = model.training
    model.eval()  # dropout off, batch norm on its running statistics: the export must be the inference graph
    started = time.perf_counter()
    try:
        proto = _quiet_export(torch, model, example_input)
    except Exception as exc:
        cause = root_cause(exc)
        raise CompressorError(f"ONNX export of {type(model).__name__} failed ({type(cause).__name__}: {first_line(cause)}); "
                              "the model's forward must be traceable by torch.export (run with --debug for details)"
                              ) from exc
    finally:
        model.train(was_training)

    with atomic_path(path) as tmp:
        onnx.save_model(proto, tmp)  # no save_as_external_data: the weights live inside the one file
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise CompressorError(f"the exported {path} fails onnx.checker ({first_line(exc)}); "
                                  "this is an exporter bug, please report it with the model") from exc
    seconds = time.perf_counter() - started

    graph = proto.graph
    metadata = {
        "opset": next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
        "exporter": "torch.onnx.export(dynamo=False)" if isinstance(model, torch.jit.ScriptModule)
                    else "torch.onnx.export(dynamo=True)",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__},
        "export_seconds": round(seconds, 3),
        "file_bytes": path.stat().st_size,
    }
    return Artifact(target=target, precision=precision, files={"model": path},
                    inputs=[tensor_spec(value) for value in graph.input],
                    outputs=[tensor_spec(value) for value in graph.output],
                    metadata=metadata)


def _quiet_export(torch, model, example_input):
    """The ONNX model proto, exported with the exporter's stdout progress, log lines and FutureWarnings held back.

    An ``nn.Module`` goes through the dynamo exporter. A TorchScript module (a teacher ensemble loaded from its
    archive) cannot, because torch.export does not trace ScriptModules; it goes through the TorchScript exporter,
    deprecated but still the one that reads TorchScript, with the same names and dynamic axes.
    """
    names = [name for name, _ in example_specs(example_input)]
    args = tuple(example_input.values()) if is_named(example_input) else (example_input,)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            # the exporter's note that several inputs share the named "batch" / "sequence" axis: as intended
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints", category=UserWarning)
            if isinstance(model, torch.jit.ScriptModule):
                return _torchscript_export(torch, model, args, names, _dynamic_axes(example_input))
            dims = {axis: torch.export.Dim(axis) for axis in (BATCH_AXIS, SEQUENCE_AXIS)}  # shared by every input
            shapes = tuple({i: dims[axis] for i, axis in axes.items()}
                           for axes in _dynamic_axes(example_input).values())
            return torch.onnx.export(model, args, None, input_names=names, output_names=[OUTPUT_NAME], dynamo=True,
                                     external_data=False, dynamic_shapes=shapes, verbose=False,
                                     optimize=True).model_proto
    finally:
        exporter_log.setLevel(level)


def _dynamic_axes(example_input) -> dict[str, dict[int, str]]:
    """Input name -> {axis index: axis name} of its dynamic axes: the batch, and a named input's sequence."""
    return {name: {i: axis for i, axis in enumerate(shape) if isinstance(axis, str)}
            for name, shape in example_specs(example_input)}


def _torchscript_export(torch, model, args: tuple, names: list[str], axes: dict):
    import onnx

    buffer = io.BytesIO()
    warnings.simplefilter("ignore", UserWarning)  # "no signature found for ScriptMethod": expected for TorchScript
    torch.onnx.export(model, args, buffer, input_names=names, output_names=[OUTPUT_NAME], dynamo=False,
                      dynamic_axes={**axes, OUTPUT_NAME: {0: BATCH_AXIS}})
    return onnx.load_from_string(buffer.getvalue())


def tensor_spec(value) -> TensorSpec:
    """A TensorSpec from an ONNX graph input/output; the symbolic batch dimension becomes "batch", other symbolic
    dimensions keep their names ("sequence")."""
    import onnx

    tensor = value.type.tensor_type
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else BATCH_AXIS if index == 0 else dim.dim_param
                  for index, dim in enumerate(tensor.shape.dim))
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return TensorSpec(value.name, shape, dtype)


def _make_dir(out_dir: Path) -> Path:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CompressorError(f"cannot create the export folder {out_dir} ({exc.strerror or exc}); "
                              "choose another --out") from exc
    return out_dir
