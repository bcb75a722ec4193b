"""The main job's steps one by one, for people who script them: :func:`choose_student`, :func:`distill`,
:func:`export` and :func:`benchmark`. Each calls the function :func:`compressor.pipeline.run` calls for that step,
after the same checks (options, data, teachers), and raises the same errors; what it takes and returns are plain
objects (modules, tensors, dicts) instead of a run's context.

Like :func:`compressor.compress`, ``choose_student`` and ``distill`` take the teachers (modules, a file or an
Ensemble), the data (a spec or :class:`compressor.Data`) and the command's options by their Python names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from compressor.api import config_and_sources, epochs_to, logging_console
from compressor.core.errors import OptionError
from compressor.core.inference import parameter_count, predict_logits
from compressor.core.inputs import NamedInputs, example_of
from compressor.deployment.rows import runner_row
from compressor.pipeline import check_before_any_work, start, start_budget, timers
from compressor.training.budget import RunBudget
from compressor.training.context import RunContext
from compressor.training.distill import distill_students
from compressor.training.planning import plan_training
from compressor.training.teacher_outputs import teacher_outputs
from compressor.training.transfer import TransferSet, transfer_set
from targets.base import Artifact, check_target_available, get_target
from targets.benchmark import sweep
from targets.eager import BACKEND as EAGER
from targets.eager import EagerRunner
from targets.parity import ParityResult, check_parity, enforce_parity


@dataclass
class Choice:
    """The student the main job settles on: its spec, α, T and epochs, and the record ``selection.json`` keeps
    (the candidates, their prices and the screen; None for a spec given as is)."""

    spec: str
    alpha: float
    temperature: float
    epochs: int
    selection: dict | None = None
    budget: dict = field(default_factory=dict)


@dataclass
class Distilled:
    """A distilled student (eval mode), its training history (one dict per epoch) and the choice it trained
    under; ``baseline``: the same architecture on the hard labels alone (with ``baseline=True``), else None."""

    student: torch.nn.Module
    history: list[dict]
    choice: Choice
    baseline: torch.nn.Module | None = None


@dataclass
class Exported:
    """An export: the artifact (files, inputs, outputs), its loaded runner (``runner.infer(x)``) and its parity
    with PyTorch on the example rows."""

    artifact: Artifact
    runner: object
    parity: ParityResult
    parameters: int


def choose_student(teachers, data=None, target: str = "onnxruntime", student: str = "auto", out=None,
                   **options) -> Choice:
    """The student ``compress`` would train, settled as it settles it: ``student="auto"`` prices every candidate
    on ``target``, screens them by distillation on validation within ``budget`` minutes and picks one with α and
    T; a bare ``cnn`` / ``mlp`` is sized to the teachers; the epochs are what the budget buys (or ``epochs``).
    The screen's checkpoints land in ``<out>/selection/``."""
    ctx, transfer, budget = _prepared(teachers, data, target, student, out, options)
    ctx, _, bought = plan_training(ctx, transfer, budget, timers(ctx))
    return _choice(ctx, bought)


def distill(teachers, data=None, student: "str | Choice" = "auto", out=None, target: str = "onnxruntime",
            on_epoch: Callable[[dict], None] | None = None, **options) -> Distilled:
    """Distil the teachers into ``student`` (a spec such as ``"mlp:256"`` or ``"timm:resnet18"``, ``"auto"``, or a
    :class:`Choice`, whose α, T and epochs it keeps) on ``data`` as ``compress`` does, checkpointing into
    ``<out>/checkpoints``; ``on_epoch(record)`` hears every epoch. Returns the student and its history."""
    if isinstance(student, Choice):
        options = {"alpha": student.alpha, "temperature": student.temperature, "epochs": student.epochs, **options}
        student = student.spec
    ctx, transfer, budget = _prepared(teachers, data, target, student, out, options)
    with epochs_to(on_epoch):
        ctx, transfer, bought = plan_training(ctx, transfer, budget, timers(ctx))
        students = distill_students(ctx, transfer)
    return Distilled(students.student, students.training.history, _choice(ctx, bought),
                     None if students.baseline is None else students.baseline.model)


def export(student: torch.nn.Module, target: str = "onnxruntime", example=None, out: str | Path = "export",
           precision: str = "fp32", calibration=None, labels=None, max_accuracy_drop: float = 1.0,
           threads: int | None = None) -> Exported:
    """Export ``student`` to ``target`` in ``out`` at ``precision``, load it there and check its parity with PyTorch
    on ``example`` (a batch (N, ...) of real rows, or a dict of token tensors; int8 also needs ``calibration``
    rows and ``labels`` for its accuracy gate), as the main job exports its student. Raises CompressorError when
    the target is unavailable here or parity fails."""
    if example is None:
        raise OptionError("export: give example=, a batch of real input rows (N, ...) the parity check runs on")
    check_target_available(target, precision)
    if isinstance(example, dict):  # token inputs by name: every row counted at its full width
        tensors = {name: torch.as_tensor(value) for name, value in example.items()}
        rows, width = next(iter(tensors.values())).shape
        example = NamedInputs(tensors, torch.full((rows,), width))
    else:
        example = torch.as_tensor(example)
    options = {} if calibration is None else {"calibration": np.asarray(calibration)}
    handler = get_target(target)
    artifact = handler.export(student.eval(), example_of(example), Path(out), precision, **options)
    runner = handler.load(artifact, threads=threads)
    parity = check_parity(predict_logits(student, example).numpy(), runner.infer(example.numpy()), precision,
                          labels=None if labels is None else np.asarray(labels),
                          max_accuracy_drop=max_accuracy_drop)
    enforce_parity(parity, f"{target} {precision} export {artifact.files['model']}")
    return Exported(artifact, runner, parity, parameter_count(student))


def benchmark(rows: dict, inputs, labels=None, batch_sizes: tuple[int, ...] = (1, 64), warmup: float = 0.2,
              duration: float = 1.0, rounds: int = 2) -> list[dict]:
    """Score and time every row on ``inputs`` (an array (N, ...), or (N, L) token arrays by name) with the main
    job's harness: ``rows`` maps a name to an ``nn.Module`` (PyTorch eager) or an :class:`Exported`. Returns one
    dict per row: accuracy against ``labels`` (and agreement with the first row) and latency per batch size, timed
    in ``rounds`` interleaved rounds so a busy spell of the machine lands in every row alike."""
    if not rows:
        raise OptionError("benchmark: give rows, e.g. {'student': model, 'export': compressor.export(...)}")
    pool = {name: np.asarray(a) for name, a in inputs.items()} if isinstance(inputs, dict) else np.asarray(inputs)
    built = []
    for name, row in rows.items():
        if isinstance(row, Exported):
            runner, backend, precision, parameters = row.runner, row.artifact.target, row.artifact.precision, \
                row.parameters
        elif isinstance(row, torch.nn.Module):
            runner, backend, precision, parameters = EagerRunner(row.eval()), EAGER, "fp32", parameter_count(row)
        else:
            raise OptionError(f"benchmark: row {name!r} is a {type(row).__name__}; give an nn.Module or what "
                              f"compressor.export returned")
        built.append(runner_row(name, "model", backend, precision, parameters, runner.infer(pool), runner, pool))
    y = np.full(len(built[0].scores), -1) if labels is None else np.asarray(labels)
    measured = [row.describe(y, built[0].scores) for row in built]
    for entry, latency in zip(measured, sweep([row.measure for row in built], tuple(batch_sizes), warmup, duration,
                                              rounds)):
        entry["latency"] = latency
    return measured


def _prepared(teachers, data, target: str, student: str, out, options: dict
              ) -> tuple[RunContext, TransferSet, RunBudget]:
    """The run up to its transfer set, as :func:`compressor.pipeline.run` gets there: every check, the teachers
    and data loaded, the teachers' logits (through the cache), ``--out`` created and the budget's clock running."""
    config, sources = config_and_sources(teachers, data, target, student, out, options)
    check_before_any_work(config, sources)
    ctx = start(config, logging_console(), sources)
    ctx.teacher = teacher_outputs(ctx)
    transfer = transfer_set(ctx)
    config.output_dir().mkdir(parents=True, exist_ok=True)
    return ctx, transfer, start_budget(ctx)


def _choice(ctx: RunContext, bought: dict) -> Choice:
    config = ctx.config
    return Choice(config.student, config.alpha, config.temperature, config.epochs, ctx.student_selection, bought)
