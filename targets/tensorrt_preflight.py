"""Will this ONNX file build with TensorRT 11? A static check that runs on a laptop without a GPU or TensorRT.

``preflight(path)`` reads the graph and returns either "will build" or every node and tensor that would stop
compressor's TensorRT 11 build, each with one sentence saying what to change. It checks:

- the ``ai.onnx`` opset is within the range the parser supports (9 to 24), and every node is in that domain:
  a contrib op (``com.microsoft``), an ``ai.onnx.ml`` op or a TensorRT custom op (``trt``) needs a plugin or a
  parser feature this check does not model, so it is flagged;
- every op type is in the parser's operator table (below), descending into ``If``/``Loop``/``Scan`` bodies and
  model-local functions;
- graph inputs, outputs and initializers have element types the parser can convert (float64 is flagged as well:
  the parser narrows it to float32, so the engine would not take the float64 tensors the graph declares);
- only the leading (batch) axis of each input may be symbolic: the engine is built with one optimisation profile
  over the batch axis, so a symbolic non-batch axis has no profile;
- three of the parser's own static checks that matter for MLP/CNN students: ``BatchNormalization`` in training
  mode, ``Dropout`` with a training-mode input that is not a constant False, and pooling with dilations or with
  ``MaxPool``'s ``Indices`` output; and one of the builder's: a ``DequantizeLinear`` of an int32 constant (ONNX
  Runtime's quantized bias), which TensorRT's dequantize layer (int8/fp8/int4/fp4 inputs) cannot take.

What it cannot know without a GPU: whether the builder finds a tactic (kernel) for every layer on the actual GPU,
whether the build fits in GPU memory or the workspace, which plugins are registered (so every non-standard domain
is flagged, even where a plugin might exist), and shape errors that only appear when the parser propagates
concrete shapes. A clean preflight means the parser will accept the graph, not that the engine is fast or exact.

Source of the tables: ``docs/operators.md`` of onnx/onnx-tensorrt as shipped for TensorRT 10.15 ("opset 9 to opset
24"), plus the ``Swish`` importer that the TensorRT 11.0 release notes add; the element types are those the
parser's ``convertDtype`` (``importerUtils.cpp``) maps; the three restrictions follow ``onnxOpCheckers.cpp`` and the
``Dropout`` importer. TensorRT 11.5 also parses opset 25; this check keeps to 24 so that "will build" holds for
every 11.x release. Only onnx, numpy and the standard library are imported here: no tensorrt, no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from compressor.core.errors import CompressorError
from targets.feeds import SEQUENCE_AXIS

TENSORRT = "TensorRT 11"

# The ai.onnx opsets TensorRT's ONNX parser supports: onnx-tensorrt docs/operators.md for TensorRT 10.15 ("inclusive
# range of opset 9 to opset 24"). The NVIDIA/TensorRT v11.5 release notes add opset 25, so 11.0-11.4 stop at 24.
MIN_OPSET = 9
MAX_OPSET = 24

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# Ops marked "Y" in onnx-tensorrt docs/operators.md (TensorRT 10.15), plus Swish (added by the TensorRT 11.0 parser).
SUPPORTED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "Attention",
    "AveragePool", "BatchNormalization", "BlackmanWindow", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat",
    "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten",
    "Floor", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "GRU", "HammingWindow",
    "HannWindow", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If", "ImageScaler", "InstanceNormalization",
    "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LRN",
    "LSTM", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool", "Mean", "MeanVarianceNormalization", "Min",
    "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not", "OneHot", "Or", "Pad", "ParametricSoftplus",
    "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence",
    "RMSNormalization", "RNN", "RoiAlign", "RotaryEmbedding", "Round", "STFT", "ScaledTanh", "Scan", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Swish", "Tan",
    "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample",
    "Where", "Xor",
})

# Ops marked "N" in the same table: named separately so the message can say the table rejects them outright.
UNSUPPORTED_OPS = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "CenterCropPad",
    "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear", "ImageDecoder",
    "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss",
    "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
    "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer", "StringSplit",
    "TfIdfVectorizer", "Unique",
})

# Element types the parser's convertDtype maps to a TensorRT type (onnx-tensorrt importerUtils.cpp). DOUBLE is in
# that map only as a narrowing to FLOAT, so it is flagged on its own below; anything else is rejected by the parser.
SUPPORTED_DTYPES = frozenset({
    TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT8, TensorProto.UINT8,
    TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT8E4M3FN, TensorProto.INT4,
    TensorProto.FLOAT4E2M1,
})

POOLING_OPS = frozenset({"MaxPool", "AveragePool", "LpPool"})
SUMMARY_OPS = 6  # op types listed in a passing summary
SUMMARY_ISSUES = 5  # issues spelled out in a failing summary
SUMMARY_TENSORS = 6  # tensors named in one dtype issue


@dataclass
class PreflightIssue:
    """One reason the graph will not build: ``node`` is None for graph-level issues (opset, inputs, dtypes)."""

    node: str | None  # node name (the first output's name when the node has none, as the parser does)
    op_type: str | None
    message: str  # one sentence a person can act on

    def __str__(self) -> str:
        if self.node is None:
            return self.message
        return f"node '{self.node}' ({self.op_type}): {self.message}"

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "message": self.message}


@dataclass
class PreflightResult:
    """What ``preflight`` found: the graph's size and shape, and every issue (none means it will build)."""

    model: str  # the ONNX file, as given (or "<in-memory model>")
    opset: int  # the ai.onnx opset; 0 when the model declares none
    nodes: int  # top-level nodes
    op_types: dict[str, int]  # op -> count, top-level nodes, most frequent first
    issues: list[PreflightIssue]
    inputs: dict[str, list[int | str]] = field(default_factory=dict)  # graph input -> shape, symbolic axes by name

    @property
    def ok(self) -> bool:
        return not self.issues

    def summary(self) -> str:
        """One line: "model.onnx will build with TensorRT 11: 5 nodes (Conv ×1, ...), opset 20, dynamic batch 1..N",
        or "model.onnx will NOT build with TensorRT 11: node 'X' (Op): reason; ... (N issues)".
        """
        name = Path(self.model).name or self.model
        if self.ok:
            ops = ", ".join(f"{op} ×{count}" for op, count in list(self.op_types.items())[:SUMMARY_OPS])
            more = ", ..." if len(self.op_types) > SUMMARY_OPS else ""
            return (f"{name} will build with {TENSORRT}: {self.nodes} nodes ({ops}{more}), opset {self.opset}, "
                    f"{self._batch_text()}")
        shown = "; ".join(str(issue) for issue in self.issues[:SUMMARY_ISSUES])
        more = "; ..." if len(self.issues) > SUMMARY_ISSUES else ""
        count = f"{len(self.issues)} issue{'s' if len(self.issues) != 1 else ''}"
        return f"{name} will NOT build with {TENSORRT}: {shown}{more} ({count})"

    def to_dict(self) -> dict:
        """A JSON-safe copy for ``report.json``."""
        return {
            "model": self.model,
            "tensorrt": TENSORRT,
            "ok": self.ok,
            "opset": self.opset,
            "nodes": self.nodes,
            "op_types": dict(self.op_types),
            "inputs": {name: list(shape) for name, shape in self.inputs.items()},
            "issues": [issue.to_dict() for issue in self.issues],
            "summary": self.summary(),
        }

    def _batch_text(self) -> str:
        leading = {shape[0] for shape in self.inputs.values() if shape}
        if not leading:
            return "no batch axis"
        if any(isinstance(dim, str) for dim in leading):
            return "dynamic batch 1..N"
        return "fixed batch " + "/".join(str(dim) for dim in sorted(leading))


def preflight(model: str | Path | onnx.ModelProto) -> PreflightResult:
    """Check, without TensorRT or a GPU, whether TensorRT 11's ONNX parser will accept ``model``.

    ``model`` is a path to an ONNX file (external weights are not read: only the graph is needed) or a loaded
    ``ModelProto``. Raises ``CompressorError`` when the file does not exist or is not an ONNX model.

    >>> result = preflight("out/model.onnx")   # doctest: +SKIP
    >>> print(result.summary())                 # doctest: +SKIP
    model.onnx will build with TensorRT 11: 5 nodes (Conv ×1, Relu ×1, ...), opset 20, dynamic batch 1..N
    """
    if isinstance(model, onnx.ModelProto):
        proto, name = model, "<in-memory model>"
    else:
        proto, name = _load(Path(model)), str(model)

    graph = proto.graph
    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    opset = next((opsets[domain] for domain in ("", "ai.onnx") if domain in opsets), 0)
    functions = {(function.domain, function.name): function for function in proto.functions}
    issues = _check_opset(opset)
    issues += _check_inputs(graph)
    issues += _check_dtypes(graph)
    issues += _check_nodes(graph.node, functions, _constants(graph), opset, seen_functions=set())

    op_types = dict(Counter(node.op_type for node in graph.node).most_common())
    return PreflightResult(model=name, opset=opset, nodes=len(graph.node), op_types=op_types, issues=issues,
                           inputs={value.name: _shape(value) for value in _graph_inputs(graph)})


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CompressorError(f"{path} {what}; pass the model.onnx that --target onnx wrote")
    try:
        proto = onnx.load(str(path), load_external_data=False)  # the graph is all we read; weights may be large
    except Exception as exc:  # protobuf's DecodeError and friends: the bytes are not a ModelProto
        raise CompressorError(f"{path} is not an ONNX model ({type(exc).__name__}); pass the model.onnx that "
                              "--target onnx wrote") from exc
    if proto.ir_version <= 0 or not proto.HasField("graph"):  # protobuf parses many non-ONNX bytes as an empty model
        raise CompressorError(f"{path} is not an ONNX model (it has no IR version or no graph); pass the model.onnx "
                              "that --target onnx wrote")
    return proto


def _check_opset(opset: int) -> list[PreflightIssue]:
    supported = f"{TENSORRT}'s parser supports ai.onnx opset {MIN_OPSET}..{MAX_OPSET}"
    if opset == 0:
        message = f"the model imports no ai.onnx opset and {supported}; re-export with opset_version={MAX_OPSET}"
    elif opset < MIN_OPSET:
        message = (f"opset {opset} is too old: {supported}; re-export with opset_version={MAX_OPSET} or convert it "
                   "with onnx.version_converter")
    elif opset > MAX_OPSET:
        message = (f"opset {opset} is too new: {supported} (opset 25 from TensorRT 11.5); re-export with "
                   f"opset_version={MAX_OPSET}")
    else:
        return []
    return [PreflightIssue(None, None, message)]


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """The real inputs: old exporters also list every initializer as a graph input."""
    initializers = {tensor.name for tensor in graph.initializer}
    return [value for value in graph.input if value.name not in initializers]


def _shape(value: onnx.ValueInfoProto) -> list[int | str]:
    """(N, C, H, W) as ints, symbolic axes by name ("?" when unnamed)."""
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?") for dim in dims]


def _check_inputs(graph: onnx.GraphProto) -> list[PreflightIssue]:
    issues = []
    for value in _graph_inputs(graph):
        if not value.type.HasField("tensor_type"):
            issues.append(PreflightIssue(None, None, f"input '{value.name}' is not a tensor (a sequence, map or "
                                                     "optional); TensorRT engines take tensors only"))
            continue
        if not value.type.tensor_type.HasField("shape"):
            issues.append(PreflightIssue(None, None, f"input '{value.name}' has no shape; re-export with a static "
                                                     "shape except for the batch axis"))
            continue
        for axis, dim in enumerate(_shape(value)[1:], start=1):
            # axis 0 may be symbolic (the profile's batch axis), and a text model's axis 1 (its sequence axis)
            if isinstance(dim, str) and not (axis == 1 and dim == SEQUENCE_AXIS):
                issues.append(PreflightIssue(None, None, f"input '{value.name}' axis {axis} is symbolic ('{dim}'), "
                                                         "but only the batch axis (0) and a text model's sequence "
                                                         "axis (1) get an optimisation profile; re-export with that "
                                                         "axis fixed"))
    return issues


def _check_dtypes(graph: onnx.GraphProto) -> list[PreflightIssue]:
    """One issue per unsupported element type, naming its tensors: inputs and outputs first, then initializers."""
    tensors = [("input", value.name, value.type.tensor_type.elem_type)
               for value in _graph_inputs(graph) if value.type.HasField("tensor_type")]
    tensors += [("output", value.name, value.type.tensor_type.elem_type)
                for value in graph.output if value.type.HasField("tensor_type")]
    tensors += [("initializer", tensor.name, tensor.data_type) for tensor in graph.initializer]
    by_type: dict[int, list[str]] = {}
    for kind, name, elem_type in tensors:
        if elem_type not in SUPPORTED_DTYPES:
            by_type.setdefault(elem_type, []).append(f"{kind} '{name}'")
    return [PreflightIssue(None, None, _dtype_message(elem_type, names)) for elem_type, names in by_type.items()]


def _dtype_message(elem_type: int, names: list[str]) -> str:
    shown = ", ".join(names[:SUMMARY_TENSORS]) + (f" and {len(names) - SUMMARY_TENSORS} more"
                                                  if len(names) > SUMMARY_TENSORS else "")
    one = len(names) == 1
    if elem_type == TensorProto.DOUBLE:
        return (f"{shown} {'is' if one else 'are'} float64, which TensorRT lacks: the parser narrows "
                f"{'it' if one else 'them'} to float32 (clamping to ±FLT_MAX), so the engine would not match this "
                "graph; export the student in float32")
    type_name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
    return (f"{shown} {'has' if one else 'have'} element type {type_name}, which TensorRT cannot represent; "
            "cast to float32, int32 or int64 before export")


def _constants(graph: onnx.GraphProto | onnx.FunctionProto) -> dict[str, TensorProto]:
    """Tensors whose values the parser knows at import time: initializers and ``Constant`` node outputs."""
    constants = {tensor.name: tensor for tensor in getattr(graph, "initializer", ())}  # a function has none
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
            value = next((attribute for attribute in node.attribute if attribute.name.startswith("value")), None)
            if value is not None and value.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.INT,
                                                    onnx.AttributeProto.FLOAT):
                constants[node.output[0]] = (value.t if value.type == onnx.AttributeProto.TENSOR else
                                             numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(value))))
    return constants


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or (node.output[0] if node.output else f"#{index}")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _check_nodes(nodes, functions: dict, constants: dict[str, TensorProto], opset: int,
                 seen_functions: set) -> list[PreflightIssue]:
    """Issues for ``nodes``, walking into If/Loop/Scan bodies and model-local functions (each function once)."""
    issues = []
    for index, node in enumerate(nodes):
        name = _node_name(node, index)
        key = (node.domain, node.op_type)
        if key in functions:  # a model-local function: the parser imports its body, so check that instead
            if key not in seen_functions:
                seen_functions.add(key)
                issues += _check_nodes(functions[key].node, functions, _constants(functions[key]), opset,
                                       seen_functions)
            continue
        if node.domain not in DEFAULT_DOMAINS:
            issues.append(PreflightIssue(name, node.op_type, _domain_message(node)))
            continue
        if node.op_type in UNSUPPORTED_OPS:
            issues.append(PreflightIssue(name, node.op_type, f"{TENSORRT}'s ONNX parser does not support "
                                                             f"{node.op_type}; replace that layer in the student or "
                                                             "supply a TensorRT plugin"))
            continue
        if node.op_type not in SUPPORTED_OPS:
            issues.append(PreflightIssue(name, node.op_type, f"{node.op_type} is not in {TENSORRT}'s ONNX operator "
                                                             "table, so the parser would look for a plugin of that "
                                                             "name; replace that layer in the student"))
            continue
        issues += [PreflightIssue(name, node.op_type, message)
                   for message in _restrictions(node, constants, opset)]
        for subgraph in _subgraphs(node):  # a body sees the outer scope's constants and its own
            issues += _check_nodes(subgraph.node, functions, {**constants, **_constants(subgraph)}, opset,
                                   seen_functions)
    return issues


def _domain_message(node: onnx.NodeProto) -> str:
    return (f"domain '{node.domain}' is not standard ONNX: TensorRT would need a plugin named {node.op_type}, which "
            "cannot be checked without a GPU; export without contrib/custom ops (e.g. skip ONNX Runtime's "
            "transformer fusions)")


def _restrictions(node: onnx.NodeProto, constants: dict[str, TensorProto], opset: int) -> list[str]:
    """The parser's static checks that matter for MLP/CNN students: training-mode graphs and pooling variants."""
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
    extra_outputs = any(output for output in node.output[1:])  # empty names are omitted optional outputs
    messages = []
    if node.op_type == "BatchNormalization":
        if attributes.get("training_mode", 0):
            messages.append("training_mode=1 is not supported; export the student in eval mode (model.eval())")
        elif extra_outputs:
            messages.append("only the first output (Y) is supported, not the running mean/variance outputs; "
                            "export the student in eval mode (model.eval())")
    elif node.op_type == "Dropout" and opset >= 12 and len(node.input) >= 3 and node.input[2]:
        mode = constants.get(node.input[2])
        if mode is None:
            messages.append(f"its training_mode input '{node.input[2]}' must be a constant (an initializer); export "
                            "the student in eval mode (model.eval())")
        elif mode.data_location != TensorProto.EXTERNAL and numpy_helper.to_array(mode).any():
            messages.append("training_mode is true, and TensorRT runs Dropout in inference mode only; export the "
                            "student in eval mode (model.eval())")
    elif node.op_type == "DequantizeLinear" and node.input and node.input[0] in constants:
        data_type = constants[node.input[0]].data_type
        if data_type == TensorProto.INT32:
            messages.append("it dequantizes an int32 tensor (a quantized bias), and TensorRT dequantizes int8, fp8, "
                            "int4 and fp4 only; quantize with biases kept in float (QuantizeBias=False)")
    elif node.op_type in POOLING_OPS:
        if node.op_type == "MaxPool" and extra_outputs:
            messages.append("the Indices output is not supported; use MaxPool without return_indices")
        dilations = attributes.get("dilations", [])
        if opset >= 10 and any(d != 1 for d in dilations):
            messages.append(f"dilations {list(dilations)} are not supported, only 1; use an undilated pooling")
    return messages
