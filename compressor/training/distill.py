"""The main job's training steps (3 and 4): build the student, distill it, train its hard-label baseline with the
same budget, and for a specialist ensemble distill the same student from its generalist alone.
:func:`train_students` runs them in order (or the tuning search, ``compressor.training.tuning``, in their place)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

from compressor.config import RunConfig
from compressor.data.datasets import Dataset
from compressor.students import create_student
from compressor.students.weights import load_student_weights
from compressor.teachers.ensemble import Ensemble
from compressor.training.context import RunContext
from compressor.training.loop import TrainConfig, TrainResult, train_student
from compressor.training.losses import DistillationLoss, HardLabelLoss
from compressor.training.transfer import TransferSet


@dataclass
class TrainedBaseline:
    """The hard-label baseline: the student's architecture trained without the teachers."""

    model: torch.nn.Module
    training: TrainResult


@dataclass
class Students:
    """What steps 3 and 4 hand to deployment: the options the student was trained under (a tuned run's choice), its
    transfer set, the student and its training, the hard-label baseline and the student distilled from a specialist
    ensemble's generalist (each None when not trained), and the tuning search's section of the report."""

    config: RunConfig
    transfer: TransferSet
    student: torch.nn.Module
    training: TrainResult
    baseline: TrainedBaseline | None = None
    from_generalist: TrainedBaseline | None = None
    tuning: dict | None = None


def distill_students(ctx: RunContext, transfer: TransferSet) -> Students:
    """Steps 3 and 4 at the given options: choose the student and distill it on ``transfer``, then train its
    hard-label baseline when --baseline asks (a tuned run searches both in ``compressor.training.tuning``)."""
    torch.manual_seed(ctx.config.seed)                              # the student and the baseline start alike
    student = choose_student(ctx.config, ctx.ensemble, ctx.dataset)
    training = distill(ctx, transfer, student)
    baseline = train_baseline(ctx, transfer) if ctx.config.baseline else None
    return Students(ctx.config, transfer, student, training, baseline)


def choose_student(config: RunConfig, ensemble: Ensemble, dataset: Dataset) -> torch.nn.Module:
    """Build the ``--student`` spec for the ensemble's input shape and class count, initialised from
    ``--student-weights`` when given (every tensor whose name and shape match)."""
    architecture = next((m.architecture for m in ensemble.members if m.architecture), None)
    student = create_student(config.student, tuple(dataset.input_shape), ensemble.num_classes,
                             teacher_architecture=architecture, teacher_config=ensemble.metadata.get("hf_config"),
                             example=dataset.example())
    if config.student_weights is not None:
        load_student_weights(student, config.student_weights)
    return student


def distill(ctx: RunContext, transfer: TransferSet, student: torch.nn.Module, folder: str = "checkpoints",
            until: int | None = None, resume: bool | None = None) -> TrainResult:
    """Train the student on the ensemble's soft targets at temperature T, mixed with the hard labels, on this
    rank's device, checkpointing into ``<out>/<folder>``; the student is back on the CPU afterwards.

    With α = 0 the teachers play no part: the labels alone train it, on the recipe's labelled views (what a tuned
    baseline is). ``until`` pauses after that epoch (a tuning rung); ``resume`` overrides --resume."""
    config = ctx.config
    hard = transfer.alpha == 0
    loss = HardLabelLoss() if hard else DistillationLoss(temperature=config.temperature, alpha=transfer.alpha,
                                                         combine=transfer.combine, weights=transfer.weights)
    fingerprint = {
        "teacher_sha256": ctx.ensemble.fingerprint(), "data_sha256": ctx.dataset.fingerprint(),
        "student": config.student, "temperature": config.temperature, "alpha": transfer.alpha,
        "normalisation": json.dumps(ctx.normalisation, sort_keys=True),
        "transfer_set": {key: transfer.info.get(key)
                         for key in ("unlabeled", "omitted_classes", "best_epoch_by", "recipe", "augmentation")},
        "teacher_logits": "recomputed every batch" if config.no_cache else "teacher cache",
        "soft_targets": transfer.info.get("soft_targets"),
    }
    resume = config.resume if resume is None else resume
    checkpoints = config.output_dir() / folder
    if (checkpoints / "last.pt").exists() and not resume:
        ctx.console.print(f"[yellow]note:[/] {checkpoints / 'last.pt'} exists; starting over (pass --resume to "
                          f"continue it)")
    student.to(ctx.world.device)
    try:
        return train_student(student, transfer.x, transfer.y, None if hard else transfer.teacher, ctx.tensors.x_val,
                             transfer.y_val, loss, train_config(config), checkpoints, resume=resume,
                             fingerprint=fingerprint,
                             view=transfer.recipe.baseline_view if hard else transfer.recipe.view, until=until)
    finally:
        student.cpu()


def distill_generalist(ctx: RunContext, transfer: TransferSet) -> TrainedBaseline | None:
    """For a specialist ensemble, the same student distilled from its generalist alone with the same budget, so
    the report shows what the specialists add to distillation; None for any other ensemble."""
    if transfer.generalist is None:
        return None
    config = ctx.config
    ctx.console.print(f"[bold]student from the generalist[/] {config.student}, the same budget, the generalist's "
                      f"soft targets alone")
    torch.manual_seed(config.seed)
    model = choose_student(config, ctx.ensemble, ctx.dataset)
    alone = dataclasses.replace(transfer, teacher=transfer.generalist, generalist=None,
                                info={**transfer.info, "soft_targets": "the generalist alone"})
    training = distill(ctx, alone, model, folder="checkpoints-generalist")
    return TrainedBaseline(model, training)


def train_config(config: RunConfig) -> TrainConfig:
    """The training loop's settings from the run's options."""
    return TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, seed=config.seed, amp=config.amp, progress=config.progress)


def train_baseline(ctx: RunContext, transfer: TransferSet) -> TrainedBaseline | None:
    """The student's architecture trained on the hard labels alone with the same budget (--baseline).

    Same initial weights, epochs, schedule and batch order as the distilled student, and the best epoch on
    validation like it, so the comparison shows what the teachers add and not what a longer schedule adds.
    """
    config = ctx.config
    if int((transfer.y >= 0).sum()) == 0:
        ctx.console.print("[yellow]note:[/] --baseline skipped: the transfer set has no labels to train it on")
        return None
    torch.manual_seed(config.seed)
    model = choose_student(config, ctx.ensemble, ctx.dataset).to(ctx.world.device)
    ctx.console.print(f"[bold]baseline[/] {config.student} on the hard labels alone, {config.epochs} epochs")
    fingerprint = {"data_sha256": ctx.dataset.fingerprint(), "student": config.student, "loss": "hard-label",
                   "omitted_classes": transfer.info.get("omitted_classes"), "recipe": config.recipe}
    training = train_student(model, transfer.x, transfer.y, None, ctx.tensors.x_val, transfer.y_val,
                             HardLabelLoss(), train_config(config), config.output_dir() / "checkpoints-baseline",
                             resume=config.resume, fingerprint=fingerprint, view=transfer.recipe.baseline_view)
    return TrainedBaseline(model.cpu(), training)
