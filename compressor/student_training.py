"""The main job's training steps (3 and 4 of ``compressor.pipeline``): build the student, distill it, train its
hard-label baseline with the same budget, distill the same student from a specialist ensemble's generalist alone,
and the tuning search (``--tune``, ``--recipe auto``) that chooses the recipe and trains both families.

Split out of ``pipeline.py`` so that file stays a table of contents; these steps use the training package only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from rich.console import Console

from compressor.augment import default_augmentation
from compressor.config import RunConfig
from compressor.data import Dataset
from compressor.distill import TrainConfig, TrainResult, train_student
from compressor.distributed import World
from compressor.losses import DistillationLoss, HardLabelLoss
from compressor.students import create_student
from compressor.teachers import Ensemble
from compressor.transfer import TeacherOutputs, Tensors, TransferSet, transfer_set
from compressor.tuning import DEFAULT_TUNE_MINUTES, search_space, successive_halving


@dataclass
class TrainedBaseline:
    """The hard-label baseline: the student's architecture trained without the teachers."""

    model: torch.nn.Module
    training: TrainResult


def choose_student(config: RunConfig, ensemble: Ensemble, dataset: Dataset) -> torch.nn.Module:
    """Build the ``--student`` spec for the ensemble's input shape and class count."""
    architecture = next((m.architecture for m in ensemble.members if m.architecture), None)
    return create_student(config.student, tuple(dataset.input_shape), ensemble.num_classes,
                          teacher_architecture=architecture)


def distill(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, transfer: TransferSet,
            student: torch.nn.Module, normalisation: dict | None, world: World, console: Console,
            folder: str = "checkpoints", until: int | None = None, resume: bool | None = None) -> TrainResult:
    """Train the student on the ensemble's soft targets at temperature T, mixed with the hard labels, on this
    rank's device, checkpointing into ``<out>/<folder>``; the student is back on the CPU afterwards.

    With α = 0 the teachers play no part: the labels alone train it, on the recipe's labelled views (what a tuned
    baseline is). ``until`` pauses after that epoch (a tuning rung); ``resume`` overrides --resume."""
    hard = transfer.alpha == 0
    loss = HardLabelLoss() if hard else DistillationLoss(temperature=config.temperature, alpha=transfer.alpha,
                                                         combine=transfer.combine, weights=transfer.weights)
    fingerprint = {
        "teacher_sha256": ensemble.fingerprint(), "data_sha256": dataset.fingerprint(),
        "student": config.student, "temperature": config.temperature, "alpha": transfer.alpha,
        "normalisation": json.dumps(normalisation, sort_keys=True),
        "transfer_set": {key: transfer.info.get(key)
                         for key in ("unlabeled", "omitted_classes", "best_epoch_by", "recipe", "augmentation")},
        "teacher_logits": "recomputed every batch" if config.no_cache else "teacher cache",
        "soft_targets": transfer.info.get("soft_targets"),
    }
    resume = config.resume if resume is None else resume
    checkpoints = config.output_dir() / folder
    if (checkpoints / "last.pt").exists() and not resume:
        console.print(f"[yellow]note:[/] {checkpoints / 'last.pt'} exists; starting over (pass --resume to continue it)")
    student.to(world.device)
    try:
        return train_student(student, transfer.x, transfer.y, None if hard else transfer.teacher, tensors.x_val,
                             transfer.y_val, loss, train_config(config), checkpoints, resume=resume,
                             fingerprint=fingerprint,
                             view=transfer.recipe.baseline_view if hard else transfer.recipe.view, until=until)
    finally:
        student.cpu()


def distill_generalist(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors,
                       transfer: TransferSet, normalisation: dict | None, world: World,
                       console: Console) -> TrainedBaseline | None:
    """For a specialist ensemble, the same student distilled from its generalist alone with the same budget, so
    the report shows what the specialists add to distillation; None for any other ensemble."""
    if transfer.generalist is None:
        return None
    console.print(f"[bold]student from the generalist[/] {config.student}, the same budget, the generalist's soft "
                  f"targets alone")
    torch.manual_seed(config.seed)
    model = choose_student(config, ensemble, dataset)
    alone = dataclasses.replace(transfer, teacher=transfer.generalist, generalist=None,
                                info={**transfer.info, "soft_targets": "the generalist alone"})
    training = distill(config, ensemble, dataset, tensors, alone, model, normalisation, world, console,
                       folder="checkpoints-generalist")
    return TrainedBaseline(model, training)


@dataclass
class TunedRun:
    """What --tune (or --recipe auto) hands on: the chosen configuration, its transfer set and student, the tuned
    hard-label baseline, and the search for the report."""

    config: RunConfig
    transfer: TransferSet
    student: torch.nn.Module
    training: TrainResult
    baseline: TrainedBaseline | None
    report: dict


def tune(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, teacher: TeacherOutputs,
         omitted: tuple[int, ...], normalisation: dict | None, world: World, console: Console) -> TunedRun:
    """Successive halving on validation (compressor.tuning) over recipe, T, α, lr and epochs, with the hard-label
    family tuned alike as the baseline. Trials checkpoint into ``<out>/tuning/<trial>/``; with --resume a killed
    search continues where it stopped. Each recipe's transfer set (and its view cache) is built once."""
    transfers: dict[str, TransferSet] = {}

    def trial_config(trial) -> RunConfig:
        return dataclasses.replace(config, recipe=trial.recipe, temperature=trial.temperature, alpha=trial.alpha,
                                   lr=trial.lr, epochs=trial.epochs)

    def trial_transfer(trial) -> TransferSet:
        if trial.recipe not in transfers:
            transfers[trial.recipe] = transfer_set(trial_config(trial), ensemble, tensors, teacher, omitted,
                                                   Console(stderr=True, quiet=True))
        transfer = transfers[trial.recipe]
        alpha = transfer.alpha if transfer.recipe.alpha is not None else trial.alpha
        return dataclasses.replace(transfer, alpha=alpha, info={**transfer.info, "alpha": alpha})

    begun: set = set()  # trials this search has trained: later rungs resume them; a first rung resumes only --resume
    histories: dict = {}  # trial -> its training history so far

    def train(trial, epochs: int):
        torch.manual_seed(config.seed)  # every trial starts from the weights a plain run of it would
        student = choose_student(config, ensemble, dataset)
        training = distill(trial_config(trial), ensemble, dataset, tensors, trial_transfer(trial), student,
                           normalisation, world, console, folder=f"tuning/{trial.name}", until=epochs,
                           resume=config.resume or trial in begun)
        begun.add(trial)
        histories[trial] = training.history
        return (*reached_at(training.history, epochs), (student, training))

    def view_cost(trial, first: int, last: int, priced: int) -> float:
        return views_ahead(trial_transfer(trial).teacher, trial.alpha, histories.get(trial, []), first, last, priced)

    labelled = bool((tensors.y_train >= 0).any()) and not config.unlabeled
    space = search_space(config.recipe, config.temperature, config.alpha, config.lr, config.epochs,
                         default_augmentation(tuple(tensors.x_train.shape[1:])) is not None, labelled)
    minutes = config.tune or DEFAULT_TUNE_MINUTES
    console.print(f"[bold]tune[/] successive halving on validation, budget {minutes:g} min")
    search = successive_halving(space, train, 60 * minutes, config.seed,
                                log=lambda line: console.print(f"[bold]tune[/] {line}"), trials=config.tune_trials,
                                view_cost=view_cost)
    report = search.describe(config.command, config.output_dir())
    console.print(f"[bold]tune[/] {report['explanation']}")
    chosen = search.chosen.trial
    student, training = search.chosen.result
    labels = search.winners.get("labels")
    baseline = None if labels is None else TrainedBaseline(*labels.result)
    return TunedRun(trial_config(chosen), trial_transfer(chosen), student, training, baseline, report)


def views_ahead(source, alpha: float, history: list[dict], first: int, last: int, priced: int = 0) -> float:
    """A tuning trial's :data:`compressor.tuning.ViewCost`: the seconds the teachers' views for its epochs
    first..last will take (the passes the view cache ``source`` still lacks, at this machine's measured pace; none
    for epochs up to ``priced``, already charged to another trial of the recipe), less the view seconds its pace so
    far carries (``history``, its epochs before ``first``). 0 for the labels (α = 0), which use no teachers, and for
    sources without views."""
    if alpha == 0 or not hasattr(source, "missing_passes"):
        return 0.0
    reached = [epoch for epoch in history if epoch["epoch"] < first]
    carried = sum(epoch.get("view_seconds", 0.0) for epoch in reached) / max(1, len(reached))  # per epoch of pace
    uncharged = max(first, priced + 1)
    passes = source.missing_passes(uncharged, last) if uncharged <= last else 0
    return passes * source.pass_seconds() - carried * (last - first + 1)


def reached_at(history: list[dict], epochs: int) -> tuple[float, float]:
    """A tuning trial at ``epochs``: the best validation accuracy and the training seconds of its epochs up to there,
    resumed ones included. That is what an uninterrupted search saw at that rung, even when a killed search had
    trained the trial further (its history then holds later epochs)."""
    reached = [epoch for epoch in history if epoch["epoch"] <= epochs]
    return max(epoch["val_accuracy"] for epoch in reached), sum(epoch["seconds"] for epoch in reached)


def train_config(config: RunConfig) -> TrainConfig:
    """The training loop's settings from the run's options."""
    return TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, seed=config.seed, amp=config.amp, progress=config.progress)


def train_baseline(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, transfer: TransferSet,
                   world: World, console: Console) -> TrainedBaseline | None:
    """The student's architecture trained on the hard labels alone with the same budget (--baseline).

    Same initial weights, epochs, schedule and batch order as the distilled student, and the best epoch on
    validation like it, so the comparison shows what the teachers add and not what a longer schedule adds.
    """
    if int((transfer.y >= 0).sum()) == 0:
        console.print("[yellow]note:[/] --baseline skipped: the transfer set has no labels to train it on")
        return None
    torch.manual_seed(config.seed)
    model = choose_student(config, ensemble, dataset).to(world.device)
    console.print(f"[bold]baseline[/] {config.student} on the hard labels alone, {config.epochs} epochs")
    fingerprint = {"data_sha256": dataset.fingerprint(), "student": config.student, "loss": "hard-label",
                   "omitted_classes": transfer.info.get("omitted_classes"), "recipe": config.recipe}
    training = train_student(model, transfer.x, transfer.y, None, tensors.x_val, transfer.y_val, HardLabelLoss(),
                             train_config(config), config.output_dir() / "checkpoints-baseline",
                             resume=config.resume, fingerprint=fingerprint, view=transfer.recipe.baseline_view)
    return TrainedBaseline(model.cpu(), training)
