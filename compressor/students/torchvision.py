"""``--student torchvision:NAME``: any torchvision classification model, randomly initialised (nothing is
downloaded) for the ensemble's classes, its first convolution adapted to the data's channels, e.g.
``torchvision:resnet18``, ``torchvision:mobilenet_v3_small``; local weights come with ``--student-weights``. Bare
``torchvision`` is ``torchvision:mobilenet_v3_small``."""

from __future__ import annotations

from torch import nn

from compressor.students.library import adapt_input_channels, check_name, image_shape, require
from compressor.students.registry import register_student

DEFAULT_MODEL = "mobilenet_v3_small"


def catalogue() -> list[str]:
    """torchvision's image-classification models (``torchvision.models.list_models(module=torchvision.models)``)."""
    torchvision = require("torchvision", "torchvision")
    return list(torchvision.models.list_models(module=torchvision.models))


@register_student("torchvision", catalogue=catalogue)
def torchvision_student(args: str | None, input_shape: tuple[int, ...], num_classes: int, **context) -> nn.Module:
    """``torchvision.models.get_model(NAME, weights=None, num_classes=classes)``: (N, C, H, W) → (N, classes)."""
    name = args or DEFAULT_MODEL
    channels, _, _ = image_shape("torchvision", name, input_shape)
    check_name("torchvision", name, catalogue())
    models = require("torchvision", f"torchvision:{name}").models
    return adapt_input_channels(models.get_model(name, weights=None, num_classes=num_classes), channels)
