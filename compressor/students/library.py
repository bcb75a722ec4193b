"""What the ``timm:`` and ``torchvision:`` student families share: a model name checked against the library's own
catalogue (closest names suggested), image inputs only, and the first convolution adapted to the data's channels."""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType

from torch import nn

from compressor.core.errors import CompressorError, first_line


def check_name(family: str, name: str, catalogue: list[str]) -> None:
    """Refuse a model name the library does not know, naming the closest ones it does."""
    if name in catalogue:
        return
    close = difflib.get_close_matches(name, catalogue, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise CompressorError(f"--student {family}:{name}: {family} has no model named {name!r}{hint} "
                          f"(compress students lists the {len(catalogue)} names it knows)")


def image_shape(family: str, name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) of the data, or a clear refusal for vector inputs."""
    if len(input_shape) != 3:
        raise CompressorError(f"--student {family}:{name}: {family} models take images (channels, height, width), "
                              f"but the data's input shape is {tuple(input_shape)}; use --student mlp for vectors")
    return input_shape  # type: ignore[return-value]


def adapt_input_channels(model: nn.Module, channels: int) -> nn.Module:
    """Replace the first convolution when it expects another number of input channels (torchvision models are
    built for RGB): the same kernel, stride, padding and width, freshly initialised, for ``channels`` inputs."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.in_channels == channels:
        return model
    replacement = nn.Conv2d(channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                            first.dilation, first.groups if first.groups == 1 else channels,
                            first.bias is not None, first.padding_mode)
    parent, attribute = _parent_of(model, first)
    setattr(parent, attribute, replacement)
    return model


def _parent_of(model: nn.Module, child: nn.Module) -> tuple[nn.Module, str]:
    for parent in model.modules():
        for attribute, module in parent.named_children():
            if module is child:
                return parent, attribute
    raise LookupError("child not found")  # unreachable: child came from model.modules()


def require(module: str, spec: str) -> ModuleType:
    """Import ``module`` or say in one line how to install it (and why it may not load next to a CPU torch)."""
    try:
        return importlib.import_module(module)
    except (ImportError, RuntimeError) as exc:  # RuntimeError: torchvision's compiled ops built for another torch
        raise CompressorError(f"--student {spec}: {module} cannot be imported here ({first_line(exc)}); install "
                              f"timm and torchvision built for this torch (pip install -e '.[images]'; a CPU-only "
                              f"torch needs torchvision's CPU wheel)") from exc
