"""The report's comparison: every model it compares, scored on the same test split and timed by the same harness.

Part of the pipeline layer: it joins the training side (``Ensemble``, students) to ``targets`` (the harness and
the runners).

Rows, in the order the report prints them (DESIGN.md, Benchmark and report):

- the ensemble in PyTorch eager, and exported to the target (the same members through the same backend, so the
  report can separate what distillation buys from what the backend buys);
- each member in PyTorch eager;
- the hard-label baseline (the student's architecture trained on the labels alone, same budget), when asked;
- for a specialist ensemble (paper §5), its generalist as the one member row, and the same student distilled from
  the generalist alone (same budget), so the report shows what the specialists add;
- the distilled student in PyTorch eager and on the target.

Every row is a Runner (``targets.base``), PyTorch eager included (``targets.eager``), timed by one function
(:func:`targets.benchmark.runner_measure`) and swept by :func:`targets.benchmark.sweep` in interleaved rounds, so
a busy spell of the machine cannot favour one row. Each row says what its timing covers (``timed``): PyTorch rows
run on CUDA when a GPU is visible (host latency plus H2D / compute / D2H device times from CUDA events) and on the
CPU otherwise; exported rows time the runner's ``infer`` on a numpy batch, copies included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from compressor.core.inference import parameter_count
from compressor.core.metrics import classification_metrics
from compressor.teachers.ensemble import Ensemble
from targets.benchmark import Measure, runner_measure
from targets.feeds import Feed
from targets.eager import BACKEND as EAGER
from targets.eager import EagerRunner


@dataclass
class Row:
    """One model on one backend: its test-split scores (N, C), the Runner that serves it, and how to time it."""

    model: str         # what a person reads: "ensemble", "member cnn", "baseline", "student"
    kind: str          # "ensemble" | "member" | "baseline" | "student"
    backend: str       # "PyTorch eager" or the target's name
    device: str        # "cpu" | "cuda"
    precision: str
    parameters: int
    timed: str         # what one timed call covers
    scores: np.ndarray  # (N, C) logits or log-probabilities on the test split
    measure: Measure

    def describe(self, labels: np.ndarray, reference: np.ndarray) -> dict:
        """The row's report entry without latency: identity, what was timed, and accuracy against the ensemble."""
        accuracy = classification_metrics(self.scores, labels, reference)
        accuracy["kl_to_ensemble"] = accuracy.pop("kl_to_reference")
        return {"model": self.model, "kind": self.kind, "backend": self.backend, "device": self.device,
                "precision": self.precision, "parameters": self.parameters, "timed": self.timed,
                "accuracy": accuracy}


def runner_row(model: str, kind: str, backend: str, precision: str, parameters: int, scores: np.ndarray,
               runner, pool: Feed, timed_note: str = "") -> Row:
    """A row served by ``runner`` (any backend, PyTorch eager included), timed on batches cut from ``pool`` (an array,
    or arrays by name for named inputs)."""
    measure, timed = runner_measure(runner, pool)
    return Row(model, kind, backend, runner.info.get("device", "cpu"), precision, parameters, timed + timed_note,
               scores, measure)


INFER_ROWS = 1024  # test rows sent to a runner at a time: a streamed test split is never in RAM whole


def infer_rows(runner, x) -> np.ndarray:
    """``runner``'s outputs (N, C) on every row of ``x`` (a tensor, or a streamed split read chunk by chunk)."""
    return np.concatenate([runner.infer(x[i:i + INFER_ROWS].numpy()) for i in range(0, len(x), INFER_ROWS)])


def eager_device(ensemble: Ensemble) -> str:
    """Where the PyTorch rows run: CUDA when visible and every member is a PyTorch module, else the CPU."""
    return "cuda" if torch.cuda.is_available() and _all_modules(ensemble) else "cpu"


def _all_modules(ensemble: Ensemble) -> bool:
    """Whether every member is a PyTorch module (not an ONNX file run by onnxruntime)."""
    return all(isinstance(member.forward, torch.nn.Module) for member in ensemble.members)


def on_device(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module`` itself on the CPU, an eval-mode copy on CUDA (the trained student stays where it is)."""
    return module.eval() if device == "cpu" else copy.deepcopy(module).to(device).eval()


def ensemble_rows(ensemble: Ensemble, member_logits: torch.Tensor, pool: Feed, device: str,
                  target: str, runner=None, x_test=None) -> list[Row]:
    """The ensemble in PyTorch, on the target (when exported), and each member in PyTorch.

    ``member_logits`` (K, N, C) are the members' test-split logits, already computed once by the pipeline.
    """
    scores = ensemble.log_probs(member_logits).numpy()  # (N, C)
    if _all_modules(ensemble):
        forward = on_device(ensemble.eager_module(), device)
    else:  # ONNX members run by onnxruntime: the same mixture, without member_logits' chunking and NaN checks
        def forward(*inputs):  # one input tensor, or named inputs' tensors in order
            return ensemble.log_probs(torch.stack([member(*inputs).float() for member in ensemble.members]))
    rows = [runner_row("ensemble", "ensemble", EAGER, "fp32", ensemble.parameters, scores,
                       EagerRunner(forward, device), pool, f"; all {len(ensemble.members)} members and the mixture")]
    if runner is not None:
        rows.append(runner_row("ensemble", "ensemble", target, "fp32", ensemble.parameters, infer_rows(runner, x_test),
                               runner, pool))
    # a specialist's (N, C) output spreads its dustbin over the other classes, so only the generalist is a row
    members = ensemble.members[:1] if ensemble.specialist_subsets is not None else ensemble.members
    for k, member in enumerate(members):
        forward = on_device(member.forward, device) if device == "cuda" else member
        rows.append(runner_row(f"member {member.name}", "member", EAGER, "fp32", member.parameters,
                               member_logits[k].numpy(), EagerRunner(forward, device), pool))
    return rows


def student_rows(kind: str, student: torch.nn.Module, scores: np.ndarray, pool: Feed, device: str,
                 target: str | None = None, runners: list[tuple[object, str]] = (),
                 x_test=None, label: str | None = None) -> list[Row]:
    """A student (``kind`` "student", "baseline" or "generalist-student") in PyTorch eager, then on the target per
    (runner, precision); ``label`` is what the report calls it (default: ``kind``)."""
    parameters = parameter_count(student)
    label = label or kind
    rows = [runner_row(label, kind, EAGER, "fp32", parameters, scores,
                       EagerRunner(on_device(student, device), device), pool)]
    for runner, precision in runners:
        rows.append(runner_row(label, kind, target, precision, parameters, infer_rows(runner, x_test), runner,
                               pool))
    return rows
