"""Running a PyTorch classifier on held-out inputs, and the facts about a module every step reports: the logits and
accuracy of a model on a split (the loop's validation, the diagnostics, parity and the report all call these), where
its weights live, and how many parameters it has."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from compressor.core.inputs import call


def parameter_count(model: nn.Module) -> int:
    """The number of parameters (elements, not tensors) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def device_of(model: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer) of ``model``; the CPU for a module without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def bf16_autocast(device, enabled: bool):
    """bfloat16 autocast on ``device`` (a name or torch.device) when ``enabled``, else a context that does nothing:
    the one switch behind --amp bf16 (the student) and --teacher-precision bf16 (the teachers)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _layout_of(model: nn.Module) -> torch.memory_format:
    """channels-last when the model's first 4-D weight is stored that way (a student training on the CPU), else
    the default layout."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    if weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _in_layout(x, layout: torch.memory_format):
    return x.contiguous(memory_format=layout) if x.dim() == 4 and layout is torch.channels_last else x


@torch.no_grad()
def predict_logits(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Logits ``(N, C)`` of ``model`` on ``x`` ``(N, ...)`` (or named inputs), in eval mode and batches of
    ``batch_size``.

    Batches are moved to the model's device, in its memory layout (channels-last while it trains in it); the result
    is on the CPU. The model's train/eval mode is restored afterwards.
    """
    device, layout = device_of(model), _layout_of(model)
    was_training = model.training
    model.eval()
    try:
        outs = [call(model, _in_layout(x[i : i + batch_size].to(device), layout)).float().cpu()
                for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training)
    if not outs:
        return torch.empty(0, 0)
    return torch.cat(outs)  # (N, C)


def evaluate_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on the rows of ``x`` whose label ``y`` is >= 0.

    Unlabeled rows (``y == -1``) are skipped before the model sees them; with no labeled row the
    result is ``nan``.
    """
    labeled = y >= 0  # (N,)
    n = int(labeled.sum())
    if n == 0:
        return float("nan")
    preds = predict_logits(model, x[labeled.to(x.device)], batch_size).argmax(dim=1)  # (n,)
    return float((preds == y[labeled].cpu()).sum()) / n

