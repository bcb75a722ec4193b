"""``--student auto``'s candidates: every family that applies to the data, from a few thousand parameters to a few
million, each built, counted and timed on the run's target before anything trains
(:mod:`compressor.training.selection` screens them by distillation).

- images: the ``cnn`` ladder, a short ``mlp`` ladder (one member of an ensemble may be an MLP, and on small images
  an MLP can be the fastest), timm and torchvision networks built for the data's resolution (a ladder by
  multiply-adds: MobileNetV3, EfficientNet, ResNet, RegNet, ShuffleNet), and a shrunk member (``from-teacher``);
- vectors: the ``mlp`` ladder and a shrunk member;
- text: copies of the teachers' transformers config narrowed in width with their depth kept at two layers or more
  (``hf:teacher/WIDTH/LAYERS``), and the old depth-and-width halving (``hf:teacher/0.5``).

A candidate that cannot be built here (timm not installed, a network that needs larger images, an architecture the
member did not record) is kept in the record with the reason, never silently dropped.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.students.registry import create_student
from compressor.students.sizing import multiply_adds

CNN = ("cnn:8x16", "cnn:16x32", "cnn:16x32x32x64", "cnn:32x64x64x128", "cnn:64x128x128x256",
       "cnn:128x256x256x512")
MLP_FOR_IMAGES = ("mlp:128x128", "mlp:512x512", "mlp:1200x1200")
MLP = ("mlp:32", "mlp:64x64", "mlp:128x128", "mlp:256x256", "mlp:512x512", "mlp:1200x1200", "mlp:2048x2048")
TIMM = ("timm:mobilenetv3_small_050", "timm:mobilenetv3_small_100", "timm:regnetx_002", "timm:resnet10t",
        "timm:efficientnet_b0")
TORCHVISION = ("torchvision:shufflenet_v2_x0_5", "torchvision:mobilenet_v3_small", "torchvision:resnet18")
SHRUNK_MEMBER = ("from-teacher:0.25", "from-teacher:0.5")
HF_WIDTHS = (0.125, 0.25, 0.5)


def family_of(spec: str) -> str:
    """``timm:resnet18`` → ``timm``."""
    return spec.partition(":")[0]


def candidate_specs(input_shape: tuple[int, ...], named_inputs: bool, hf_config: dict | None,
                    has_architecture: bool) -> tuple[str, ...]:
    """The specs ``--student auto`` considers for these inputs (see the module docstring)."""
    if named_inputs:
        layers = int((hf_config or {}).get("num_hidden_layers", 2))
        depth = min(2, layers)
        specs = [f"hf:teacher/{w:g}/{depth}" for w in HF_WIDTHS]
        if layers > 2:
            specs.append(f"hf:teacher/0.5/{layers}")  # the teachers' full depth at half width
        return tuple(specs) + ("hf:teacher/0.5",)  # the previous rule: depth halved with width
    shrunk = SHRUNK_MEMBER if has_architecture else ()
    if len(input_shape) == 3:
        return CNN + MLP_FOR_IMAGES + TIMM + TORCHVISION + shrunk
    return MLP + shrunk


def build_candidate(spec: str, input_shape: tuple[int, ...], num_classes: int, example, teacher_architecture,
                    hf_config: dict | None) -> nn.Module:
    """The candidate ``spec`` built (seeded, eval mode) as pricing and timing see it."""
    torch.manual_seed(0)
    return create_student(spec, input_shape, num_classes, teacher_architecture=teacher_architecture,
                          teacher_config=hf_config, example=example).eval()


def price_candidates(specs: tuple[str, ...], input_shape: tuple[int, ...], num_classes: int, example,
                     teacher_architecture, hf_config: dict | None) -> list[dict]:
    """Build every spec and count its parameters and multiply-adds on one example. A spec that cannot be built
    gets ``skipped`` with the reason instead."""
    rows = []
    single = torch.zeros(1, *input_shape) if example is None else example[:1]
    for spec in specs:
        row: dict = {"spec": spec, "family": family_of(spec)}
        try:
            model = build_candidate(spec, input_shape, num_classes, example, teacher_architecture, hf_config)
        except CompressorError as exc:
            rows.append({**row, "skipped": first_line(exc)})
            continue
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["multiply_adds"] = multiply_adds(model, single)
        rows.append(row)
    return rows


EAGER_SLACK = 10.0  # a candidate this many times over the eager limit is not exported to be timed on the target


def time_candidates(rows: list[dict], build: Callable[[str], nn.Module], eager_ms: Callable[[nn.Module], float],
                    target_ms: Callable[[nn.Module], float], eager_limit_ms: float | None) -> None:
    """Time every built candidate at batch 1: in PyTorch eager (cheap), then on the target (an export each), except
    those whose eager latency is over ``EAGER_SLACK`` × ``eager_limit_ms`` (the best member's eager latency over the
    speed-up asked): exporting them would only confirm that they are too slow. Writes ``eager_ms`` and
    ``latency_ms`` (or ``not_timed``, the reason) into each row."""
    for row in rows:
        if "skipped" in row:
            continue
        model = build(row["spec"])
        row["eager_ms"] = round(eager_ms(model), 4)
        if eager_limit_ms is not None and row["eager_ms"] > EAGER_SLACK * eager_limit_ms:
            row["not_timed"] = (f"{row['eager_ms']:.3f} ms in PyTorch eager, over {EAGER_SLACK:g}× the best "
                                f"member's eager limit ({eager_limit_ms:.3f} ms): not exported")
            continue
        try:
            row["latency_ms"] = round(target_ms(model), 4)
        except CompressorError as exc:
            row["skipped"] = f"not exported to the target: {first_line(exc)}"
