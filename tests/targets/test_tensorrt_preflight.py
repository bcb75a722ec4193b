"""targets/tensorrt_preflight.py: real ONNX graphs (built with onnx.helper, and the conftest students' exports)
checked against TensorRT 11's parser rules without TensorRT or a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.core.errors import CompressorError
from targets.tensorrt_preflight import (
    MAX_OPSET,
    MIN_OPSET,
    SUPPORTED_OPS,
    UNSUPPORTED_OPS,
    PreflightIssue,
    PreflightResult,
    preflight,
)

FLOAT = TensorProto.FLOAT
REPO = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)


def weight(name: str, *shape: int, dtype=np.float32) -> TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def save(tmp_path, name: str, nodes, inputs, outputs, initializers=(), opset: int = 18, extra_opsets=(),
         functions=(), check: bool = True):
    """Write a model to tmp_path/name and return its path; ``check`` runs onnx.checker on graphs meant to be valid."""
    graph = helper.make_graph(nodes, name.removesuffix(".onnx"), inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(domain, v) for domain, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    model.ir_version = 10  # what the torch exporter writes; onnx.helper would stamp its own newest
    if check:
        onnx.checker.check_model(model, full_check=True)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def mlp_graph(tmp_path, name="mlp.onnx", input_type=FLOAT, input_shape=("N", 64), opset=18, **kwargs):
    """(N, 64) -> Gemm -> Relu -> Gemm -> (N, 10): the MLP student as the exporter writes it."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu1"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    dtype = helper.tensor_dtype_to_np_dtype(input_type) if input_type != FLOAT else np.float32
    inits = [weight("w1", 32, 64, dtype=dtype), weight("b1", 32, dtype=dtype),
             weight("w2", 10, 32, dtype=dtype), weight("b2", 10, dtype=dtype)]
    return save(tmp_path, name, nodes, [helper.make_tensor_value_info("x", input_type, list(input_shape))],
                [helper.make_tensor_value_info("logits", input_type, [input_shape[0], 10])], inits, opset=opset,
                **kwargs)


def one_node_graph(tmp_path, node, opset=18, extra_opsets=(), initializers=(), check=False, shape=("N", 4, 4)):
    """input (N, 4, 4) -> node -> output: a graph around one node under test."""
    return save(tmp_path, "one.onnx", [node], [helper.make_tensor_value_info("x", FLOAT, list(shape))],
                [helper.make_tensor_value_info(node.output[0], FLOAT, None)], initializers, opset=opset,
                extra_opsets=extra_opsets, check=check)


# --- graphs that build -------------------------------------------------------------------------------------------


def test_mlp_graph_will_build_with_a_dynamic_batch(tmp_path):
    result = preflight(mlp_graph(tmp_path))
    assert result.ok and result.issues == []
    assert (result.opset, result.nodes, result.op_types) == (18, 3, {"Gemm": 2, "Relu": 1})
    assert result.inputs == {"x": ["N", 64]}
    assert result.summary() == "mlp.onnx will build with TensorRT 11: 3 nodes (Gemm ×2, Relu ×1), opset 18, " \
                               "dynamic batch 1..N"


def test_cnn_graph_will_build_with_a_fixed_batch(tmp_path):
    nodes = [helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1)]
    inits = [weight("wc", 8, 1, 3, 3), weight("bc", 8), weight("wf", 10, 128), weight("bf", 10)]
    path = save(tmp_path, "cnn.onnx", nodes, [helper.make_tensor_value_info("x", FLOAT, [4, 1, 8, 8])],
                [helper.make_tensor_value_info("logits", FLOAT, [4, 10])], inits, opset=MIN_OPSET + 8)
    result = preflight(path)
    assert result.ok, result.summary()
    assert list(result.op_types) == ["Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    assert result.summary().endswith("5 nodes (Conv ×1, Relu ×1, MaxPool ×1, Flatten ×1, Gemm ×1), opset 17, "
                                     "fixed batch 4")


@pytest.mark.parametrize("fixture", ["exported_mlp", "exported_cnn"])
def test_the_exported_students_will_build(request, fixture):
    _, artifact = request.getfixturevalue(fixture)
    result = preflight(artifact.files["model"])
    assert result.ok, result.summary()
    assert result.opset == artifact.metadata["opset"] and MIN_OPSET <= result.opset <= MAX_OPSET
    assert result.inputs == {"input": ["batch", 1, 8, 8]}
    assert result.summary().startswith("model.onnx will build with TensorRT 11: ")
    assert result.summary().endswith("dynamic batch 1..N") and "Gemm" in result.op_types


def test_a_loaded_model_proto_is_checked_the_same(tmp_path):
    result = preflight(onnx.load(mlp_graph(tmp_path)))
    assert result.ok and result.model == "<in-memory model>" and result.nodes == 3


# --- graphs that do not build: every failure names the node or tensor ------------------------------------------


@pytest.mark.parametrize(("op_type", "wording"), [("Det", "does not support Det"),  # marked N in operators.md
                                                  ("CumProd", "not in TensorRT 11's ONNX operator table")])
def test_an_unsupported_op_is_named_with_its_node(tmp_path, op_type, wording):
    node = helper.make_node(op_type, ["x", "axis"] if op_type == "CumProd" else ["x"], ["y"], name="head_op")
    axis = [numpy_helper.from_array(np.array(1, dtype=np.int64), "axis")] if op_type == "CumProd" else []
    result = preflight(one_node_graph(tmp_path, node, opset=MAX_OPSET, initializers=axis))
    assert not result.ok
    assert result.issues == [PreflightIssue("head_op", op_type, result.issues[0].message)]
    assert wording in result.issues[0].message
    assert result.summary().startswith(f"one.onnx will NOT build with TensorRT 11: node 'head_op' ({op_type}): ")
    assert result.summary().endswith("(1 issue)")


def test_an_unnamed_node_is_named_by_its_output_as_the_parser_does(tmp_path):
    result = preflight(one_node_graph(tmp_path, helper.make_node("Unique", ["x"], ["uniques"])))
    assert [(issue.node, issue.op_type) for issue in result.issues] == [("uniques", "Unique")]
    assert "node 'uniques' (Unique)" in result.summary()


def test_a_com_microsoft_contrib_op_is_flagged(tmp_path):
    node = helper.make_node("FusedGemm", ["x", "w", "b"], ["y"], name="fused_fc", domain="com.microsoft",
                            activation="Relu")
    path = one_node_graph(tmp_path, node, extra_opsets=[("com.microsoft", 1)], shape=("N", 4),
                          initializers=[weight("w", 4, 4), weight("b", 4)])
    result = preflight(path)
    assert [(issue.node, issue.op_type) for issue in result.issues] == [("fused_fc", "FusedGemm")]
    assert "'fused_fc' (FusedGemm)" in result.summary() and "com.microsoft" in result.summary()


def test_a_standard_op_name_in_another_domain_is_still_flagged(tmp_path):
    node = helper.make_node("Gelu", ["x"], ["y"], name="ms_gelu", domain="com.microsoft")
    result = preflight(one_node_graph(tmp_path, node, extra_opsets=[("com.microsoft", 1)]))
    assert not result.ok and "'ms_gelu' (Gelu)" in result.summary()


def test_a_float64_input_is_named(tmp_path):
    result = preflight(mlp_graph(tmp_path, input_type=TensorProto.DOUBLE))
    assert len(result.issues) == 1 and result.issues[0].node is None  # one issue for a float64 student, not six
    assert ("input 'x', output 'logits', initializer 'w1', initializer 'b1', initializer 'w2', initializer 'b2' "
            "are float64") in result.summary()
    assert result.summary().endswith("(1 issue)")


def test_a_float64_tensor_list_is_capped(tmp_path):
    names = [f"c{i}" for i in range(9)]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"], name=f"id_{name}") for name in names]
    inits = [weight(name, 2, dtype=np.float64) for name in names]
    path = save(tmp_path, "consts.onnx", nodes, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.DOUBLE,
                                                                                   [2]) for name in names], inits)
    (issue,) = preflight(path).issues
    assert issue.message.startswith("output 'c0_out', ") and " and 12 more are float64" in issue.message


def test_an_initializer_of_a_type_tensorrt_lacks_is_named(tmp_path):
    node = helper.make_node("Cast", ["lut_u16"], ["y"], name="cast", to=FLOAT)
    lut = numpy_helper.from_array(np.arange(4, dtype=np.uint16), "lut_u16")
    result = preflight(one_node_graph(tmp_path, node, initializers=[lut]))
    assert len(result.issues) == 1 and "initializer 'lut_u16' has element type UINT16" in result.summary()


def test_a_symbolic_non_batch_axis_is_named(tmp_path):
    result = preflight(mlp_graph(tmp_path, input_shape=("batch", "features")))
    assert len(result.issues) == 1 and result.issues[0].node is None
    assert "input 'x' axis 1 is symbolic ('features')" in result.summary()
    assert result.inputs == {"x": ["batch", "features"]}


@pytest.mark.parametrize("opset", [8, 25])  # operators.md (TensorRT 10.15, kept by 11.0-11.4): opset 9 to 24
def test_an_opset_outside_the_parsers_range_is_flagged(tmp_path, opset):
    result = preflight(mlp_graph(tmp_path, opset=opset))
    assert result.opset == opset and len(result.issues) == 1
    assert f"opset {opset} is too" in result.summary() and "opset 9..24" in result.summary()


@pytest.mark.parametrize("opset", [9, 24])
def test_the_range_edges_build(tmp_path, opset):
    assert preflight(mlp_graph(tmp_path, opset=opset)).ok


# --- the parser's static restrictions ----------------------------------------------------------------------------


def test_batch_norm_in_training_mode_is_flagged(tmp_path):
    inits = [weight(name, 1) for name in ("scale", "bias", "mean", "var")]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn",
                            training_mode=1)
    result = preflight(one_node_graph(tmp_path, node, initializers=inits, shape=("N", 1, 4, 4)))
    assert "node 'bn' (BatchNormalization): training_mode=1" in result.summary()
    node.attribute[0].i = 0  # the same node in eval mode builds
    assert preflight(one_node_graph(tmp_path, node, initializers=inits, shape=("N", 1, 4, 4))).ok


@pytest.mark.parametrize("training", [True, False])
def test_dropout_must_have_a_constant_false_training_mode(tmp_path, training):
    mode = numpy_helper.from_array(np.array(training), "train_flag")
    node = helper.make_node("Dropout", ["x", "", "train_flag"], ["y"], name="drop")
    result = preflight(one_node_graph(tmp_path, node, initializers=[mode]))
    assert result.ok is not training
    if training:
        assert "node 'drop' (Dropout): training_mode is true" in result.summary()


def test_dropout_training_mode_from_a_graph_input_is_flagged(tmp_path):
    node = helper.make_node("Dropout", ["x", "", "is_training"], ["y"], name="drop")
    path = save(tmp_path, "drop.onnx", [node], [helper.make_tensor_value_info("x", FLOAT, ["N", 4]),
                                                helper.make_tensor_value_info("is_training", TensorProto.BOOL, [])],
                [helper.make_tensor_value_info("y", FLOAT, ["N", 4])])
    assert "training_mode input 'is_training' must be a constant" in preflight(path).summary()


def test_max_pool_indices_and_dilated_pooling_are_flagged(tmp_path):
    nodes = [helper.make_node("MaxPool", ["x"], ["p", "idx"], name="pool_idx", kernel_shape=[2, 2]),
             helper.make_node("AveragePool", ["x"], ["q"], name="pool_dil", kernel_shape=[2, 2], dilations=[2, 2])]
    path = save(tmp_path, "pool.onnx", nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 1, 8, 8])],
                [helper.make_tensor_value_info("p", FLOAT, None), helper.make_tensor_value_info("q", FLOAT, None)],
                opset=19, check=False)
    summary = preflight(path).summary()
    assert "node 'pool_idx' (MaxPool): the Indices output" in summary
    assert "node 'pool_dil' (AveragePool): dilations [2, 2]" in summary


# --- walking into subgraphs and local functions -----------------------------------------------------------------


def test_an_unsupported_op_inside_an_if_branch_is_found(tmp_path):
    def branch(op_type: str, name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op_type, ["x"], [f"{name}_out"], name=name)], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", FLOAT, None)])

    node = helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch("Relu", "then_relu"),
                            else_branch=branch("Det", "else_det"))
    cond = numpy_helper.from_array(np.array(True), "cond")
    result = preflight(one_node_graph(tmp_path, node, initializers=[cond]))
    assert [(issue.node, issue.op_type) for issue in result.issues] == [("else_det", "Det")]


def test_a_local_function_is_checked_by_its_body_not_its_domain(tmp_path):
    def function(body_op: str) -> onnx.FunctionProto:
        return helper.make_function("student.blocks", "Block", ["a"], ["b"],
                                    [helper.make_node(body_op, ["a"], ["b"], name=f"block_{body_op.lower()}")],
                                    [helper.make_opsetid("", 18)])

    call = helper.make_node("Block", ["x"], ["y"], name="block", domain="student.blocks")
    for body_op, ok in [("Relu", True), ("MaxUnpool", False)]:
        path = one_node_graph(tmp_path, call, extra_opsets=[("student.blocks", 1)])
        model = onnx.load(path)
        model.functions.append(function(body_op))
        result = preflight(model)
        assert result.ok is ok, result.summary()
    assert "node 'block_maxunpool' (MaxUnpool)" in result.summary()


# --- the result and its errors -----------------------------------------------------------------------------------


def test_the_summary_spells_out_five_issues_and_counts_all(tmp_path):
    nodes = [helper.make_node("Det", ["x"], [f"y{i}"], name=f"det{i}") for i in range(7)]
    path = save(tmp_path, "many.onnx", nodes, [helper.make_tensor_value_info("x", FLOAT, ["N", 3, 3])],
                [helper.make_tensor_value_info(f"y{i}", FLOAT, None) for i in range(7)], check=False)
    summary = preflight(path).summary()
    assert "'det4'" in summary and "'det5'" not in summary and summary.endswith("; ... (7 issues)")


def test_to_dict_is_json_safe_and_carries_the_verdict(tmp_path):
    good, bad = preflight(mlp_graph(tmp_path)), preflight(mlp_graph(tmp_path, "bad.onnx", opset=MAX_OPSET + 1))
    for result in (good, bad):
        data = json.loads(json.dumps(result.to_dict()))
        assert data["ok"] is result.ok and data["summary"] == result.summary() and data["opset"] == result.opset
        assert data["op_types"] == {"Gemm": 2, "Relu": 1} and data["inputs"] == {"x": ["N", 64]}
    assert bad.to_dict()["issues"][0]["node"] is None and isinstance(bad, PreflightResult)


def test_a_missing_file_raises_one_sentence_naming_it(tmp_path):
    with pytest.raises(CompressorError, match=r"nowhere\.onnx does not exist"):
        preflight(tmp_path / "nowhere.onnx")
    with pytest.raises(CompressorError, match="is a folder"):
        preflight(tmp_path)


@pytest.mark.parametrize("content", [b"", b"hello, this is a text file\n", bytes(range(256)) * 4])
def test_a_file_that_is_not_onnx_raises_naming_it(tmp_path, content):
    path = tmp_path / "notes.onnx"
    path.write_bytes(content)
    with pytest.raises(CompressorError, match=r"notes\.onnx is not an ONNX model") as info:
        preflight(path)
    assert "\n" not in str(info.value)


def test_the_op_tables_name_real_onnx_ops_and_do_not_overlap():
    assert not SUPPORTED_OPS & UNSUPPORTED_OPS
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}  # pre-opset-9 experimental ops the parser still maps
    unknown = {op for op in SUPPORTED_OPS | UNSUPPORTED_OPS if not onnx.defs.has(op)} - legacy
    assert not unknown, f"typos in the op tables: {sorted(unknown)}"
    assert {"Gemm", "MatMul", "Conv", "Relu", "MaxPool", "Flatten", "BatchNormalization"} <= SUPPORTED_OPS


def test_importing_the_module_pulls_in_neither_torch_nor_tensorrt():
    code = ("import sys, targets.tensorrt_preflight; "
            "print(sorted(m for m in ('torch', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
