"""The main job's training steps (3 and 4): build the student, distill it, train its hard-label baseline with the
same budget, and for a specialist ensemble distill the same student from its generalist alone.
:func:`train_students` runs them in order (or the tuning search, ``compressor.training.tuning``, in their place)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compressor.config import RunConfig
from compressor.data.datasets import Dataset
from compressor.students import create_student
from compressor.students.weights import load_student_weights
from compressor.teachers.ensemble import Ensemble
from compressor.training.checkpoints import LAST_NAME
from compressor.training.context import RunContext
from compressor.training.loop import TrainConfig, TrainResult, train_student
from compressor.training.losses import DistillationLoss, HardLabelLoss
from compressor.training.omitted_classes import keep_rows
from compressor.training.recipes import make_recipe, soft_weight
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

    def seconds(self) -> float:
        """Seconds the student's and the baseline's trainings took (a tuned run: its search)."""
        if self.tuning is not None:
            return float(self.tuning["seconds"])
        return sum(t.training.seconds for t in (self, self.baseline) if t is not None)


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
                                                         combine=transfer.combine, weights=transfer.weights,
                                                         variant=config.loss, beta=config.beta)
    fingerprint = distill_fingerprint(ctx, transfer.alpha, transfer.info)
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


def distill_fingerprint(ctx: RunContext, alpha: float | None, info: dict) -> dict:
    """What a distilled student's checkpoints are tied to, so --resume refuses one written under anything else:
    the teachers, the data, the student, T, α and the transfer set's ``info`` (TransferSet.info)."""
    config = ctx.config
    return {
        "teacher_sha256": ctx.ensemble.fingerprint(), "data_sha256": ctx.dataset.fingerprint(),
        "student": config.student, "temperature": config.temperature, "alpha": alpha,
        "normalisation": json.dumps(ctx.normalisation, sort_keys=True),
        "transfer_set": {key: info.get(key)
                         for key in ("unlabeled", "omitted_classes", "best_epoch_by", "recipe", "augmentation")},
        "teacher_logits": "recomputed every batch" if config.no_cache else "teacher cache",
        "soft_targets": info.get("soft_targets"),
        **({} if config.loss == "kd" else {"loss": config.loss, "beta": config.beta}),  # kd: as before --loss
    }


def baseline_fingerprint(ctx: RunContext) -> dict:
    """What the hard-label baseline's checkpoints are tied to (all of it known before the teachers run)."""
    config = ctx.config
    return {"data_sha256": ctx.dataset.fingerprint(), "student": config.student, "loss": "hard-label",
            "omitted_classes": list(ctx.omitted) or None, "recipe": config.recipe}


# fingerprint entries that the options, the teachers and the data fix whatever the recipe: a tuning trial's share
_RUN_KEYS = ("teacher_sha256", "data_sha256", "student", "normalisation", "teacher_logits")


def resume_points(ctx: RunContext) -> list[tuple[Path, dict | None, dict]]:
    """Every ``last.pt`` --resume may continue from in --out, with the training settings it must have been written
    under (None: a tuning trial's own) and the part of its fingerprint known before the teachers run (the rest,
    decided by the data and the teachers, is checked when training resumes)."""
    config, out = ctx.config, ctx.config.output_dir()
    settings = asdict(train_config(config))
    if config.tuned:  # the search chooses the recipe, T and α per trial: only what every trial shares is known
        shared = distill_fingerprint(ctx, None, {})
        student = {key: shared[key] for key in _RUN_KEYS}
        points = [(path, None, student) for path in sorted((out / "tuning").glob(f"**/{LAST_NAME}"))]
    else:
        student = _student_fingerprint(ctx)
        points = [(out / "checkpoints" / LAST_NAME, settings, student)]
        if config.baseline:
            points.append((out / "checkpoints-baseline" / LAST_NAME, settings, baseline_fingerprint(ctx)))
    if ctx.ensemble.specialist_subsets is not None:  # the same student from the generalist alone, same options
        points.append((out / "checkpoints-generalist" / LAST_NAME, settings, student))
    return points


def _student_fingerprint(ctx: RunContext) -> dict:
    """:func:`distill_fingerprint` as far as the options and the data decide it, before the teachers run: the
    recipe, α and the labels as ``transfer_set`` will find them."""
    config, x, y = ctx.config, ctx.tensors.x_train, ctx.tensors.y_train
    recipe = make_recipe(config.recipe, tuple(x.shape[1:]), x, config.seed)
    kept = y[keep_rows(y, ctx.omitted)] if ctx.omitted else y
    alpha = soft_weight(config.alpha, recipe, not config.unlabeled and bool((kept >= 0).any()))
    info = {"unlabeled": config.unlabeled, "omitted_classes": list(ctx.omitted) or None, **recipe.describe()}
    fingerprint = distill_fingerprint(ctx, alpha, info)
    # these two follow from the validation labels and the kind of ensemble, which the hashes above already cover
    del fingerprint["transfer_set"]["best_epoch_by"], fingerprint["soft_targets"]
    return fingerprint


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
    training = train_student(model, transfer.x, transfer.y, None, ctx.tensors.x_val, transfer.y_val,
                             HardLabelLoss(), train_config(config), config.output_dir() / "checkpoints-baseline",
                             resume=config.resume, fingerprint=baseline_fingerprint(ctx),
                             view=transfer.recipe.baseline_view)
    return TrainedBaseline(model.cpu(), training)
