"""``--student auto`` as a measured choice: the candidates (:mod:`compressor.students.candidates`), priced before
the teachers ran, are held to a speed constraint against the best single member on the target, the survivors are
screened by short distillation on a subset of the transfer set, and a small grid of α and T (labels alone, α = 0,
always in it) is screened on the winner. The choice is the best on validation.

1. **Speed.** Default: at least ``--min-speedup`` (2×) faster than the best member (by validation accuracy; the
   fastest member where none is best: no labels, a specialist ensemble) at batch 1 on ``--target``, both timed there;
   the member is timed before and after the candidates and the faster reading sets the limit (sub-0.1 ms timings
   on a CPU move by tens of percent with what ran just before). ``--max-latency-ms`` and ``--max-params`` replace it when given.
   When no candidate meets it, the candidates within 25% of the fastest one's latency are screened, and the report
   says so.
2. **Architecture screen.** Successive halving (η = 3, as ``--tune``'s, :mod:`compressor.training.halving`) on
   ``SCREEN_ROWS`` seeded rows: every surviving candidate trains a first rung of about ``FIRST_RUNG_STEPS`` optimiser
   steps (whole epochs) of a schedule 9 times as long at α = 0.5, T = 4; the best third continue to 3 first rungs,
   the best third of those to 9, and with them every candidate within one standard error of the rung's best (a
   difference the validation split cannot resolve does not end a candidate; the budget still caps how many go on). Rungs count steps, not epochs, so a small dataset's first rung is not a few
   batches that only the fastest starters win. Candidates enter in an order that alternates families, each family
   largest first, so a budget that stops the first rung early still spans families.
3. **α and T.** The winner is trained on the same rows and schedule at each point of ``GRID`` to the second rung
   (the first when the budget says so); the best validation accuracy wins, where points within one standard error
   of the best (what the validation split cannot tell apart) count as ties, which go to the winner's own mix.

The budget (:mod:`compressor.training.budget`): the choice gets ``CHOICE_SHARE`` of ``--budget``, pricing included,
and the screen at least ``MIN_SCREEN_SHARE`` however long pricing took; a rung or grid point that its measured pace
says would not fit is not started. Budgets count the seconds of the trainings' own
histories, so the same search resumed from its checkpoints (``--resume``) decides as it did. ``--screen-trials N``
fixes the number of candidates screened instead (tests, reproducible searches), and the rungs then run in full.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from compressor.core.errors import CompressorError
from compressor.students.candidates import build_candidate, time_candidates
from compressor.training.budget import CHOICE_SHARE, MIN_SCREEN_SHARE, RunBudget
from compressor.training.context import RunContext
from compressor.training.distill import choose_student, distill
from compressor.training.halving import ETA
from compressor.training.transfer import TransferSet, row_subset
from compressor.training.tuning import reached_at

RUNG_FACTORS = (1, 3, 9)       # the rungs, in first rungs: a schedule of 9, compared after 1 and 3 (η = 3)
FIRST_RUNG_STEPS = 100         # optimiser steps of the first rung (rounded to whole epochs, at least 1)
SCREEN_ROWS = 6000             # transfer rows the screen trains on (all of them when there are fewer)
SCREEN_MIX = (0.5, 4.0)        # (α, T) every architecture is screened at
GRID = ((0.0, 1.0), (0.5, 2.0), (0.5, 4.0), (0.9, 2.0), (0.9, 4.0))  # (α, T); α = 0: labels alone, T unused
NEAR_FASTEST = 1.25            # without a candidate that meets the speed constraint: those within 25% of the fastest


@dataclass(frozen=True)
class ScreenTrial:
    """One screened configuration: a candidate spec at (α, T)."""

    spec: str
    alpha: float
    temperature: float

    @property
    def name(self) -> str:
        """A folder-safe name, e.g. ``cnn-16x32-a0.5-T4``."""
        safe = self.spec.replace(":", "-").replace("/", "-")
        return f"{safe}-a{self.alpha:g}" + ("" if self.alpha == 0 else f"-T{self.temperature:g}")


def apply_speed_constraint(rows: list[dict], reference_ms: float | None, min_speedup: float,
                           max_latency_ms: float | None, max_params: int | None) -> dict:
    """Mark every priced candidate ``fits`` (and ``why_not``) under the speed constraint; returns the constraint as
    the report states it. ``reference_ms`` is the best member's batch-1 latency on the target (None: unknown)."""
    named = max_latency_ms is not None or max_params is not None
    limit = max_latency_ms if named else (None if reference_ms is None else reference_ms / min_speedup)
    words = (" and ".join(([f"at most {max_latency_ms:g} ms at batch 1"] if max_latency_ms is not None else [])
                          + ([f"at most {max_params:,} parameters"] if max_params is not None else []))
             if named else f"at least {min_speedup:g}× faster than the best member at batch 1"
             + ("" if reference_ms is None else f" ({reference_ms:.4f} ms → at most {limit:.4f} ms)"))
    for row in rows:
        if "skipped" in row or "not_timed" in row:
            row["fits"] = False
            continue
        slow = limit is not None and row.get("latency_ms") is not None and row["latency_ms"] > limit
        big = max_params is not None and row["parameters"] > max_params
        row["fits"] = not (slow or big)
        if not row["fits"]:
            row["why_not"] = "too many parameters" if big else f"{row['latency_ms']:.4f} ms at batch 1"
    fitting = [row for row in rows if row["fits"]]
    note = None
    if not fitting:
        timed = [row for row in rows if "skipped" not in row and row.get("latency_ms") is not None]
        if not timed:
            raise CompressorError("--student auto: no candidate could be built for this data (see the report's "
                                  "student.selection); give --student SPEC")
        fastest = min(row["latency_ms"] for row in timed)
        for row in timed:
            row["fits"] = row["latency_ms"] <= NEAR_FASTEST * fastest
        note = (f"no candidate meets it; the {sum(r['fits'] for r in timed)} within {NEAR_FASTEST:g}× of the "
                f"fastest ({fastest:.4f} ms) were screened instead")
    return {"rule": words, "limit_ms": limit, "reference_ms": reference_ms, "min_speedup": min_speedup,
            "max_latency_ms": max_latency_ms, "max_params": max_params, "note": note}


def screen_order(rows: list[dict]) -> list[str]:
    """The fitting candidates' specs, alternating families, each family largest (multiply-adds) first."""
    by_family: dict[str, list[dict]] = {}
    for row in rows:
        if row["fits"]:
            by_family.setdefault(row["family"], []).append(row)
    queues = [sorted(group, key=lambda r: -(r.get("multiply_adds") or r["parameters"])) for group in
              by_family.values()]
    order = []
    while any(queues):
        for queue in queues:
            if queue:
                order.append(queue.pop(0)["spec"])
    return order


class Screen:
    """Trains screen trials on the subset (resuming each from its checkpoint between rungs) and keeps every result:
    ``results[trial][epochs] = best validation accuracy up to there``, ``seconds[trial]`` the wall seconds it took."""

    def __init__(self, ctx: RunContext, transfer: TransferSet, rows: torch.Tensor):
        self.ctx, self.rows = ctx, rows
        first = max(1, round(FIRST_RUNG_STEPS / math.ceil(len(rows) / ctx.config.batch_size)))
        self.rungs = tuple(first * f for f in RUNG_FACTORS)  # epochs of the screen's schedule
        self.transfer = row_subset(transfer, rows, ctx.teacher.online) if len(rows) < len(transfer.x) else transfer
        self.results: dict[ScreenTrial, dict[int, float]] = {}
        self.seconds: dict[ScreenTrial, float] = {}
        self.epochs: dict[ScreenTrial, int] = {}

    def train(self, trial: ScreenTrial, epochs: int) -> float:
        """``trial`` trained (or resumed) to ``epochs`` of the screen's schedule; its best validation accuracy."""
        started = time.perf_counter()  # wall time: building, checkpoints and validation count against the budget
        config = dataclasses.replace(self.ctx.config, student=trial.spec, alpha=trial.alpha,
                                     temperature=trial.temperature, epochs=self.rungs[-1], progress=False)
        torch.manual_seed(config.seed)
        model = choose_student(config, self.ctx.ensemble, self.ctx.dataset)
        transfer = self.transfer
        if transfer.recipe.alpha is None:  # function-matching fixes α itself
            transfer = dataclasses.replace(transfer, alpha=trial.alpha, info={**transfer.info, "alpha": trial.alpha})
        training = distill(self.ctx.with_config(config, quiet=True), transfer, model,
                           folder=f"selection/{trial.name}", until=epochs,
                           resume=self.ctx.config.resume or trial in self.results)
        accuracy, _ = reached_at(training.history, epochs)
        self.results.setdefault(trial, {})[epochs] = accuracy
        self.seconds[trial] = self.seconds.get(trial, 0.0) + time.perf_counter() - started
        self.epochs[trial] = epochs
        self.ctx.console.print(f"[bold]choose[/] {trial.spec} α={trial.alpha:g}"
                               + ("" if trial.alpha == 0 else f" T={trial.temperature:g}")
                               + f": {epochs} epoch(s) on {len(self.rows):,} rows, validation {accuracy:.2%}")
        return accuracy

    def pace(self, trial: ScreenTrial) -> float:
        """Seconds per epoch ``trial`` has shown on the subset."""
        return self.seconds[trial] / max(1, self.epochs[trial])

    def spent(self) -> float:
        return sum(self.seconds.values())


def run_screen(screen: Screen, specs: list[str], allowance_s: float, trials: int | None, log) -> ScreenTrial:
    """Successive halving over ``specs`` at ``SCREEN_MIX``; returns the winning trial. ``trials`` fixes how many
    candidates enter (then the rungs are not cut by ``allowance_s``)."""
    alpha, temperature = SCREEN_MIX
    alive = [ScreenTrial(spec, alpha, temperature) for spec in (specs if trials is None else specs[:trials])]
    first_rung_s = allowance_s / 3  # the first rung's share: later entrants are not started once it is spent
    for rung, epochs in enumerate(screen.rungs):
        started = []
        for trial in alive:
            if rung == 0 and trials is None and started and screen.spent() > first_rung_s:
                log(f"{len(started)} of {len(alive)} candidates screened in the first rung's share of the budget; "
                    f"the rest were not started")
                break
            screen.train(trial, epochs)
            started.append(trial)
        ranked = sorted(started, key=lambda t: -screen.results[t][epochs])  # ties keep the earlier
        if rung == len(screen.rungs) - 1:
            return ranked[0]
        best = screen.results[ranked[0]][epochs]
        tied = sum(screen.results[t][epochs] >= best - standard_error(best, len(screen.ctx.tensors.y_val))
                   for t in ranked)
        keep = max(1, math.ceil(len(ranked) / ETA), tied)
        more = screen.rungs[rung + 1] - epochs
        while trials is None and keep > 0 and \
                screen.spent() + sum(screen.pace(t) * more for t in ranked[:keep]) > allowance_s:
            keep -= 1
        if keep == 0:
            log(f"the budget ends the screen after {epochs} epoch(s)")
            return ranked[0]
        alive = ranked[:keep]
    return alive[0]


def run_grid(screen: Screen, winner: ScreenTrial, labelled: bool, fixed_alpha: bool, allowance_s: float,
             trials: int | None, log) -> ScreenTrial:
    """The winner's spec at every (α, T) of ``GRID``, trained to the second rung (the first when only that fits
    ``allowance_s``); the best on validation, ties to the winner's own mix."""
    if not labelled or fixed_alpha:  # no labels (α is 1) or a recipe that fixes α: nothing to choose
        return winner
    points = [ScreenTrial(winner.spec, a, t) for a, t in GRID if (a, t) != SCREEN_MIX]
    epochs = screen.rungs[1]
    if trials is None:
        fits = [e for e in screen.rungs[:2] if screen.spent() + len(points) * screen.pace(winner) * e <= allowance_s]
        if not fits:
            log(f"no time left in the choice's budget for the α/T grid: α = {SCREEN_MIX[0]:g}, "
                f"T = {SCREEN_MIX[1]:g} kept")
            return winner
        epochs = fits[-1]
    own = screen.results[winner].get(epochs)
    scored = {winner: screen.train(winner, epochs) if own is None else own}
    for point in points:
        scored[point] = screen.train(point, epochs)
    return within_noise(scored, len(screen.ctx.tensors.y_val))


def within_noise(scored: dict, examples: int):
    """The first of ``scored`` (in order) whose validation accuracy is within one standard error of the best, so a
    difference the validation split cannot resolve does not move the choice off the first (the screen's own mix)."""
    best = max(scored.values())
    return next(t for t, accuracy in scored.items() if accuracy >= best - standard_error(best, examples))


def standard_error(accuracy: float, examples: int) -> float:
    """One standard error of an accuracy measured on ``examples`` rows (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / max(1, examples))


@dataclass
class Timers:
    """How the choice times models, passed in by the pipeline (the training side never imports the targets):
    batch-1 latency in ms on the target and in PyTorch eager, and the best member's
    (``{"member", "val_accuracy", "latency_ms", "eager_ms"}``, empty when there is none)."""

    target: Callable[[nn.Module], float]
    eager: Callable[[nn.Module], float]
    reference: Callable[[], dict]
    target_precise: Callable[[nn.Module], float]  # timed longer: for candidates near the limit


NEAR_LIMIT = 1.3  # a candidate whose brief timing is within this factor of the limit is timed again, longer


def time_all(ctx: RunContext, timers: Timers) -> dict:
    """Time the best member and every built candidate (compressor.students.candidates.time_candidates); returns
    the reference."""
    config, dataset, ensemble = ctx.config, ctx.dataset, ctx.ensemble
    reference = timers.reference()
    named = config.max_latency_ms is not None or config.max_params is not None
    eager_limit = None if named or not reference.get("eager_ms") else reference["eager_ms"] / config.min_speedup
    architecture = next((m.architecture for m in ensemble.members if m.architecture), None)

    def build(spec: str) -> nn.Module:
        return build_candidate(spec, tuple(dataset.input_shape), ensemble.num_classes, dataset.example(),
                               architecture, ensemble.metadata.get("hf_config"))

    rows = ctx.student_selection["candidates"]
    time_candidates(rows, build, timers.eager, timers.target, eager_limit)
    again = timers.reference()  # timed before and after the candidates: the faster reading sets the stricter limit
    if again.get("latency_ms") and reference.get("latency_ms"):
        runs = [reference["latency_ms"], again["latency_ms"]]
        reference = {**reference, "latency_ms": min(runs), "latency_ms_runs": runs}
    limit = config.max_latency_ms if named else (
        None if not reference.get("latency_ms") else reference["latency_ms"] / config.min_speedup)
    for row in rows:  # a brief timing decides the clear cases; those near the limit are timed as long as the member
        if limit is not None and row.get("latency_ms") and limit / NEAR_LIMIT <= row["latency_ms"] <= NEAR_LIMIT * limit:
            row["latency_ms_brief"] = row["latency_ms"]
            row["latency_ms"] = round(timers.target_precise(build(row["spec"])), 4)
    return reference


def choose_by_measurement(ctx: RunContext, transfer: TransferSet, budget: RunBudget, timers: Timers) -> tuple:
    """The measured choice (see the module docstring): returns ``(chosen ScreenTrial, pace in seconds per epoch on
    the whole transfer set, the selection record for the report)``."""
    config, record = ctx.config, ctx.student_selection
    log = lambda line: ctx.console.print(f"[bold]choose[/] {line}")  # noqa: E731
    timing = time.perf_counter()
    reference = time_all(ctx, timers)
    budget.record("pricing", time.perf_counter() - timing)
    constraint = apply_speed_constraint(record["candidates"], reference.get("latency_ms"), config.min_speedup,
                                        config.max_latency_ms, config.max_params)
    specs = screen_order(record["candidates"])
    log(f"{len(specs)} of {len(record['candidates'])} candidates meet {constraint['rule']}"
        + (f"; {constraint['note']}" if constraint["note"] else ""))
    generator = torch.Generator().manual_seed(config.seed)
    n = len(transfer.x)
    rows = torch.randperm(n, generator=generator)[:min(n, SCREEN_ROWS)].sort().values
    screen = Screen(ctx, transfer, rows)
    allowance = max(budget.seconds * MIN_SCREEN_SHARE,
                    budget.seconds * CHOICE_SHARE - budget.spent.get("pricing", 0.0))
    budget.start()
    winner = run_screen(screen, specs, allowance, config.screen_trials, log)
    labelled = bool((transfer.y >= 0).any())
    chosen = run_grid(screen, winner, labelled, transfer.recipe.alpha is not None, allowance, config.screen_trials,
                      log)
    budget.record("choosing", screen.spent())
    pace = screen.pace(chosen) * n / len(rows)
    record.update(chosen=chosen.spec, alpha=chosen.alpha, temperature=chosen.temperature,
                  constraint=constraint, reference=reference,
                  screen={"rows": len(rows), "schedule_epochs": screen.rungs[-1], "rungs": list(screen.rungs),
                          "mix": {"alpha": SCREEN_MIX[0], "temperature": SCREEN_MIX[1]},
                          "grid": [{"alpha": a, "temperature": t} for a, t in GRID],
                          "seconds": round(screen.spent(), 1),
                          "trials": [{"spec": t.spec, "alpha": t.alpha, "temperature": t.temperature,
                                      "val_accuracy": {str(e): a for e, a in screen.results[t].items()},
                                      "seconds": round(screen.seconds[t], 2)} for t in screen.results]})
    for row in record["candidates"]:
        trial = ScreenTrial(row["spec"], *SCREEN_MIX)
        if trial in screen.results:
            row["screened"] = {str(e): a for e, a in screen.results[trial].items()}
    record["why"] = explain_choice(record, chosen, screen, winner)
    return chosen, pace, record


def explain_choice(record: dict, chosen: ScreenTrial, screen: Screen, winner: ScreenTrial) -> str:
    """Why the chosen student won, in one sentence with the figures measured."""
    row = next(r for r in record["candidates"] if r["spec"] == chosen.spec)
    reference = record["reference"]
    speed = ""
    if reference.get("latency_ms") and row.get("latency_ms"):
        speed = (f", {reference['latency_ms'] / row['latency_ms']:.1f}× faster than the best member "
                 f"({reference.get('member')}) at batch 1")
    epochs = max(screen.results[winner])
    screened = sum(1 for t in screen.results if (t.alpha, t.temperature) == SCREEN_MIX)
    mix = ("labels alone (α = 0)" if chosen.alpha == 0 else f"α = {chosen.alpha:g}, T = {chosen.temperature:g}")
    grid = [t for t in screen.results if t.spec == winner.spec and (t.alpha, t.temperature) != SCREEN_MIX]
    text = (f"{chosen.spec} ({row['family']}, {row['parameters']:,} parameters{speed}) scored best on validation "
            f"({screen.results[winner][epochs]:.2%} after {epochs} epochs on {len(screen.rows):,} rows) of {screened} "
            f"candidate(s) screened by distillation at α = {SCREEN_MIX[0]:g}, T = {SCREEN_MIX[1]:g}")
    if not grid:
        return text
    at = min(screen.results[grid[0]])
    return text + (f"; of {len(grid) + 1} (α, T) points after {at} epochs, {mix} did best or within one standard "
                   f"error of the best ({screen.results[chosen][at]:.2%})")
