"""How a training step computes, beside what it computes: the student's autocast (``--amp``) and its memory
layout."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.core.inference import bf16_autocast

AMP_MODES = ("none", "bf16")


def check_amp(amp: str, device: torch.device) -> None:
    """Refuse an ``--amp`` mode this device cannot run, in one line."""
    if amp not in AMP_MODES:
        raise CompressorError(f"--amp {amp}: choose one of {', '.join(AMP_MODES)}")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CompressorError(f"--amp bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                              f"drop --amp (fp32) or use an Ampere or newer GPU")


def autocast_for(amp: str, device: torch.device):
    """bfloat16 autocast for ``--amp bf16``, else nothing."""
    return bf16_autocast(device, amp == "bf16")


def memory_format_for(student: nn.Module, device: torch.device) -> torch.memory_format:
    """channels-last for a convolutional student on the CPU, where oneDNN's convolutions train 1.06-1.23× faster in
    it (benchmarks/RESULTS.md, issue 22 item 3); the default layout everywhere else."""
    convolutional = any(isinstance(m, nn.Conv2d) for m in student.modules())
    return torch.channels_last if convolutional and device.type == "cpu" else torch.contiguous_format
