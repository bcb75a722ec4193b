"""``--student timm:NAME``: any timm image classifier, randomly initialised (nothing is downloaded) for the data's
channels and the ensemble's classes, e.g. ``timm:resnet18``, ``timm:mobilenetv3_small_100``; local weights come with
``--student-weights FILE.safetensors``. Bare ``timm`` is ``timm:mobilenetv3_small_050``, a 0.6 M-parameter network
that runs on inputs as small as 8 × 8."""

from __future__ import annotations

from torch import nn

from compressor.students.library import check_name, image_shape, require
from compressor.students.registry import register_student

DEFAULT_MODEL = "mobilenetv3_small_050"


def catalogue() -> list[str]:
    """Every architecture timm can build (``timm.list_models()``)."""
    return list(require("timm", "timm").list_models())


@register_student("timm", catalogue=catalogue)
def timm_student(args: str | None, input_shape: tuple[int, ...], num_classes: int, **context) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=classes, in_chans=channels)``: (N, C, H, W) → (N, classes)."""
    name = args or DEFAULT_MODEL
    channels, _, _ = image_shape("timm", name, input_shape)
    timm = require("timm", f"timm:{name}")
    check_name("timm", name, list(timm.list_models()))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=channels)
