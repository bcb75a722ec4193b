"""``--student from-teacher[:SCALE]``: a teacher member's own layer stack with every width multiplied by SCALE.

The member's architecture is recorded when the ensemble is saved (``describe_architecture``) as a JSON list of
layers, data and never code, so it can sit inside a teacher archive and be read back without unpickling. The
student rebuilds that list (``build_from_architecture``) with each Conv2d's out_channels and Linear's
out_features scaled (rounded half up, at least 1), except the last of them, which outputs the classes. Input
widths are not recorded: they follow from the previous layer through a shape probe, so the same description
also rebuilds at a different scale or input size. Scaling every width by s shrinks a conv/linear stack's
parameters by about s², e.g. 0.25 → about 1/16.

Supported layers: Conv2d (groups = 1), Linear, BatchNorm1d, BatchNorm2d, ReLU, GELU, Tanh, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d, Flatten, Dropout, inside one nn.Sequential (nested Sequentials are flattened).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.students.registry import register_student, scaled

DEFAULT_SCALE = 0.25

# type → the constructor arguments recorded besides the input width, which the shape probe supplies on rebuild.
RECORDED: dict[str, tuple[str, ...]] = {
    "Conv2d": ("out_channels", "kernel_size", "stride", "padding", "dilation", "bias", "padding_mode"),
    "Linear": ("out_features", "bias"),
    "BatchNorm1d": ("eps", "momentum", "affine", "track_running_stats"),
    "BatchNorm2d": ("eps", "momentum", "affine", "track_running_stats"),
    "ReLU": (),
    "GELU": ("approximate",),
    "Tanh": (),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    "AdaptiveAvgPool2d": ("output_size",),
    "Flatten": ("start_dim", "end_dim"),
    "Dropout": ("p",),
}
WIDTH = {"Conv2d": "out_channels", "Linear": "out_features"}  # the widths that scale
SUPPORTED = ", ".join(RECORDED)


@register_student("from-teacher")
def from_teacher(args: str | None, input_shape: tuple[int, ...], num_classes: int,
                 teacher_architecture: list[dict] | None = None, **context) -> nn.Sequential:
    """The teacher member's architecture at ``args`` × its widths (default 0.25); (N, *input_shape) → (N, C)."""
    spec = "from-teacher" if args is None else f"from-teacher:{args}"
    scale = DEFAULT_SCALE if args is None else _parse_scale(spec, args)
    if teacher_architecture is None:
        raise CompressorError(f"--student {spec}: from-teacher needs a member saved with a recorded architecture "
                              "(an nn.Sequential of supported layers); use --student mlp or cnn")
    return _build(teacher_architecture, scale, tuple(input_shape), num_classes, spec)


def describe_architecture(module: nn.Module) -> list[dict] | None:
    """A JSON-safe description of ``module`` if it is an nn.Sequential of supported layers, else None.

    One dict per leaf layer, in order, with its type, out width and hyperparameters (never its input width):

        describe_architecture(nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()))
        # [{"type": "Conv2d", "out_channels": 32, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
        #   "dilation": [1, 1], "bias": True, "padding_mode": "zeros"}, {"type": "ReLU"}]
    """
    if type(module) is not nn.Sequential:  # a subclass may override forward: its children do not tell the story
        return None
    description = []
    for layer in _leaves(module):
        name = type(layer).__name__
        if name not in RECORDED or type(layer) is not getattr(nn, name):
            return None
        if (name == "Conv2d" and layer.groups != 1) or (name == "MaxPool2d" and layer.return_indices):
            return None  # grouped widths and pooling indices do not survive a rescale / a Sequential
        entry: dict = {"type": name}
        for key in RECORDED[name]:
            value = (layer.bias is not None) if key == "bias" else getattr(layer, key)
            entry[key] = _json_safe(value)
        description.append(entry)
    return description or None


def build_from_architecture(architecture: list[dict], scale: float, input_shape: tuple[int, ...],
                            num_classes: int) -> nn.Sequential:
    """Rebuild ``architecture`` with its Conv2d/Linear widths × ``scale`` and its last one outputting the classes.

    ``scale`` must be in (0, 1]; at 1.0 (with the teacher's input shape and classes) the parameter count equals
    the teacher's. Returns a freshly initialised nn.Sequential in train mode, (N, *input_shape) → (N, num_classes).
    A description that does not fit (unknown layer, bad field, wrong shapes) raises CompressorError.
    """
    return _build(architecture, scale, tuple(input_shape), num_classes, f"from-teacher:{scale}")


def _build(architecture, scale: float, input_shape: tuple[int, ...], num_classes: int, spec: str) -> nn.Sequential:
    _check_scale(spec, scale)
    entries = _check_entries(architecture, spec)
    width_layers = [k for k, entry in enumerate(entries) if entry["type"] in WIDTH]
    if not width_layers:
        raise CompressorError(f"--student {spec}: the teacher's architecture has no Conv2d or Linear layer to output "
                              "the classes; use --student mlp or cnn")
    head = width_layers[-1]
    x = torch.zeros(2, *input_shape)  # (2, *input_shape): the probe that tells each layer its input width
    layers = []
    with torch.no_grad():
        for k, entry in enumerate(entries):
            layer = _build_layer(k, entry, x, scale, num_classes if k == head else None, spec, input_shape)
            layer.eval()  # batch norm must not learn running statistics from the probe
            try:
                x = layer(x)
            except Exception as exc:
                raise CompressorError(f"--student {spec}: layer {k} ({entry['type']}) cannot take an input of shape "
                                      f"{_shape(x)} ({first_line(exc)}); the teacher's "
                                      f"architecture does not fit inputs of shape {input_shape}") from exc
            layers.append(layer)
    if tuple(x.shape) != (2, num_classes):
        raise CompressorError(f"--student {spec}: the teacher's architecture outputs {_shape(x)}, not (N, "
                              f"{num_classes}); from-teacher needs a member that ends in a classifier")
    return nn.Sequential(*layers).train()


def _build_layer(k: int, entry: dict, x: torch.Tensor, scale: float, out: int | None, spec: str,
                 input_shape: tuple[int, ...]) -> nn.Module:
    """Layer ``k`` of the description, its input width read off the probe ``x``; ``out`` forces the head's width."""
    name = entry["type"]
    kwargs = {key: tuple(v) if isinstance(v, list) else v for key, v in entry.items() if key != "type"}
    need = {"Conv2d": 4, "BatchNorm2d": 4, "MaxPool2d": 4, "AvgPool2d": 4, "AdaptiveAvgPool2d": 4, "BatchNorm1d": 2}
    if name in need and x.dim() != need[name] and not (name == "BatchNorm1d" and x.dim() == 3):
        raise CompressorError(f"--student {spec}: layer {k} ({name}) cannot take an input of shape {_shape(x)}; "
                              f"the teacher's architecture does not fit inputs of shape {input_shape}")
    if name in WIDTH:
        width = kwargs.get(WIDTH[name])
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise CompressorError(f"--student {spec}: layer {k} ({name}) has {WIDTH[name]}={width!r}; "
                                  "the architecture must give a positive whole number")
        kwargs[WIDTH[name]] = out if out is not None else scaled(width, scale)
    if name == "Conv2d" or name.startswith("BatchNorm"):
        kwargs["in_channels" if name == "Conv2d" else "num_features"] = x.shape[1]
    elif name == "Linear":
        kwargs["in_features"] = x.shape[-1]
    try:
        return getattr(nn, name)(**kwargs)
    except Exception as exc:  # a missing or ill-typed field in the description
        raise CompressorError(f"--student {spec}: layer {k} ({name}) cannot be built from {entry} "
                              f"({type(exc).__name__}: {first_line(exc)})") from exc


def _check_entries(architecture, spec: str) -> list[dict]:
    """The description as a list of dicts of known types and known fields, or CompressorError naming the entry."""
    if not isinstance(architecture, (list, tuple)) or not architecture:
        raise CompressorError(f"--student {spec}: the teacher's architecture must be a non-empty list of layers, "
                              f"not {type(architecture).__name__}")
    for k, entry in enumerate(architecture):
        name = entry.get("type") if isinstance(entry, dict) else None
        if name not in RECORDED:
            raise CompressorError(f"--student {spec}: layer {k} of the teacher's architecture has unknown type "
                                  f"{name!r}; supported layers are {SUPPORTED}")
        unknown = sorted(set(entry) - {"type", *RECORDED[name]})
        if unknown:
            raise CompressorError(f"--student {spec}: layer {k} ({name}) has unknown fields {unknown}; "
                                  f"a {name} records {', '.join(RECORDED[name]) or 'no fields'}")
    return list(architecture)


def _parse_scale(spec: str, args: str) -> float:
    try:
        scale = float(args)
    except ValueError:
        scale = math.nan
    _check_scale(spec, scale)
    return scale


def _check_scale(spec: str, scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise CompressorError(f"--student {spec}: the width scale must be a number in (0, 1]; use from-teacher "
                              f"(= from-teacher:{DEFAULT_SCALE}) or from-teacher:SCALE, e.g. from-teacher:0.5")


def _leaves(module: nn.Module) -> Iterator[nn.Module]:
    for child in module.children():
        if type(child) is nn.Sequential:
            yield from _leaves(child)
        else:
            yield child


def _json_safe(value):
    if isinstance(value, (tuple, list)):
        return [_json_safe(v) for v in value]
    return value


def _shape(x: torch.Tensor) -> str:
    return "(N, " + ", ".join(map(str, x.shape[1:])) + ")"
