"""Between the teachers' pass and the student's training: settle what the budget buys. ``--student auto`` is
chosen by measurement (:mod:`compressor.training.selection`), ``--epochs`` left out becomes as many epochs as the
budget's remainder buys at the pace measured (:mod:`compressor.training.budget`), and the outcome is written to
``<out>/selection.json`` so that ``--resume`` continues the same choice instead of measuring again."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.core.fileio import write_json_atomic
from compressor.training.budget import MAX_EPOCHS, MAX_STEPS, RunBudget, epoch_cap, epochs_that_fit
from compressor.training.context import RunContext
from compressor.training.distill import choose_student, distill
from compressor.training.recipes import soft_weight
from compressor.training.selection import Timers, choose_by_measurement
from compressor.training.transfer import TransferSet, row_subset
from compressor.training.tuning import reached_at

SELECTION_FILE = "selection.json"
PACE_ROWS = 2048      # rows one probe epoch trains on to time an explicit --student when --epochs is left out
FINAL_SHARE = 0.95    # of what is left of the budget, for the final trainings (the rest: estimates' slack)


def plan_training(ctx: RunContext, transfer: TransferSet | None, budget: RunBudget,
                  timers: Timers) -> tuple[RunContext, TransferSet | None, dict]:
    """The run under its settled options: the chosen student, α and T (``--student auto``) and the epochs
    (``--epochs`` left out), with ``transfer`` re-weighted to the chosen α; and the report's ``budget`` section.
    ``timers`` time candidates and the best member (--student auto). ``transfer`` is None for a tuned run."""
    config = ctx.config
    bought: dict = {}
    pace = None
    if config.student == "auto":
        source = transfer if transfer is not None else _hinton_transfer(ctx)
        chosen, pace, record = choose_by_measurement(ctx, source, budget, timers)
        config = dataclasses.replace(config, student=chosen.spec, alpha=chosen.alpha,
                                     temperature=chosen.temperature)
        ctx = dataclasses.replace(ctx.with_config(config), student_selection=record)
        ctx.console.print(f"[bold]student[/] {record['why']}")
        bought.update(candidates_priced=len(record["candidates"]),
                      candidates_screened=len({t["spec"] for t in record["screen"]["trials"]}),
                      screen_configurations=len(record["screen"]["trials"]))
    if config.epochs is None:
        if pace is None:
            pace = _probe_pace(ctx, transfer if transfer is not None else _hinton_transfer(ctx), budget)
        runs = 1 + int(config.baseline) + int(ctx.ensemble.specialist_subsets is not None)
        rows = len(transfer.x) if transfer is not None else len(ctx.tensors.x_train)
        steps = math.ceil(rows / (config.batch_size * ctx.world.size))
        cap = epoch_cap(steps)
        epochs = epochs_that_fit(budget.left() * FINAL_SHARE, pace, runs, cap)
        config = dataclasses.replace(config, epochs=epochs)
        ctx = ctx.with_config(config)
        bought.update(epochs=epochs, epochs_why=f"{runs} training(s) at an estimated {pace:.2f} s per epoch in the "
                                                f"{max(0.0, budget.left()) / 60:.1f} min left (at most {cap}: the more of "
                                                f"{MAX_EPOCHS} epochs and {MAX_STEPS:,} steps at {steps} an epoch)")
    else:
        bought.update(epochs=config.epochs, epochs_why="as given (--epochs), or as the run --resume continues "
                                                        "settled them (selection.json)")
    if transfer is not None:
        alpha = soft_weight(config.alpha, transfer.recipe, bool((transfer.y >= 0).any()))
        transfer = dataclasses.replace(transfer, alpha=alpha, info={**transfer.info, "alpha": alpha})
    if ctx.world.is_main:
        save_plan(config, ctx)
    return ctx, transfer, bought


def _hinton_transfer(ctx: RunContext) -> TransferSet:
    """A tuned run's transfer set for the choice (it searches recipes only after the student is chosen)."""
    from compressor.training.transfer import transfer_set

    return transfer_set(ctx.with_config(dataclasses.replace(ctx.config, recipe="hinton"), quiet=True))


def _probe_pace(ctx: RunContext, transfer: TransferSet, budget: RunBudget) -> float:
    """Seconds per epoch of ``--student`` on the whole transfer set, from one epoch on ``PACE_ROWS`` rows (its
    validation pass included, so the estimate errs long)."""
    n = len(transfer.x)
    rows = torch.arange(min(n, PACE_ROWS))
    probe = dataclasses.replace(ctx.config, epochs=1, progress=False)
    torch.manual_seed(probe.seed)
    model = choose_student(probe, ctx.ensemble, ctx.dataset)
    budget.start()
    subset = row_subset(transfer, rows, ctx.teacher.online) if len(rows) < n else transfer
    training = distill(ctx.with_config(probe, quiet=True), subset, model, folder="selection/pace", resume=False)
    _, seconds = reached_at(training.history, 1)
    budget.record("timing the student", seconds)
    return seconds * n / len(rows)


def save_plan(config: RunConfig, ctx: RunContext) -> None:
    """``<out>/selection.json``: the settled student, α, T and epochs, tied to the teachers and the data."""
    config.output_dir().mkdir(parents=True, exist_ok=True)
    write_json_atomic(config.output_dir() / SELECTION_FILE, {
        "teacher_sha256": ctx.ensemble.fingerprint(), "data_sha256": ctx.dataset.fingerprint(),
        "settled": {"student": config.student, "alpha": config.alpha, "temperature": config.temperature,
                    "epochs": config.epochs},
        "selection": ctx.student_selection})


def resume_plan(config: RunConfig, ensemble, dataset) -> tuple[RunConfig, dict | None] | None:
    """With --resume and an ``auto`` student or no --epochs: the settled options from ``<out>/selection.json``
    (refused in one line when it was written for other teachers or data), or None when there is none."""
    path = Path(config.output_dir()) / SELECTION_FILE
    if not config.resume or not path.is_file() or (config.student != "auto" and config.epochs is not None):
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        settled = saved["settled"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompressorError(f"--resume: {path} cannot be read ({exc}); drop --resume or use a new --out") from None
    if saved.get("teacher_sha256") != ensemble.fingerprint() or saved.get("data_sha256") != dataset.fingerprint():
        raise CompressorError(f"--resume: {path} settled the student for other teachers or data; drop --resume or "
                              f"use a new --out")
    if config.student != "auto":
        return dataclasses.replace(config, epochs=settled["epochs"]), None
    return dataclasses.replace(config, **settled), saved.get("selection")
