"""compressor/students/library.py and weights.py: what the timm / torchvision families share, tested without either
library (their families are held to the registry contract where the libraries import), and --student-weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compressor.core.errors import CompressorError
from compressor.students import create_student
from compressor.students.library import adapt_input_channels, check_name, image_shape
from compressor.students.weights import load_student_weights


def test_an_unknown_model_name_is_refused_with_the_closest_ones():
    check_name("timm", "resnet18", ["resnet18", "resnet34"])
    with pytest.raises(CompressorError, match="did you mean resnet18"):
        check_name("timm", "resnet81", ["resnet18", "resnet34", "vit_tiny"])


def test_library_families_take_images_only():
    assert image_shape("timm", "resnet18", (3, 32, 32)) == (3, 32, 32)
    with pytest.raises(CompressorError, match="use --student mlp"):
        image_shape("timm", "resnet18", (64,))


def test_the_first_convolution_is_rebuilt_for_the_datas_channels():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    adapted = adapt_input_channels(model, 1)
    first = adapted[0][0]
    assert (first.in_channels, first.out_channels, first.stride, first.bias) == (1, 8, (2, 2), None)
    assert adapted(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert adapt_input_channels(model, 1)[0][0] is first  # already right: untouched


def test_student_weights_load_every_matching_tensor_and_leave_the_rest_fresh(tmp_path):
    torch.manual_seed(0)
    trained = create_student("cnn:8x16", (1, 8, 8), 10)
    file = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(file))
    torch.manual_seed(1)
    fresh = create_student("cnn:8x16", (1, 8, 8), 10)
    summary = load_student_weights(fresh, file)
    assert summary["loaded"] == len(trained.state_dict()) and not summary["shape_mismatch"]
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor)
    other_head = create_student("cnn:8x16", (1, 8, 8), 3)  # another number of classes: the head stays fresh
    head = other_head[-1].weight.clone()
    summary = load_student_weights(other_head, file)
    assert summary["shape_mismatch"] and torch.equal(other_head[-1].weight, head)


def test_bad_student_weights_are_refused_in_one_line(tmp_path):
    student = create_student("mlp:16", (1, 8, 8), 10)
    with pytest.raises(CompressorError, match="no such file"):
        load_student_weights(student, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CompressorError, match="not a readable safetensors"):
        load_student_weights(student, tmp_path / "junk.safetensors")
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CompressorError, match="none of its 1 tensors"):
        load_student_weights(student, tmp_path / "other.safetensors")
