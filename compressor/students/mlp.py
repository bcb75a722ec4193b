"""``--student mlp[:W1xW2x...]``: a plain ReLU multilayer perceptron over the flattened input.

The default, two hidden layers of 800 units, is the distilled student of Hinton, Vinyals & Dean (2015),
"Distilling the Knowledge in a Neural Network", §3 (MNIST: 800-800 student from a 1200-1200 teacher).
``Flatten`` comes first, so any input shape works: (64,) vectors, (1, 8, 8) digits, (1, 28, 28) images.
"""

from __future__ import annotations

import math

from torch import nn

from compressor.students.registry import parse_widths, register_student

DEFAULT_WIDTHS = (800, 800)


@register_student("mlp")
def mlp(args: str | None, input_shape: tuple[int, ...], num_classes: int, **context) -> nn.Sequential:
    """Flatten → [Linear → ReLU] per hidden width → Linear to ``num_classes``; (N, *input_shape) → (N, C)."""
    widths = parse_widths("mlp", args, DEFAULT_WIDTHS)
    layers: list[nn.Module] = [nn.Flatten()]  # (N, *input_shape) → (N, D)
    features = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(features, width), nn.ReLU()]  # (N, width)
        features = width
    layers.append(nn.Linear(features, num_classes))  # (N, C)
    return nn.Sequential(*layers)
