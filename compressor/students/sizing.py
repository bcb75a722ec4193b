"""A bare ``--student cnn`` or ``--student mlp``: a student of that family sized to the teachers by rule, chosen
from the family's ladder by a budget the user can name (``create_student("cnn")`` from Python keeps the family's
fixed default). ``--student auto`` measures instead (:mod:`compressor.training.selection`); this rule was its
default until the zoo showed it choosing 1.4k-parameter students for multi-million-parameter ensembles.

- ``--student-budget S`` (default 0.25): at most S × the multiply-adds per example of the ensemble's median member,
  counted by PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` on one example (a multiply-add is two of
  its FLOPs). Where a member cannot be counted (an ONNX member), parameters stand in for multiply-adds.
- ``--max-params N``: at most N parameters.
- ``--max-latency-ms X``: at most X ms per batch-1 call on the run's ``--target`` (each candidate exported and
  timed there, by a function the pipeline passes in; the training side never imports the targets).

The largest candidate, by multiply-adds, that meets every named limit is chosen; when none does, the smallest, with a
note. The ladders run from a few thousand parameters to a few million. Every candidate priced is kept for the report
(``student.selection``).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compressor.core.errors import CompressorError
from compressor.core.inputs import call
from compressor.students.registry import create_student

# Shallow first, then four blocks deep (two pooled pairs of widths): a deep, thin student follows its teachers
# better than a wide, shallow one of the same cost (Romero et al. 2015, FitNets; benchmarks/RESULTS.md measured
# cnn:16x32x32x64 keeping the gain a 5 k cnn:16x32 did not). ~1.4 k to ~2.1 M parameters on 1 × 28 × 28; mlp: ~25 k
# to ~6 M on 784 inputs.
CNN_LADDER = ("cnn:8x16", "cnn:16x32", "cnn:16x32x32x64", "cnn:24x48x48x96", "cnn:32x64x64x128",
              "cnn:48x96x96x192", "cnn:64x128x128x256", "cnn:96x192x192x384", "cnn:128x256x256x512")
MLP_LADDER = ("mlp:32", "mlp:64x64", "mlp:128x128", "mlp:256x256", "mlp:512x512", "mlp:800x800",
              "mlp:1200x1200", "mlp:2048x2048")


@dataclass(frozen=True)
class StudentBudget:
    """The limits ``--student auto`` sizes the student by: a share of a member's multiply-adds, and optionally a
    parameter count and a batch-1 latency on the target."""

    share: float = 0.25
    max_params: int | None = None
    max_latency_ms: float | None = None

    def check(self) -> None:
        """Refuse limits that no student can meet, in one line."""
        if not 0 < self.share:
            raise CompressorError(f"--student-budget {self.share:g}: give a share of a member's multiply-adds above "
                                  f"0 (0.25 = a quarter)")
        if self.max_params is not None and self.max_params < 1:
            raise CompressorError(f"--max-params {self.max_params}: give a number of parameters, at least 1")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise CompressorError(f"--max-latency-ms {self.max_latency_ms:g}: give milliseconds above 0")


def multiply_adds(model: nn.Module, example) -> int | None:
    """Multiply-adds of one forward pass of ``model`` on ``example`` (1, ...) (or named inputs), or None when it
    cannot be counted."""
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            call(model, example)
    except Exception:  # an ONNX member is a Python function over onnxruntime: nothing for the counter to see
        return None
    return counter.get_total_flops() // 2


SIZED_FAMILIES = ("cnn", "mlp")  # the bare --student values sized to the teachers by this rule


def ladder(input_shape: tuple[int, ...], family: str | None = None) -> tuple[str, ...]:
    """The candidate specs: the ``cnn`` or ``mlp`` ladder as ``family`` says; None: cnn for images, mlp otherwise."""
    if family is None:
        family = "cnn" if len(input_shape) == 3 else "mlp"
    return CNN_LADDER if family == "cnn" else MLP_LADDER


def _member_cost(ensemble, example) -> dict:
    """The median member's multiply-adds (or parameters where any member cannot be counted)."""
    counts = [multiply_adds(m.forward, example) if isinstance(m.forward, nn.Module) else None
              for m in ensemble.members]
    if all(c is not None for c in counts):
        return {"measure": "multiply_adds", "member": int(statistics.median(counts)), "members": counts}
    params = [m.parameters for m in ensemble.members]
    return {"measure": "parameters", "member": int(statistics.median(params)), "members": params,
            "why": "a member's multiply-adds cannot be counted (ONNX members), so parameters stand in"}


def size_student(budget: StudentBudget, ensemble, input_shape: tuple[int, ...], num_classes: int,
                 latency_ms: Callable[[nn.Module], float] | None = None, family: str | None = None,
                 named_example=None) -> tuple[str, dict]:
    """The spec a bare ``cnn`` / ``mlp`` (``family``; None: by the input's shape) resolves to under ``budget``, and
    the record of every candidate priced. ``named_example`` is a row of named inputs (text data), priced on instead
    of zeros of ``input_shape``."""
    budget.check()
    example = torch.zeros(1, *input_shape) if named_example is None else named_example[:1]
    cost = _member_cost(ensemble, example)
    limit = budget.share * cost["member"]
    candidates = []
    for spec in ladder(input_shape, family):
        model = create_student(spec, input_shape, num_classes, example=named_example).eval()
        params = sum(p.numel() for p in model.parameters())
        macs = multiply_adds(model, example)
        size = macs if cost["measure"] == "multiply_adds" else params
        row = {"spec": spec, "parameters": params, "multiply_adds": macs, "fits_budget": size <= limit}
        if budget.max_params is not None:
            row["fits_params"] = params <= budget.max_params
        if budget.max_latency_ms is not None and row["fits_budget"] and row.get("fits_params", True):
            row["latency_ms"] = round(latency_ms(model), 4)  # only for candidates the cheaper limits admit
            row["fits_latency"] = row["latency_ms"] <= budget.max_latency_ms
        row["fits"] = row["fits_budget"] and row.get("fits_params", True) and row.get("fits_latency", True)
        candidates.append(row)
    fitting = [row for row in candidates if row["fits"]]
    chosen = fitting[-1] if fitting else candidates[0]
    limits = [f"{budget.share:g} × the median member's {cost['measure'].replace('_', '-')} "
              f"({cost['member']:,} → {limit:,.0f})"]
    if budget.max_params is not None:
        limits.append(f"at most {budget.max_params:,} parameters")
    if budget.max_latency_ms is not None:
        limits.append(f"at most {budget.max_latency_ms:g} ms at batch 1 on the target")
    why = (f"the largest of {len(candidates)} candidates within " + " and ".join(limits) if fitting else
           f"no candidate meets {' and '.join(limits)}; the smallest was taken")
    record = {"requested": family or ladder(input_shape)[0].partition(":")[0], "chosen": chosen["spec"], "why": why, "budget": {"share": budget.share, "max_params": budget.max_params,
              "max_latency_ms": budget.max_latency_ms}, "member_cost": cost, "candidates": candidates}
    return chosen["spec"], record
