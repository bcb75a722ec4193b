"""``--student cnn[:C1xC2x...]``: a small all-convolutional classifier for (C, H, W) images.

Each width adds one block conv3×3 (padding 1, no bias: BatchNorm supplies it) → BatchNorm → ReLU, followed by a
2×2 max-pool while both spatial sides are at least 2, so the same spec runs on 8×8 digits (8 → 4 → 2) and on
28×28 images (28 → 14 → 7). Global average pooling then makes the head independent of the input size, and one
Linear maps the last width to the classes. Default 16x32: about 5 k parameters, far below the 64/128-channel
CNNs or 1200-1200 MLPs typically distilled into it.
"""

from __future__ import annotations

from torch import nn

from compressor.core.errors import CompressorError
from compressor.students.registry import parse_widths, register_student

DEFAULT_WIDTHS = (16, 32)


@register_student("cnn")
def cnn(args: str | None, input_shape: tuple[int, ...], num_classes: int, **context) -> nn.Sequential:
    """[Conv3×3 → BN → ReLU (→ MaxPool 2×2)] per width → global average pool → Linear; (N, C, H, W) → (N, classes)."""
    spec = "cnn" if args is None else f"cnn:{args}"
    widths = parse_widths("cnn", args, DEFAULT_WIDTHS)
    if len(input_shape) != 3:
        raise CompressorError(f"--student {spec}: a cnn needs image inputs (channels, height, width) but the data's "
                              f"input shape is {tuple(input_shape)}; use --student mlp for vector inputs")
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels in widths:
        layers += [nn.Conv2d(channels, out_channels, 3, padding=1, bias=False),  # (N, out, H, W)
                   nn.BatchNorm2d(out_channels), nn.ReLU()]
        if min(height, width) >= 2:  # pool only while there is something to pool: keeps 8×8 inputs ≥ 1×1
            layers.append(nn.MaxPool2d(2))  # (N, out, H/2, W/2)
            height, width = height // 2, width // 2
        channels = out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, channels)
               nn.Linear(channels, num_classes)]  # (N, classes)
    return nn.Sequential(*layers)
