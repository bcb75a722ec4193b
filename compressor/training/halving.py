"""Tuning on validation (``--tune MINUTES``, ``--recipe auto``): successive halving over the recipe, T, α, the
learning rate and the schedule's length, with the hard-label baseline tuned the same way on the same budget.

Why tune at all: textbook distillation at one fixed setting often loses to the same network trained on labels,
and a baseline trained shorter or with a worse learning rate than the student makes distillation look better than
it is. So two *families* of configurations are searched side by side, each with the same number of trials and
the same rungs:

- ``distilled``: every recipe that applies to the inputs × T × α × lr × epochs × soft-target loss (``--loss``);
- ``labels``: α = 0 (the hard labels alone), with or without the recipes' augmentation × lr × epochs.

The labels family's winner is the tuned baseline; the student is whichever family's winner has the higher
validation accuracy, so "train on labels" can win, and the report then says distillation did not pay.

Successive halving (Jamieson & Talwalkar 2016) with η = 3 and three rungs at 1/9, 1/3 and all of each trial's own
cosine schedule: every sampled trial trains to its first rung, the best third (by best validation accuracy so far)
continues to the second, the best third of those to the end. A trial is resumed from its checkpoint at each rung,
and :func:`compressor.training.loop.train_student` resumes bit-identically, so a finished trial holds exactly the weights
of an uninterrupted run of its configuration: the command line the report prints reproduces it.

The budget sets how many trials each family gets: the first trial of each family (the user's own setting) is
trained to its first rung and timed, and the number of trials is the largest that the measured seconds per epoch
say fits in the budget (at least one: the user's setting alone, trained in full). After each rung the pace every
trial has shown re-sizes the next: when the best third would not fit what is left of the budget, fewer go on (at
least one per family), and when even the best trial would run past it (a slow recipe, such as one computing its
teachers' views), the best trial that fits goes on instead. The first rung stops starting trials once its share of
the budget is spent. The pace is corrected for the teachers' views a trial's later epochs still need and the
view cache does not hold (a trial promoted on epochs whose views were cached would otherwise look cheap). Both are
estimates; the report gives the budget and the time spent. The budget counts the seconds the trials'
epochs took, from their training histories, so a search resumed from its checkpoints decides as it did.

The search space is declared once, in :func:`search_space`. This module knows nothing of models or data: the
pipeline passes a ``train(trial, epochs)`` function that trains (or resumes) one trial up to that epoch.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Callable

from compressor.config import LOSSES
from compressor.training.search_text import explain, rerun_command

DEFAULT_TUNE_MINUTES = 10.0          # --recipe auto without --tune
ETA = 3                              # keep the best 1/ETA at every rung
RUNG_FRACTIONS = (1 / 9, 1 / 3, 1.0)  # of each trial's own schedule
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)
ALPHAS = (0.5, 0.9)                  # function-matching always uses α = 1 (its mixed inputs have no label)
LR_FACTORS = (1 / 3, 1.0, 3.0)       # times --lr
EPOCH_FACTORS = (0.5, 1.0, 2.0)      # times --epochs: short schedules favour labels, long ones distillation
FAMILIES = ("distilled", "labels")
SCREEN_TRIALS = 9                    # configurations per family screened at low fidelity before the rungs
SCREEN_ROWS = 1 / 9                  # of the transfer set, for the screen (its epochs: each trial's first rung)

@dataclass(frozen=True)
class Trial:
    """One configuration. ``alpha == 0`` trains on the labels alone with the recipe's labelled augmentation."""

    family: str          # "distilled" | "labels"
    recipe: str          # hinton | consistent | function-matching
    temperature: float
    alpha: float
    lr: float
    epochs: int
    loss: str = "kd"     # the soft term (--loss): kd | dkd | ls | dist

    @property
    def name(self) -> str:
        """A folder-safe name: ``distilled-consistent-T2-a0.5-lr0.001-e60``; numbers written exactly, so two
        trials never share a folder."""
        if self.family == "labels":
            return f"labels-{self.recipe}-lr{_exact(self.lr)}-e{self.epochs}"
        return (f"distilled-{self.recipe}-T{_exact(self.temperature)}-a{_exact(self.alpha)}-lr{_exact(self.lr)}"
                f"-e{self.epochs}" + ("" if self.loss == "kd" else f"-{self.loss}"))

    def rung_epochs(self, rung: int) -> int:
        """Epochs trained by the end of ``rung`` (0-based): a fraction of this trial's own schedule, at least 1."""
        if rung >= len(RUNG_FRACTIONS) - 1:
            return self.epochs
        return max(1, min(self.epochs, round(RUNG_FRACTIONS[rung] * self.epochs)))

    def flags(self) -> list[str]:
        """The ``compress`` options that select this configuration, numbers written exactly."""
        return ["--recipe", self.recipe, "--temperature", _exact(self.temperature), "--alpha", _exact(self.alpha),
                "--lr", _exact(self.lr), "--epochs", str(self.epochs)] + ([] if self.loss == "kd" else
                                                                           ["--loss", self.loss])


def _exact(value: float) -> str:
    """``value`` as short as ``:g`` writes it when that reads back as the same float, else in full (``repr``)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def search_space(recipe: str, temperature: float, alpha: float, lr: float, epochs: int, augmenting: bool,
                 labelled: bool, mixable: bool = True, loss: str = "kd") -> dict[str, list[Trial]]:
    """Every configuration of each family; the first of each is the user's own setting (``recipe`` "auto" means
    hinton, ``loss`` the user's --loss); the distilled family spans every soft-target loss. ``augmenting``: the inputs have a default augmentation (images of 16 px or more); ``labelled``: the
    transfer set has labels (without them there is no labels family and α is 1); ``mixable``: inputs can be mixed
    (not token ids), so function-matching applies."""
    own_recipe = "hinton" if recipe == "auto" else recipe
    lrs = sorted({float(f"{lr * f:.3g}") for f in LR_FACTORS})
    lengths = sorted({max(1, round(epochs * f)) for f in EPOCH_FACTORS})
    recipes = ("hinton",) + (("consistent",) if augmenting else ()) + (("function-matching",) if mixable else ())
    alphas = ALPHAS if labelled else (1.0,)
    distilled = [Trial("distilled", r, t, 1.0 if r == "function-matching" else a, rate, e, soft)
                 for r, t, a, rate, e, soft in product(recipes, TEMPERATURES, alphas, lrs, lengths, LOSSES)]
    own = Trial("distilled", own_recipe, temperature, 1.0 if own_recipe == "function-matching" or not labelled
                else alpha, lr, epochs, loss)
    space = {"distilled": _first(own, distilled)}
    if labelled:
        views = ("hinton", "consistent") if augmenting else ("hinton",)
        plain = [Trial("labels", r, temperature, 0.0, rate, e) for r, rate, e in product(views, lrs, lengths)]
        own_view = "consistent" if augmenting and own_recipe != "hinton" else "hinton"
        space["labels"] = _first(Trial("labels", own_view, temperature, 0.0, lr, epochs), plain)
    return space


def _first(own: Trial, grid: list[Trial]) -> list[Trial]:
    """``grid`` without duplicates, ``own`` first."""
    return [own] + [t for t in dict.fromkeys(grid) if t != own]


@dataclass
class Outcome:
    """Where one trial got to: its last rung (0-based), epochs trained, best validation accuracy, and the seconds
    its epochs took to train (from its training history, so a trial resumed finished still counts what it cost)."""

    trial: Trial
    rung: int = -1
    epochs_trained: int = 0
    val_accuracy: float = float("nan")
    seconds: float = 0.0
    result: object = field(default=None, repr=False)  # what ``train`` returned last (the pipeline's model)
    rows: float = 1.0  # the share of the transfer set it trained on: SCREEN_ROWS for a screened trial

    def describe(self) -> dict:
        """JSON-safe row of the search table (rung 0: the low-fidelity screen)."""
        return {"name": self.trial.name, **asdict(self.trial), "rung": self.rung + 1, "rows": round(self.rows, 4),
                "epochs_trained": self.epochs_trained, "val_accuracy": self.val_accuracy,
                "seconds": round(self.seconds, 2)}


# train(trial, epochs) -> (best validation accuracy up to that epoch, seconds its epochs up to there took to train,
# the object to keep, e.g. the trained model)
Train = Callable[[Trial, int], tuple[float, float, object]]
# view_cost(trial, first, last, priced) -> the seconds by which the trial's epochs first..last will differ from its
# pace so far because of the teachers' views: those the view cache does not hold yet, less the view seconds its
# measured pace already carries (it computed views for its own early epochs). ``priced`` is the last epoch whose views
# the estimate has already charged to another trial of the same recipe: trials of one recipe share their views, so
# those cost this one nothing. Without a view_cost, the pace alone prices the rest.
ViewCost = Callable[[Trial, int, int, int], float]


@dataclass
class Tuning:
    """The search's outcome: every trial, each family's winner and the chosen one, with the budget and time."""

    outcomes: list[Outcome]
    winners: dict[str, Outcome]
    chosen: Outcome
    trials_per_family: int
    budget_seconds: float
    estimated_seconds: float
    seconds: float
    screened: list[Outcome] = field(default_factory=list)  # the low-fidelity screen's trials, when there was one

    @property
    def configurations_per_family(self) -> int:
        """How many configurations each family tried: screened, or started in the rungs."""
        return max(self.trials_per_family, len(self.screened) // max(1, len(self.winners)))

    def describe(self, command: str = "", out: Path | None = None) -> dict:
        """JSON-safe summary for the report, with the commands that rerun the chosen student and baseline (into
        ``out/reruns/<trial>`` when the tuned run's folder ``out`` is given)."""
        baseline = self.winners.get("labels")
        return {
            "method": f"successive halving, η = {ETA}, rungs at {', '.join(f'{f:.3g}' for f in RUNG_FRACTIONS)} "
                      f"of each schedule, best validation accuracy",
            "budget_minutes": round(self.budget_seconds / 60, 2), "seconds": round(self.seconds, 1),
            "estimated_seconds": round(self.estimated_seconds, 1), "trials_per_family": self.trials_per_family,
            "configurations_per_family": self.configurations_per_family,
            "screen": None if not self.screened else {
                "rows": SCREEN_ROWS, "epochs": "each trial's first rung",
                "cost_model": "a screened trial costs its first rung on 1/9 of the rows, about 1/81 of its schedule; "
                              "the best go on to the rungs from scratch on every row"},
            "trials": [o.describe() for o in self.screened + self.outcomes],
            "chosen": self.chosen.describe(), "baseline": None if baseline is None else baseline.describe(),
            "explanation": explain(self),
            "rerun": rerun_command(command, self.chosen.trial, out) if command else None,
            "baseline_rerun": rerun_command(command, baseline.trial, out) if command and baseline else None,
        }


def _rung_share(n: int) -> float:
    """Whole schedules' worth of epochs that successive halving with ``n`` trials trains in one family."""
    kept = [math.ceil(n / ETA ** r) for r in range(len(RUNG_FRACTIONS))]  # trials running in each rung
    fractions = (RUNG_FRACTIONS[0],) + tuple(b - a for a, b in zip(RUNG_FRACTIONS, RUNG_FRACTIONS[1:]))
    return sum(k * f for k, f in zip(kept, fractions))


def halving_seconds(n: int, seconds_per_epoch: dict[str, float], mean_epochs: dict[str, float]) -> float:
    """Estimated seconds of successive halving with ``n`` trials per family, from each family's seconds per epoch
    and mean schedule length (epochs)."""
    return sum(seconds_per_epoch[f] * mean_epochs[f] * _rung_share(n) for f in seconds_per_epoch)


def trials_that_fit(budget_s: float, seconds_per_epoch: dict[str, float], mean_epochs: dict[str, float],
                    limit: int) -> int:
    """The largest number of trials per family, 1 to ``limit``, whose :func:`halving_seconds` fit ``budget_s``."""
    n = 1
    while n < limit and halving_seconds(n + 1, seconds_per_epoch, mean_epochs) <= budget_s:
        n += 1
    return n


def successive_halving(space: dict[str, list[Trial]], train: Train, budget_s: float, seed: int = 0,
                       log: Callable[[str], None] = print, trials: int | None = None,
                       clock: Callable[[], float] = time.perf_counter, view_cost: ViewCost | None = None,
                       screen: Train | None = None) -> Tuning:
    """Search ``space`` (from :func:`search_space`) within about ``budget_s`` seconds of training; see the module
    docstring. ``trials`` fixes the number of configurations per family instead (capped by the smallest family),
    and then the budget sizes nothing.

    ``train(trial, epochs)`` trains or resumes a trial up to ``epochs`` and returns its best validation accuracy and
    the seconds its epochs took to train, both up to that epoch, and a result kept for the caller. The budget is
    spent in those seconds, not in ``clock`` time, so a killed search resumed from its checkpoints makes the same
    decisions; ``clock`` only times the search for the report. ``view_cost`` prices the teachers' views a trial's
    later epochs still need (see :data:`ViewCost`) when the promotions are sized.

    ``screen(trial, epochs)`` (budget-sized searches) trains as ``train`` on SCREEN_ROWS of the rows: SCREEN_TRIALS
    per family go to their first rung so (~1/81 of a schedule each); the best start the rungs afresh on every row."""
    started = clock()
    families = [f for f in FAMILIES if space.get(f)]
    outcomes: dict[Trial, Outcome] = {}
    rng = random.Random(seed)
    screened = _screen(space, families, screen, rng, log) if screen is not None and trials is None else {}

    def advance(trial: Trial, rung: int) -> None:
        outcome = outcomes.setdefault(trial, Outcome(trial))
        epochs = trial.rung_epochs(rung)
        outcome.val_accuracy, outcome.seconds, outcome.result = train(trial, epochs)
        outcome.rung, outcome.epochs_trained = rung, epochs
        log(f"{trial.name}: rung {rung + 1}/{len(RUNG_FRACTIONS)}, {epochs}/{trial.epochs} epochs, "
            f"best validation accuracy {outcome.val_accuracy:.4f}")

    def spent() -> float:
        return sum(outcome.seconds for outcome in [*outcomes.values(), *screened.values()])

    for family in families:  # time the user's own setting to size the search
        advance(space[family][0], 0)
    per_epoch = {f: outcomes[space[f][0]].seconds / max(1, space[f][0].rung_epochs(0)) for f in families}
    mean_epochs = {f: sum(t.epochs for t in space[f]) / len(space[f]) for f in families}
    limit = min([len(space[f]) for f in families] + ([SCREEN_TRIALS] if screened else []))
    if trials is None:
        n = trials_that_fit(budget_s - spent(), per_epoch, mean_epochs, limit)
        why = f"fit the budget of {budget_s / 60:.1f} min"
    else:
        n, why = min(trials, limit), "as asked"
    estimate = halving_seconds(n, per_epoch, mean_epochs)
    log(f"tuning: {n} trial(s) per family {why} (estimated {estimate / 60:.1f} min in all)")
    allowance = (budget_s - spent()) / len(families)
    alive = {f: _first_trials(space[f], n, screened, rng, per_epoch[f] * _rung_share(n) / n, allowance)
             for f in families}
    # the first rung's share of the budget, per family: the trials left when it is spent are not started (a recipe
    # slower than the probes, such as one computing its teachers' views, would otherwise overrun it several times)
    first_rung_s = (budget_s - sum(o.seconds for o in screened.values())) / len(families) * n * RUNG_FRACTIONS[0] \
        / _rung_share(n)
    for rung in range(len(RUNG_FRACTIONS)):
        for family in families:
            for trial in alive[family]:
                if trial not in outcomes or outcomes[trial].rung < rung:
                    used = sum(outcomes[t].seconds for t in alive[family] if t in outcomes)
                    if rung == 0 and trials is None and used > first_rung_s and used > 0:  # one per family runs
                        break
                    advance(trial, rung)
            started_here = [t for t in alive[family] if t in outcomes]
            if len(started_here) < len(alive[family]):
                log(f"tuning: {family}: {len(started_here)} of {len(alive[family])} trial(s) trained in the first "
                    f"rung's share of the budget; the rest were not started")
                alive[family] = started_here
        if rung == len(RUNG_FRACTIONS) - 1:
            break
        allowance = (budget_s - spent()) / len(families)
        for family in families:  # keep the best third; ties keep the earlier (the user's own setting first)
            ranked = sorted(alive[family], key=lambda t: -outcomes[t].val_accuracy)
            alive[family] = ranked[:math.ceil(len(ranked) / ETA)] if trials is not None else \
                promote_within(ranked, rung + 1, outcomes, allowance, lambda line: log(f"tuning: {family}: {line}"),
                               view_cost)
    winners = {f: max(alive[f], key=lambda t: outcomes[t].val_accuracy) for f in families}
    winners = {f: outcomes[t] for f, t in winners.items()}
    chosen = winners["distilled"]
    if "labels" in winners and winners["labels"].val_accuracy >= chosen.val_accuracy:
        chosen = winners["labels"]
    return Tuning(list(outcomes.values()), winners, chosen, n, budget_s, estimate,
                  clock() - started, list(screened.values()))


def _first_trials(grid: list[Trial], n: int, screened: dict[Trial, Outcome], rng: random.Random,
                  share_s: float = 0.0, allowance_s: float = math.inf) -> list[Trial]:
    """The ``n`` trials of a family that enter the rungs. Without a screen: the user's setting and ``n - 1``
    sampled. After one: the best of the screen (ties keep the earlier, the user's setting first) whose estimated
    cost fits ``allowance_s`` together, a trial costing ``share_s`` (its share of the rungs per epoch of schedule,
    at the user's setting's pace) × its epochs × its pace relative to the user's setting in the screen (views
    computed per batch, say); when none fits, the cheapest (the best of equally cheap ones)."""
    family = grid[0].family
    if not screened:
        return [grid[0]] + rng.sample(grid[1:], n - 1)
    own = screened[grid[0]]
    base = own.seconds / max(1, own.epochs_trained)

    def cost(t: Trial) -> float:
        pace = screened[t].seconds / max(1, screened[t].epochs_trained)
        return share_s * t.epochs * (pace / base if base > 0 else 1.0)

    ranked = sorted([t for t in screened if t.family == family], key=lambda t: -screened[t].val_accuracy)
    chosen, total = [], 0.0
    for trial in ranked:
        if len(chosen) < n and total + cost(trial) <= allowance_s:
            chosen.append(trial)
            total += cost(trial)
    return chosen or [min(ranked, key=cost)]


def _screen(space: dict[str, list[Trial]], families: list[str], screen: Train, rng: random.Random,
            log: Callable[[str], None]) -> dict[Trial, Outcome]:
    """SCREEN_TRIALS configurations per family (the user's own first, the rest sampled) trained by ``screen`` to
    their first rung on SCREEN_ROWS of the transfer set."""
    screened: dict[Trial, Outcome] = {}
    for family in families:
        grid = space[family]
        for trial in [grid[0]] + rng.sample(grid[1:], min(SCREEN_TRIALS, len(grid)) - 1):
            epochs = trial.rung_epochs(0)
            accuracy, seconds, _ = screen(trial, epochs)  # the screen's model is not kept: the rungs start afresh
            screened[trial] = Outcome(trial, -1, epochs, accuracy, seconds, rows=SCREEN_ROWS)
            log(f"{trial.name}: screened, {epochs}/{trial.epochs} epochs on {SCREEN_ROWS:.0%} of the rows, "
                f"best validation accuracy {accuracy:.4f}")
    return screened


def promote_within(ranked: list[Trial], rung: int, outcomes: dict[Trial, Outcome], allowance_s: float,
                   log: Callable[[str], None], view_cost: ViewCost | None = None) -> list[Trial]:
    """The trials of ``ranked`` (best first) that go on to ``rung``: the best third, fewer when the trials' own pace
    so far says the rest of the search would not fit ``allowance_s``. When even the best trial alone would not, the
    best one that fits goes on instead (a slower recipe must not take the search far past its budget), and when
    none fits, the one that finishes soonest."""
    keep = math.ceil(len(ranked) / ETA)
    while keep > 1 and rest_seconds(ranked[:keep], rung, outcomes, view_cost) > allowance_s:
        keep -= 1
    if keep < math.ceil(len(ranked) / ETA):
        log(f"{keep} trial(s) go on to rung {rung + 1} instead of {math.ceil(len(ranked) / ETA)}, to stay within "
            f"the budget")
    if rest_seconds(ranked[:1], rung, outcomes, view_cost) <= allowance_s:
        return ranked[:keep]
    cost = {t: rest_seconds([t], rung, outcomes, view_cost) for t in ranked}
    fits = [t for t in ranked if cost[t] <= allowance_s]
    chosen = fits[0] if fits else min(ranked, key=cost.get)
    log(f"{ranked[0].name} (best so far, {outcomes[ranked[0]].val_accuracy:.4f}) would need {cost[ranked[0]] / 60:.1f} "
        f"more min, past the {max(allowance_s, 0) / 60:.1f} left; {chosen.name} "
        f"({outcomes[chosen].val_accuracy:.4f}, {cost[chosen] / 60:.1f} min) goes on instead"
        + ("" if fits else ", the soonest to finish, though it too runs past the budget"))
    return [chosen]


def rest_seconds(ranked: list[Trial], rung: int, outcomes: dict[Trial, Outcome],
                 view_cost: ViewCost | None = None) -> float:
    """Seconds to take ``ranked`` (best first) through ``rung`` and the best third of them through each later
    rung, at each trial's own pace so far, corrected by ``view_cost`` for the teachers' views those epochs still
    need, each epoch's views charged once per recipe (the trials of a recipe share them)."""
    total, group = 0.0, ranked
    done = {t: outcomes[t].epochs_trained for t in ranked}
    # the last epoch whose views are charged, per recipe: every trial has cached the views of the epochs it trained,
    # so the epochs still uncached lie above each trial's own; one watermark per recipe is enough
    priced: dict[tuple[str, bool], int] = {}
    for r in range(rung, len(RUNG_FRACTIONS)):
        for t in group:
            target = t.rung_epochs(r)
            if target > done[t]:
                pace = outcomes[t].seconds / max(1, outcomes[t].epochs_trained)  # seconds per epoch
                views = (t.recipe, t.alpha == 0)  # the labels (alpha 0) use no teachers' views
                if view_cost:
                    total += view_cost(t, done[t] + 1, target, priced.get(views, 0))
                    priced[views] = max(priced.get(views, 0), target)
                total += pace * (target - done[t])
                done[t] = target
        group = group[:math.ceil(len(group) / ETA)]
    return total
