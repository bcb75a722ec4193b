"""``from-teacher``: describing a member's architecture as JSON data and rebuilding it at a smaller width."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.students import build_from_architecture, create_student, describe_architecture


def cnn_teacher(channels: int = 1) -> nn.Sequential:
    """A 64/128-channel CNN with a nested block, batch norm, dropout and a 256-unit hidden layer, for 28×28."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Sequential(nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.GELU(approximate="tanh"),
                      nn.AvgPool2d(2)),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 7 * 7, 256), nn.BatchNorm1d(256), nn.Tanh(),
        nn.Linear(256, 10))


def mlp_teacher(features: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(),
                         nn.Linear(1200, 10))


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in module.state_dict().values()]


class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) * 2


class SequentialWithOwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("module", [
    NotSequential(),
    nn.Linear(4, 2),
    SequentialWithOwnForward(nn.Linear(4, 2)),
    nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 2)),  # an unsupported layer
    nn.Sequential(nn.Linear(4, 8), NotSequential()),
    nn.Sequential(nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.LazyLinear(2)),  # grouped conv
    nn.Sequential(nn.Linear(4, 8), nn.ModuleList([nn.ReLU()])),
    nn.Sequential(),
], ids=["module", "leaf", "subclass", "sigmoid", "custom-child", "grouped", "modulelist", "empty"])
def test_describe_returns_none_for_what_it_cannot_rebuild(module):
    assert describe_architecture(module) is None


def test_describe_records_out_widths_and_hyperparameters_as_json_data():
    description = describe_architecture(cnn_teacher())
    assert description == json.loads(json.dumps(description))  # plain JSON, nothing else
    assert [d["type"] for d in description] == [
        "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "GELU", "AvgPool2d",  # nested flattened
        "Flatten", "Dropout", "Linear", "BatchNorm1d", "Tanh", "Linear"]
    assert description[0] == {"type": "Conv2d", "out_channels": 64, "kernel_size": [3, 3], "stride": [1, 1],
                              "padding": [1, 1], "dilation": [1, 1], "bias": True, "padding_mode": "zeros"}
    assert description[4]["bias"] is False and description[6] == {"type": "GELU", "approximate": "tanh"}
    assert description[9] == {"type": "Dropout", "p": 0.3} and description[2] == {"type": "ReLU"}
    assert description[10]["out_features"] == 256
    assert not any(key in d for d in description for key in ("in_channels", "in_features", "num_features"))


@pytest.mark.parametrize("teacher, input_shape", [(cnn_teacher(), (1, 28, 28)), (mlp_teacher(), (64,)),
                                                  (mlp_teacher(64), (1, 8, 8))], ids=["cnn", "mlp", "mlp-digits"])
def test_scale_one_rebuilds_the_teacher_layer_for_layer(teacher, input_shape):
    description = json.loads(json.dumps(describe_architecture(teacher)))  # as read back from a teacher archive
    student = build_from_architecture(description, 1.0, input_shape, 10)
    assert parameters(student) == parameters(teacher)
    assert shapes(student) == shapes(teacher)
    assert describe_architecture(student) == describe_architecture(teacher)


def test_quarter_scale_keeps_about_a_sixteenth_of_a_conv_linear_stack():
    teacher = cnn_teacher()
    student = build_from_architecture(describe_architecture(teacher), 0.25, (1, 28, 28), 10)
    widths = [(type(m).__name__, m.weight.shape[0]) for m in student if getattr(m, "weight", None) is not None]
    assert widths == [("Conv2d", 16), ("BatchNorm2d", 16), ("Conv2d", 32), ("BatchNorm2d", 32), ("Linear", 64),
                      ("BatchNorm1d", 64), ("Linear", 10)]
    assert student[10].in_features == 32 * 7 * 7  # input widths follow the previous layer
    ratio = parameters(student) / parameters(teacher)
    assert 0.8 / 16 < ratio < 1.25 / 16, ratio


def test_built_student_is_materialised_fresh_and_in_train_mode():
    student = build_from_architecture(describe_architecture(cnn_teacher()), 0.5, (1, 28, 28), 10)
    assert student.training and all(m.training for m in student.modules())
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in student.parameters())
    for bn in (m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        assert bn.num_batches_tracked.item() == 0 and bn.running_mean.abs().sum() == 0  # the probe left no trace
    assert student(torch.rand(4, 1, 28, 28)).shape == (4, 10)


def test_widths_round_half_up_and_never_reach_zero():
    description = describe_architecture(nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 3),
                                                      nn.ReLU(), nn.Linear(3, 5)))
    student = build_from_architecture(description, 0.25, (16,), 7)
    assert [m.out_features for m in student if isinstance(m, nn.Linear)] == [3, 1, 7]  # 2.5 → 3, 0.75 → 1, head


def test_the_head_is_the_last_conv_when_there_is_no_linear():
    teacher = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 10, 1), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten())
    student = build_from_architecture(describe_architecture(teacher), 0.5, (1, 8, 8), 4)
    assert [m.out_channels for m in student if isinstance(m, nn.Conv2d)] == [16, 4]


@pytest.mark.parametrize("scale", [0, -0.5, 1.5, 2, float("nan"), float("inf"), "0.5", True, None])
def test_scale_outside_zero_one_is_refused(scale):
    with pytest.raises(CompressorError, match=r"\(0, 1\]"):
        build_from_architecture(describe_architecture(mlp_teacher()), scale, (64,), 10)


@pytest.mark.parametrize("change, words", [
    (lambda d: d.insert(1, {"type": "Sigmoid"}), ["layer 1", "'Sigmoid'", "Conv2d", "Linear"]),
    (lambda d: d.insert(1, {"type": "__import__"}), ["'__import__'"]),  # data, never code
    (lambda d: d.insert(1, {"type": "Sequential"}), ["'Sequential'"]),
    (lambda d: d.insert(1, "ReLU"), ["layer 1", "None"]),
    (lambda d: d[1].update(in_features=64), ["layer 1", "in_features"]),
    (lambda d: d[1].pop("out_features"), ["layer 1", "out_features"]),
    (lambda d: d[1].update(out_features="1200"), ["layer 1", "out_features"]),
    (lambda d: d.insert(0, {"type": "MaxPool2d", "kernel_size": 2}), ["layer 0", "MaxPool2d", "(N, 64)"]),
    (lambda d: d.__setitem__(slice(None), [{"type": "Flatten"}, {"type": "ReLU"}]), ["no Conv2d or Linear"]),
    (lambda d: d.clear(), ["non-empty list"]),
], ids=["unknown-type", "import", "container", "not-a-dict", "input-width", "missing-width", "string-width",
        "shape-mismatch", "no-width-layer", "empty"])
def test_a_description_that_does_not_fit_raises_a_sentence(change, words):
    description = describe_architecture(mlp_teacher())
    change(description)
    with pytest.raises(CompressorError) as info:
        build_from_architecture(description, 0.5, (64,), 10)
    for word in words:
        assert word in str(info.value), str(info.value)


def test_an_architecture_that_does_not_end_in_a_classifier_is_refused():
    description = describe_architecture(nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 10, 1)))
    with pytest.raises(CompressorError, match=r"outputs \(N, 4, 8, 8\), not \(N, 4\)"):
        build_from_architecture(description, 0.5, (1, 8, 8), 4)


def test_create_student_from_teacher_uses_the_spec_scale_and_defaults_to_a_quarter():
    description = describe_architecture(cnn_teacher())
    half = create_student("from-teacher:0.5", (1, 28, 28), 10, teacher_architecture=description)
    quarter = create_student("from-teacher", (1, 28, 28), 10, teacher_architecture=description)
    assert half[0].out_channels == 32 and quarter[0].out_channels == 16
    assert parameters(quarter) == parameters(build_from_architecture(description, 0.25, (1, 28, 28), 10))
    with pytest.raises(CompressorError, match="from-teacher:0.5.*recorded architecture.*--student mlp or cnn"):
        create_student("from-teacher:0.5", (1, 28, 28), 10, teacher_architecture=None)


def test_the_rebuilt_students_are_themselves_describable():
    """A distilled student can become the next round's teacher: its description round-trips at scale 1."""
    for spec in ("mlp:32x16", "cnn:8x16"):
        student = create_student(spec, (1, 8, 8), 10)
        rebuilt = build_from_architecture(describe_architecture(student), 1.0, (1, 8, 8), 10)
        assert shapes(rebuilt) == shapes(student) and math.isclose(parameters(rebuilt), parameters(student))
