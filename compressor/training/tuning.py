"""The main job's tuning step (``--tune MINUTES``, ``--recipe auto``): successive halving on validation
(:mod:`compressor.training.halving`) over recipe, T, α, lr, epochs and the soft-target loss, with the hard-label family tuned alike as
the baseline; each trial is the main job's own :func:`compressor.training.distill.distill`, paused at each rung."""

from __future__ import annotations

import dataclasses

import torch

from compressor.config import RunConfig
from compressor.data.augment import default_augmentation
from compressor.training.budget import RunBudget
from compressor.training.context import RunContext
from compressor.training.distill import Students, TrainedBaseline, choose_student, distill
from compressor.training.halving import DEFAULT_TUNE_MINUTES, SCREEN_ROWS, search_space, successive_halving
from compressor.training.transfer import TransferSet, row_subset, transfer_set


def tune(ctx: RunContext, budget: RunBudget | None = None) -> Students:
    """Successive halving on validation over recipe, T, α, lr, epochs and loss, with the hard-label family tuned
    alike as the baseline. Trials checkpoint into ``<out>/tuning/<trial>/``; with --resume a killed search continues where
    it stopped. Each recipe's transfer set (and its view cache) is built once. Returns the chosen student, its
    options and the tuned baseline, with the search for the report in ``tuning``. Without --tune, the search gets
    what is left of the run's ``budget`` (else DEFAULT_TUNE_MINUTES)."""
    config, console, tensors = ctx.config, ctx.console, ctx.tensors
    transfers: dict[str, TransferSet] = {}

    def trial_config(trial) -> RunConfig:
        return dataclasses.replace(config, recipe=trial.recipe, temperature=trial.temperature, alpha=trial.alpha,
                                   lr=trial.lr, epochs=trial.epochs, loss=trial.loss)

    def trial_transfer(trial) -> TransferSet:
        if trial.recipe not in transfers:
            transfers[trial.recipe] = transfer_set(ctx.with_config(trial_config(trial), quiet=True))
        transfer = transfers[trial.recipe]
        alpha = transfer.alpha if transfer.recipe.alpha is not None else trial.alpha
        return dataclasses.replace(transfer, alpha=alpha, info={**transfer.info, "alpha": alpha})

    begun: set = set()  # trials this search has trained: later rungs resume them; a first rung resumes only --resume
    histories: dict = {}  # trial -> its training history so far

    def train(trial, epochs: int):
        torch.manual_seed(config.seed)  # every trial starts from the weights a plain run of it would
        student = choose_student(config, ctx.ensemble, ctx.dataset)
        training = distill(ctx.with_config(trial_config(trial)), trial_transfer(trial), student,
                           folder=f"tuning/{trial.name}", until=epochs, resume=config.resume or trial in begun)
        begun.add(trial)
        histories[trial] = training.history
        return (*reached_at(training.history, epochs), (student, training))

    generator = torch.Generator().manual_seed(config.seed)
    screen_rows = None  # a seeded SCREEN_ROWS of the transfer rows, drawn once the transfer set is known

    def screen(trial, epochs: int):
        nonlocal screen_rows
        transfer = trial_transfer(trial)
        if screen_rows is None:
            count = max(1, round(len(transfer.x) * SCREEN_ROWS))
            screen_rows = torch.randperm(len(transfer.x), generator=generator)[:count].sort().values
        torch.manual_seed(config.seed)
        student = choose_student(config, ctx.ensemble, ctx.dataset)
        training = distill(ctx.with_config(trial_config(trial)), row_subset(transfer, screen_rows, ctx.teacher.online),
                           student, folder=f"tuning/screen/{trial.name}", until=epochs, resume=config.resume)
        return (*reached_at(training.history, epochs), None)

    def view_cost(trial, first: int, last: int, priced: int) -> float:
        return views_ahead(trial_transfer(trial).teacher, trial.alpha, histories.get(trial, []), first, last, priced)

    labelled = bool((tensors.y_train >= 0).any()) and not config.unlabeled
    space = search_space(config.recipe, config.temperature, config.alpha, config.lr, config.epochs,
                         default_augmentation(tuple(tensors.x_train.shape[1:])) is not None, labelled,
                         mixable=not ctx.dataset.named_inputs, loss=config.loss)
    minutes = config.tune or (DEFAULT_TUNE_MINUTES if budget is None else max(budget.left() / 60, 0.1))
    if budget is not None:
        budget.start()
    console.print(f"[bold]tune[/] successive halving on validation, budget {minutes:g} min")
    search = successive_halving(space, train, 60 * minutes, config.seed,
                                log=lambda line: console.print(f"[bold]tune[/] {line}"), trials=config.tune_trials,
                                view_cost=view_cost, screen=screen)
    report = search.describe(config.command, config.output_dir())
    console.print(f"[bold]tune[/] {report['explanation']}")
    chosen = search.chosen.trial
    student, training = search.chosen.result
    labels = search.winners.get("labels")
    baseline = None if labels is None else TrainedBaseline(*labels.result)
    return Students(trial_config(chosen), trial_transfer(chosen), student, training, baseline, tuning=report)


def views_ahead(source, alpha: float, history: list[dict], first: int, last: int, priced: int = 0) -> float:
    """A tuning trial's :data:`compressor.training.halving.ViewCost`: the seconds the teachers' views for its epochs
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
