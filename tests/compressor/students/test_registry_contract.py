"""Contract tests that loop over ``list_students()``: every registered family is held to the same promises.

A family added with ``@register_student`` is tested here for free: output shape (N, C) for N in {1, 5}, train
mode and float32 on return, gradients reaching every parameter, fewer parameters than a realistic teacher, and an
ONNX export with a dynamic batch axis that ONNX Runtime runs to the same logits. Families that need a teacher's
architecture (``from-teacher``) get one described from the realistic teacher built here.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.students import (create_student, describe_architecture, list_students, register_student,
                                 student_catalogue)
from compressor.students import registry

NUM_CLASSES = 10
SHAPES = [(1, 8, 8), (1, 28, 28), (64,)]  # digits, MNIST-sized images, plain feature vectors


def teacher_members(input_shape: tuple[int, ...]) -> list[nn.Module]:
    """A realistic teacher ensemble: a 64/128-channel CNN (images only) and a 1200-1200 MLP (Hinton 2015 §3).

    The first member is the one whose architecture ``from-teacher`` shrinks.
    """
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 1200), nn.ReLU(), nn.Dropout(0.2),
                        nn.Linear(1200, 1200), nn.ReLU(), nn.Dropout(0.2), nn.Linear(1200, NUM_CLASSES))
    if len(input_shape) != 3:
        return [mlp]
    cnn = nn.Sequential(nn.Conv2d(input_shape[0], 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(128 * (input_shape[1] // 4) * (input_shape[2] // 4), 256), nn.ReLU(),
                        nn.Linear(256, NUM_CLASSES))
    return [cnn, mlp]


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_student(name: str, input_shape: tuple[int, ...]) -> nn.Module:
    """The family's default spec, built as the pipeline builds it. A library family (timm, torchvision) is skipped,
    with the reason, where its library cannot be imported, except under CI, where make test installs both."""
    try:
        student_catalogue(name)
    except CompressorError as exc:
        if os.environ.get("CI"):  # make test installs timm and torchvision: a family missing there is a failure
            raise
        pytest.skip(f"{name}: {exc}")
    architecture = describe_architecture(teacher_members(input_shape)[0])
    assert architecture is not None
    torch.manual_seed(0)
    try:
        return create_student(name, input_shape, NUM_CLASSES, teacher_architecture=architecture)
    except CompressorError as exc:
        if len(input_shape) == 1:
            assert "mlp" in str(exc), f"{name} refuses vectors without pointing to a family that takes them: {exc}"
        raise


def export_onnx(model: nn.Module, example: torch.Tensor, path) -> None:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch axis, weights embedded in the one file."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"], dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)


IMAGE_ONLY = {"cnn", "timm", "torchvision"}  # they refuse vectors, pointing to mlp (tested below)
# every family on every shape it takes (hf takes token inputs: test_hf_student.py), so nothing here skips
families_and_shapes = pytest.mark.parametrize(
    "name, input_shape", [(name, shape) for name in list_students() if name != "hf" for shape in SHAPES
                          if len(shape) == 3 or name not in IMAGE_ONLY],
    ids=lambda value: "x".join(map(str, value)) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("name", sorted(IMAGE_ONLY))
def test_image_only_families_refuse_vectors_pointing_to_mlp(name):
    with pytest.raises(CompressorError, match="mlp"):
        make_student(name, (64,))


def test_the_registry_lists_the_documented_families_sorted():
    names = list_students()
    assert names == sorted(names)
    assert {"mlp", "cnn", "from-teacher"} <= set(names)


@families_and_shapes
def test_forward_shape_mode_dtype_and_gradients(name, input_shape):
    student = make_student(name, input_shape)
    assert student.training, "create_student must return the module in train mode"
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in student.parameters())

    x = torch.rand(5, *input_shape)  # (5, *input_shape)
    student.eval()
    with torch.no_grad():
        five = student(x)  # (5, C)
        one = student(x[:1])  # (1, C)
    assert five.shape == (5, NUM_CLASSES) and one.shape == (1, NUM_CLASSES)
    assert torch.isfinite(five).all()
    torch.testing.assert_close(one, five[:1], atol=1e-5, rtol=1e-5)  # rows do not leak into each other in eval

    student.train()
    nn.functional.cross_entropy(student(x), torch.arange(5) % NUM_CLASSES).backward()
    for param_name, p in student.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, param_name


@families_and_shapes
def test_default_student_is_smaller_than_a_realistic_teacher(name, input_shape):
    student = make_student(name, input_shape)
    largest = max(parameters(m) for m in teacher_members(input_shape))
    assert parameters(student) < largest, f"{name} has {parameters(student)} parameters, teacher {largest}"


@families_and_shapes
def test_onnx_export_with_dynamic_batch_matches_torch(name, input_shape, tmp_path):
    import onnx
    import onnxruntime as ort

    student = make_student(name, input_shape).eval()
    path = tmp_path / "student.onnx"
    export_onnx(student, torch.rand(2, *input_shape), path)
    assert [p.name for p in tmp_path.iterdir()] == ["student.onnx"], "weights must be embedded, not a side file"
    onnx.checker.check_model(str(path), full_check=True)

    x = torch.rand(3, *input_shape)  # a batch size the export never saw
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        expected = student(x).numpy()
    assert got.shape == (3, NUM_CLASSES)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec, input_shape, with_architecture, words", [
    ("nope", (1, 8, 8), True, ["nope", "cnn", "from-teacher", "mlp"]),
    ("MLP-800", (1, 8, 8), True, ["MLP-800", "mlp"]),
    ("mlp:abc", (1, 8, 8), True, ["mlp:abc", "mlp:800x800"]),
    ("mlp:", (1, 8, 8), True, ["mlp:", "mlp:800x800"]),
    ("mlp:800x0", (1, 8, 8), True, ["mlp:800x0", "mlp:800x800"]),
    ("cnn:16x3.5", (1, 8, 8), True, ["cnn:16x3.5", "cnn:16x32"]),
    ("cnn", (64,), True, ["cnn", "(64,)", "mlp"]),
    ("from-teacher:2", (1, 8, 8), True, ["from-teacher:2", "(0, 1]"]),
    ("from-teacher:0", (1, 8, 8), True, ["from-teacher:0", "(0, 1]"]),
    ("from-teacher:nan", (1, 8, 8), True, ["from-teacher:nan", "(0, 1]"]),
    ("from-teacher:half", (1, 8, 8), True, ["from-teacher:half", "from-teacher:0.5"]),
    ("from-teacher", (1, 8, 8), False, ["recorded architecture", "--student mlp or cnn"]),
    ("from-teacher:0.5", (64,), True, ["from-teacher:0.5", "Conv2d", "(64,)"]),  # an image teacher, vector data
    ("", (1, 8, 8), True, ["mlp"]),
])
def test_bad_specs_raise_a_sentence_naming_the_spec(spec, input_shape, with_architecture, words):
    architecture = describe_architecture(teacher_members((1, 8, 8))[0]) if with_architecture else None
    with pytest.raises(CompressorError) as info:
        create_student(spec, input_shape, NUM_CLASSES, teacher_architecture=architecture)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"
    assert "\n" not in message


def test_default_specs_are_the_documented_widths():
    for default, explicit in [("mlp", "mlp:800x800"), ("cnn", "cnn:16x32")]:
        assert parameters(create_student(default, (1, 8, 8), 10)) == parameters(create_student(explicit, (1, 8, 8), 10))
    assert parameters(create_student("mlp:800x800", (64,), 10)) == 64 * 800 + 800 + 800 * 800 + 800 + 800 * 10 + 10


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 20), (1, 1, 1)])
def test_cnn_pools_only_while_the_image_allows(input_shape):
    student = create_student("cnn:8x8x8x8x8", input_shape, 7).eval()
    pools = sum(isinstance(m, nn.MaxPool2d) for m in student.modules())
    assert pools == min(5, int(math.log2(min(input_shape[1:]))))
    assert student(torch.rand(4, *input_shape)).shape == (4, 7)


def test_a_newly_registered_family_is_served_and_held_to_the_contract(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))  # leave the real registry untouched

    @register_student("linear")
    def linear(args, input_shape, num_classes, **context):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes)).double().eval()

    @register_student("wrong-width")
    def wrong_width(args, input_shape, num_classes, **context):
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))

    assert "linear" in list_students()
    student = create_student("linear", (1, 8, 8), 3)
    assert student.training and next(student.parameters()).dtype == torch.float32
    with pytest.raises(CompressorError, match=r"wrong-width.*\(2, 4\).*\(2, 3\)"):
        create_student("wrong-width", (1, 8, 8), 3)
    with pytest.raises(ValueError, match="already registered"):
        register_student("mlp")(linear)
    with pytest.raises(ValueError):
        register_student("bad:name")
