"""compressor/tuning.py and ``--tune`` / ``--recipe auto`` end to end.

The pure parts run on a synthetic ``train(trial, epochs)`` (a fixed function of the trial's settings and epochs that
records every call), since what they test is the halving itself: the search space, the rungs, who survives each
rung, the winners, the budget's sizing and the rerun command. Then the real thing on digits through the CLI: the
report's tuning section, the printed rerun command reproducing the chosen student bit for bit, an interrupted search
resuming its finished trials, and bad input stopping before --out is created.
"""

from __future__ import annotations

import json
import math
import random
import shlex
import shutil
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.data.datasets import load_dataset
from compressor.training.loop import TrainConfig, train_student
from compressor.training.checkpoints import LAST_NAME
from compressor.training.losses import DistillationLoss
from compressor.training.halving import (ALPHAS, FAMILIES, RUNG_FRACTIONS, SCREEN_ROWS, SCREEN_TRIALS, TEMPERATURES, Outcome,
                                        Trial, _first_trials, halving_seconds,
                                        promote_within, rest_seconds, search_space, successive_halving,
                                        trials_that_fit)
from compressor.training.search_text import rerun_command

# small and fast: each tuned CLI run is a few seconds on two shared cores
QUICK = ["--data", "digits", "--student", "mlp:32x32", "--epochs", "3", "--warmup", "0.01", "--duration", "0.02",
         "--rounds", "1", "--batch-sizes", "1", "--no-progress"]
LAST_RUNG = len(RUNG_FRACTIONS) - 1


def space(**overrides) -> dict[str, list[Trial]]:
    """The search space of ``--recipe auto -T 4 --alpha 0.9 --lr 0.003 --epochs 30`` on images of 16 px or more."""
    settings = dict(recipe="auto", temperature=4.0, alpha=0.9, lr=3e-3, epochs=30, augmenting=True, labelled=True)
    return search_space(**{**settings, **overrides})


# ----------------------------------------------------------------------------------------------
# search_space and Trial


def test_the_first_trial_of_each_family_is_the_users_own_setting():
    grid = space()
    assert list(grid) == list(FAMILIES)
    assert grid["distilled"][0] == Trial("distilled", "hinton", 4.0, 0.9, 3e-3, 30)  # auto means hinton
    assert grid["labels"][0] == Trial("labels", "hinton", 4.0, 0.0, 3e-3, 30)
    consistent = space(recipe="consistent")
    assert consistent["distilled"][0] == Trial("distilled", "consistent", 4.0, 0.9, 3e-3, 30)
    assert consistent["labels"][0].recipe == "consistent"  # the labels see the recipe's augmentation too
    matching = space(recipe="function-matching", alpha=0.5)
    assert matching["distilled"][0] == Trial("distilled", "function-matching", 4.0, 1.0, 3e-3, 30)
    assert matching["labels"][0].recipe == "consistent"


def test_the_families_cover_the_grid_without_duplicates():
    grid = space()
    distilled, labels = grid["distilled"], grid["labels"]
    assert all(t.family == "distilled" for t in distilled) and all(t.family == "labels" for t in labels)
    assert {t.alpha for t in labels} == {0.0}
    assert all(t.alpha == 1.0 for t in distilled if t.recipe == "function-matching")
    assert {t.alpha for t in distilled if t.recipe != "function-matching"} == set(ALPHAS)
    assert {t.recipe for t in distilled} == {"hinton", "consistent", "function-matching"}
    assert {t.recipe for t in labels} == {"hinton", "consistent"}
    assert {t.temperature for t in distilled} == set(TEMPERATURES)
    assert {t.lr for t in distilled + labels} == {0.001, 0.003, 0.009}
    assert {t.epochs for t in distilled + labels} == {15, 30, 60}
    for trials in (distilled, labels):
        assert len(set(trials)) == len(trials)
        assert len({t.name for t in trials}) == len(trials)  # each names its own checkpoint folder
    assert {t.loss for t in distilled} == {"kd", "dkd", "ls", "dist"} and {t.loss for t in labels} == {"kd"}
    # (2 recipes x 4 T x 2 alpha x 3 lr x 3 epochs, plus function-matching's 4 T x 3 lr x 3 epochs at alpha 1) x 4 losses
    assert len(distilled) == (2 * 4 * 2 * 3 * 3 + 4 * 3 * 3) * 4 and len(labels) == 2 * 3 * 3


def test_a_trial_with_another_loss_names_its_folder_and_flags_by_it():
    kd = Trial("distilled", "hinton", 4.0, 0.9, 3e-3, 30)
    dkd = Trial("distilled", "hinton", 4.0, 0.9, 3e-3, 30, "dkd")
    assert kd.name == "distilled-hinton-T4-a0.9-lr0.003-e30" and dkd.name == kd.name + "-dkd"
    assert "--loss" not in kd.flags() and dkd.flags()[-2:] == ["--loss", "dkd"]
    assert space(loss="ls")["distilled"][0].loss == "ls"


@pytest.mark.parametrize("recipe", ["auto", "hinton"])
def test_small_inputs_without_augmentation_get_no_consistent_trial(recipe):
    grid = space(recipe=recipe, augmenting=False)
    assert all(t.recipe != "consistent" for trials in grid.values() for t in trials)
    assert {t.recipe for t in grid["distilled"]} == {"hinton", "function-matching"}
    assert {t.recipe for t in grid["labels"]} == {"hinton"}


def test_without_labels_there_is_no_labels_family_and_alpha_is_one():
    grid = space(labelled=False)
    assert list(grid) == ["distilled"]
    assert {t.alpha for t in grid["distilled"]} == {1.0}
    assert grid["distilled"][0] == Trial("distilled", "hinton", 4.0, 1.0, 3e-3, 30)
    assert len(set(grid["distilled"])) == len(grid["distilled"])


def test_trial_names_are_unique_whatever_the_users_learning_rate():
    grid = space(lr=0.0012345, epochs=3, augmenting=False)
    for family, trials in grid.items():
        repeated = [name for name, count in Counter(t.name for t in trials).items() if count > 1]
        assert not repeated, f"{family}: {repeated} name more than one trial"


def test_rung_epochs_grow_to_the_whole_schedule():
    for epochs in range(1, 121):
        trial = Trial("distilled", "hinton", 4.0, 0.9, 3e-3, epochs)
        rungs = [trial.rung_epochs(r) for r in range(len(RUNG_FRACTIONS))]
        assert rungs == sorted(rungs) and rungs[0] >= 1, epochs
        assert rungs[-1] == epochs and trial.rung_epochs(LAST_RUNG + 1) == epochs
        assert rungs[0] == max(1, round(epochs / 9))


# ----------------------------------------------------------------------------------------------
# successive_halving on a synthetic train function


def accuracy(trial: Trial, epochs: int) -> float:
    """A fixed pseudo-random function of the settings and the epochs, in [0, 1): the ranking changes between rungs."""
    return zlib.crc32(f"{trial.name}@{epochs}".encode()) / 2 ** 32


class Recorder:
    """``train(trial, epochs)`` for successive_halving: ``accuracy`` plus a bonus per family; records every call."""

    def __init__(self, bonus: dict[str, float] | None = None, constant: float | None = None):
        self.bonus, self.constant = bonus or {}, constant
        self.calls: list[tuple[Trial, int, float]] = []

    def __call__(self, trial: Trial, epochs: int) -> tuple[float, float, object]:
        value = accuracy(trial, epochs) if self.constant is None else self.constant
        value += self.bonus.get(trial.family, 0.0)
        self.calls.append((trial, epochs, value))
        return value, float(epochs), ("model of", trial, epochs)  # one second per epoch

    def per_trial(self) -> dict[Trial, list[tuple[int, float]]]:
        """Every trial's calls in order: (epochs, accuracy), one per rung it reached."""
        out: dict[Trial, list[tuple[int, float]]] = {}
        for trial, epochs, value in self.calls:
            out.setdefault(trial, []).append((epochs, value))
        return out


def search(grid, train, budget_s: float = 1e9, trials: int | None = None, seed: int = 0):
    return successive_halving(grid, train, budget_s, seed=seed, log=lambda line: None, trials=trials)


@pytest.mark.parametrize("n", [1, 2, 4, 10, 18])
def test_each_rung_keeps_the_best_third_by_the_train_functions_accuracy(n):
    grid, train = space(), Recorder()
    tuning = search(grid, train, trials=n)
    assert tuning.trials_per_family == n
    calls = train.per_trial()
    for family in FAMILIES:
        sampled = [t for t in calls if t.family == family]
        assert len(sampled) == n and sampled[0] == grid[family][0]  # the user's own setting always runs
        assert set(sampled) <= set(grid[family])
        for trial in sampled:  # one call per rung reached, each to that rung's epochs, never fewer than before
            epochs = [e for e, _ in calls[trial]]
            assert epochs == [trial.rung_epochs(r) for r in range(len(epochs))] and epochs == sorted(epochs)
        for rung, expected in enumerate([n, math.ceil(n / 3), math.ceil(n / 9)]):
            reached = [t for t in sampled if len(calls[t]) > rung]
            assert len(reached) == expected, f"{family} rung {rung + 1}"
            if rung < LAST_RUNG:  # whoever went on scored at least as well at this rung as whoever stopped
                on = [calls[t][rung][1] for t in reached if len(calls[t]) > rung + 1]
                off = [calls[t][rung][1] for t in reached if len(calls[t]) == rung + 1]
                assert len(on) == math.ceil(len(reached) / 3)
                assert not off or min(on) >= max(off)
        finishers = [t for t in sampled if len(calls[t]) == len(RUNG_FRACTIONS)]
        best = max(finishers, key=lambda t: calls[t][-1][1])
        winner = tuning.winners[family]
        assert winner.trial == best and winner.val_accuracy == calls[best][-1][1]
        assert winner.epochs_trained == best.epochs and winner.rung == LAST_RUNG
        assert winner.result == ("model of", best, best.epochs)  # what train returned last
    rows = {o.trial: o for o in tuning.outcomes}
    assert set(rows) == set(calls)
    for trial, history in calls.items():
        assert rows[trial].rung == len(history) - 1 and rows[trial].epochs_trained == history[-1][0]
        assert rows[trial].val_accuracy == history[-1][1]


def test_one_trial_per_family_is_the_users_setting_trained_in_full():
    grid, train = space(), Recorder()
    tuning = search(grid, train, trials=1)
    assert [t for t, _, _ in train.calls] == [grid["distilled"][0], grid["labels"][0]] * 3
    assert [e for _, e, _ in train.calls] == [3, 3, 10, 10, 30, 30]
    assert {f: o.trial for f, o in tuning.winners.items()} == {f: grid[f][0] for f in FAMILIES}


def test_the_labels_winner_is_chosen_when_it_does_at_least_as_well():
    grid = space()
    labels = search(grid, Recorder(bonus={"labels": 1.0}), trials=5)
    assert labels.chosen is labels.winners["labels"]
    explanation = labels.describe()["explanation"]
    assert "distillation did not pay" in explanation and labels.chosen.trial.name in explanation
    tie = search(grid, Recorder(constant=0.5), trials=5)
    assert tie.chosen is tie.winners["labels"]  # equal accuracy: the simpler network wins
    assert tie.winners["distilled"].trial == grid["distilled"][0]  # ties keep the user's own setting
    assert tie.winners["labels"].trial == grid["labels"][0]
    distilled = search(grid, Recorder(bonus={"distilled": 1.0}), trials=5)
    assert distilled.chosen is distilled.winners["distilled"]
    explanation = distilled.describe()["explanation"]
    assert "so it was chosen" in explanation and "did not pay" not in explanation


def test_describe_gives_the_table_the_winners_and_the_rerun_commands():
    grid = space()
    tuning = search(grid, Recorder(bonus={"distilled": 1.0}), trials=4)
    command = "compress --teacher t.pt --recipe auto --tune 3 --out runs/a"
    report = tuning.describe(command, Path("runs/a"))
    json.dumps(report)  # JSON-safe
    assert report["trials_per_family"] == 4 and len(report["trials"]) == 8
    assert report["chosen"]["name"] == tuning.chosen.trial.name and report["chosen"]["family"] == "distilled"
    assert report["baseline"]["name"] == tuning.winners["labels"].trial.name
    assert {row["rung"] for row in report["trials"]} == {1, 2, 3}  # 1-based in the report
    assert report["rerun"] == rerun_command(command, tuning.chosen.trial, Path("runs/a"))
    assert report["baseline_rerun"] == rerun_command(command, tuning.winners["labels"].trial, Path("runs/a"))
    assert tuning.describe()["rerun"] is None and tuning.describe()["baseline_rerun"] is None


def test_trials_are_capped_by_the_smallest_family():
    grid = space()
    tuning = search(grid, Recorder(), trials=1000)
    assert tuning.trials_per_family == len(grid["labels"]) == 18
    assert Counter(o.trial.family for o in tuning.outcomes) == {"distilled": 18, "labels": 18}


def test_the_budget_sizes_the_search_between_one_trial_and_the_smallest_family():
    grid = space()
    huge = search(grid, Recorder(), budget_s=1e9)
    assert huge.trials_per_family == len(grid["labels"])
    tiny = search(grid, Recorder(), budget_s=0.0)
    assert tiny.trials_per_family == 1
    assert {o.trial for o in tiny.outcomes} == {grid[f][0] for f in FAMILIES}
    assert all(o.epochs_trained == o.trial.epochs for o in tiny.outcomes)
    assert "1 configuration(s) per family" in tiny.describe()["explanation"]


class SimulatedClock:
    """A clock that moves only when a trial trains: one second per epoch, ``slow`` seconds per epoch from epoch
    ``slow_from`` on for the trials of the consistent recipe (like an augmenting recipe computing views that are not
    cached yet), which the probes do not time. ``train`` returns each trial's seconds so far, as the pipeline's
    does from the trial's training history."""

    def __init__(self, slow: float = 1.0, slow_from: int = 0):
        self.now, self.slow, self.slow_from = 0.0, slow, slow_from
        self.trained: dict[Trial, int] = {}
        self.cost: dict[Trial, float] = {}

    def __call__(self) -> float:
        return self.now

    def train(self, trial: Trial, epochs: int) -> tuple[float, float, object]:
        for epoch in range(self.trained.get(trial, 0), epochs):
            pace = self.slow if trial.recipe == "consistent" and epoch >= self.slow_from else 1.0
            self.now += pace
            self.cost[trial] = self.cost.get(trial, 0.0) + pace
        self.trained[trial] = epochs
        return accuracy(trial, epochs), self.cost.get(trial, 0.0), None


def test_trials_slower_than_the_probes_make_later_rungs_promote_fewer():
    grid = space()
    lines: list[str] = []
    # the probes (the user's hinton trials) run at 1 s per epoch and size the search for the budget; the consistent
    # trials then run 5× slower from their third epoch on, so after the first rung the trials' own pace re-sizes the
    # next: fewer go on
    clock = SimulatedClock(slow=5.0, slow_from=2)
    budget = 300.0
    tight = successive_halving(grid, clock.train, budget, log=lines.append, clock=clock)
    assert any("to stay within the budget" in line for line in lines), lines
    finishers = [o for o in tight.outcomes if o.epochs_trained == o.trial.epochs and o.rung == LAST_RUNG]
    assert {o.trial.family for o in finishers} == set(FAMILIES)  # every family still ends with a full trial
    clock = SimulatedClock(slow=5.0, slow_from=2)
    unpruned = successive_halving(grid, clock.train, budget, log=lambda x: None, clock=clock,
                                  trials=tight.trials_per_family)  # the same trials, promoted by thirds
    assert tight.seconds < unpruned.seconds
    # with --tune-trials the search is the same whatever the clock says
    fixed = [successive_halving(grid, SimulatedClock(slow).train, 1.0, log=lambda x: None, trials=9,
                                clock=SimulatedClock(slow)) for slow in (1.0, 50.0)]
    assert [o.describe() | {"seconds": 0} for o in fixed[0].outcomes] == \
        [o.describe() | {"seconds": 0} for o in fixed[1].outcomes]


def test_rest_seconds_adds_each_trials_own_pace_over_the_rungs_it_would_still_train():
    fast, slow = Trial("labels", "hinton", 4.0, 0.0, 1e-3, 9), Trial("labels", "hinton", 4.0, 0.0, 3e-3, 9)
    outcomes = {fast: Outcome(fast, 0, 1, 0.9, 1.0), slow: Outcome(slow, 0, 1, 0.8, 10.0)}  # 1 and 10 s per epoch
    # rung 2 (3 epochs): both train 2 more epochs; rung 3 (9 epochs): the best third, ``fast``, trains 6 more
    assert rest_seconds([fast, slow], 1, outcomes) == pytest.approx(2 * 1.0 + 2 * 10.0 + 6 * 1.0)
    assert rest_seconds([fast], 2, outcomes) == pytest.approx(8 * 1.0)


def test_rest_seconds_adds_the_view_cost_of_the_epochs_each_trial_would_still_train():
    fast, slow = Trial("labels", "hinton", 4.0, 0.0, 1e-3, 9), Trial("distilled", "consistent", 4.0, 0.9, 3e-3, 9)
    outcomes = {fast: Outcome(fast, 0, 1, 0.9, 1.0), slow: Outcome(slow, 0, 1, 0.8, 1.0)}  # both 1 s per epoch so far
    asked = []

    def views(trial, first, last, priced):  # 5 s for each epoch of the consistent trial whose views are not cached
        asked.append((trial, first, last))
        return 5.0 * (last - first + 1) if trial.recipe == "consistent" else 0.0

    assert rest_seconds([slow, fast], 1, outcomes, views) == pytest.approx(2 * 6.0 + 2 * 1.0 + 6 * 6.0)
    assert asked == [(slow, 2, 3), (fast, 2, 3), (slow, 4, 9)]  # only the epochs still to train, once each


def test_rest_seconds_charges_the_views_a_recipes_trials_share_once():
    """Two consistent trials need the same uncached views for epochs 2-3: the first is charged, the second is told
    they are priced (the view cache will hold them by then); another recipe's views are its own."""
    a, b = Trial("distilled", "consistent", 4.0, 0.9, 1e-3, 9), Trial("distilled", "consistent", 2.0, 0.5, 3e-3, 9)
    c = Trial("distilled", "function-matching", 4.0, 1.0, 1e-3, 9)
    outcomes = {t: Outcome(t, 0, 1, accuracy, 1.0) for t, accuracy in ((a, 0.9), (b, 0.8), (c, 0.7))}  # 1 s/epoch
    asked = []

    def views(trial, first, last, priced):  # 5 s for each epoch's views not yet charged
        asked.append((trial, first, last, priced))
        return 5.0 * max(0, last - max(first, priced + 1) + 1)

    # rung 2: a, b, c train epochs 2-3 (a's and c's views charged, b's shared with a); rung 3: a trains 4-9
    assert rest_seconds([a, b, c], 1, outcomes, views) == pytest.approx(3 * 2 * 1.0 + 6 * 1.0 + 2 * 10.0 + 30.0)
    assert asked == [(a, 2, 3, 0), (b, 2, 3, 3), (c, 2, 3, 0), (a, 4, 9, 3)]


def test_a_view_cost_foreseen_keeps_trials_promoted_on_cached_views_within_the_budget():
    """The consistent trials' first 3 epochs run at the probes' 1 s (their views cached), the rest at 20 s (views to
    compute): promoted on their pace alone the search overruns its budget; told what the views will cost, as the
    pipeline tells it from the view cache, it stays within."""
    grid, budget, slow = space(), 300.0, 20.0

    def search_with(foresee: bool):
        clock = SimulatedClock(slow=slow, slow_from=3)

        def views(trial, first, last, priced):  # the slow epochs ahead, less the slowness the trial's pace carries
            # (each trial of this clock is slow on its own, so views charged to another do not make it faster)
            if trial.recipe != "consistent":
                return 0.0
            trained = clock.trained.get(trial, 0)
            carried = (slow - 1) * max(0, trained - 3) / max(1, trained)
            return (slow - 1) * sum(1 for epoch in range(first, last + 1) if epoch > 3) - carried * (last - first + 1)

        return successive_halving(grid, clock.train, budget, log=lambda line: None, clock=clock,
                                  view_cost=views if foresee else None)

    assert search_with(foresee=True).seconds <= budget < search_with(foresee=False).seconds


def test_without_labels_only_distillation_is_searched():
    grid = space(labelled=False)
    tuning = search(grid, Recorder(), trials=3)
    assert set(tuning.winners) == {"distilled"} and tuning.chosen is tuning.winners["distilled"]
    report = tuning.describe("compress --teacher t.pt --tune 1")
    assert report["baseline"] is None and report["baseline_rerun"] is None
    assert "no labels" in report["explanation"]


# ----------------------------------------------------------------------------------------------
# halving_seconds and trials_that_fit

PER_EPOCH = {"distilled": 0.5, "labels": 0.2}   # seconds per epoch
MEAN_EPOCHS = {"distilled": 40.0, "labels": 30.0}


def test_halving_seconds_grow_with_the_trials_and_one_trial_is_one_schedule_per_family():
    assert halving_seconds(1, PER_EPOCH, MEAN_EPOCHS) == pytest.approx(0.5 * 40 + 0.2 * 30)
    seconds = [halving_seconds(n, PER_EPOCH, MEAN_EPOCHS) for n in range(1, 40)]
    assert all(a < b for a, b in zip(seconds, seconds[1:]))


def test_trials_that_fit_is_the_largest_n_within_the_budget():
    for k in range(1, 25):
        assert trials_that_fit(halving_seconds(k, PER_EPOCH, MEAN_EPOCHS), PER_EPOCH, MEAN_EPOCHS, 100) == k
        assert trials_that_fit(halving_seconds(k, PER_EPOCH, MEAN_EPOCHS), PER_EPOCH, MEAN_EPOCHS, 5) == min(k, 5)
    two = halving_seconds(2, PER_EPOCH, MEAN_EPOCHS)
    for budget in (-1.0, 0.0, two * 0.999):
        assert trials_that_fit(budget, PER_EPOCH, MEAN_EPOCHS, 100) == 1  # the user's setting alone
    fits = [trials_that_fit(b, PER_EPOCH, MEAN_EPOCHS, 100) for b in range(0, 2000, 7)]
    assert fits == sorted(fits) and fits[-1] > 1


# ----------------------------------------------------------------------------------------------
# rerun_command


def test_rerun_command_replaces_the_tuning_options_and_keeps_the_rest():
    trial = Trial("distilled", "consistent", 2.0, 0.5, 0.009, 60)
    command = shlex.join(["compress", "--teacher", "/data/my teachers/e.pt", "--recipe", "auto", "--tune", "5",
                          "--tune-trials", "3", "-T", "8", "--alpha=0.3", "--lr=0.1", "--student", "mlp:32x32",
                          "--epochs", "7", "--baseline", "--out", "runs/my run", "--resume", "--temperature=3",
                          "--tune=2", "--tune-trials=4", "--seed", "3", "--batch-size", "64"])
    rerun = rerun_command(command, trial)
    assert "'/data/my teachers/e.pt'" in rerun and "'runs/my run'" in rerun  # quoted for the shell
    assert shlex.split(rerun) == ["compress", "--teacher", "/data/my teachers/e.pt", "--student", "mlp:32x32",
                                  "--out", "runs/my run", "--seed", "3", "--batch-size", "64",
                                  "--recipe", "consistent", "--temperature", "2", "--alpha", "0.5", "--lr", "0.009",
                                  "--epochs", "60"]


def test_a_rerun_command_given_the_tuned_runs_folder_writes_beside_it_not_over_it():
    trial = Trial("labels", "hinton", 4.0, 0.0, 0.003, 40)
    for given in ("--out runs/a", "--out=runs/a", ""):  # --out as two words, as one, or the default folder
        command = f"compress --teacher t.pt --recipe auto {given} --seed 3"
        words = shlex.split(rerun_command(command, trial, Path("runs/a")))
        assert words.count("--out") == 1 and not any(word.startswith("--out=") for word in words)
        assert words[words.index("--out") + 1] == str(Path("runs/a") / "reruns" / trial.name)
        assert words[:3] == ["compress", "--teacher", "t.pt"] and words[words.index("--seed") + 1] == "3"


def test_rerun_command_gives_the_users_own_learning_rate_exactly():
    own = space(lr=0.0012345)["distilled"][0]
    words = shlex.split(rerun_command("compress --teacher t.pt --lr 0.0012345 --tune 1", own))
    assert float(words[words.index("--lr") + 1]) == own.lr == 0.0012345


# ----------------------------------------------------------------------------------------------
# train_student(until=...): the rungs' pause and resume


def test_training_paused_at_each_rung_and_resumed_ends_with_the_weights_of_one_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100, 10, generator=g), torch.randint(0, 4, (100,), generator=g)  # (N, D), (N,)
    teacher = torch.randn(2, 100, 4, generator=g)  # (K, N, C)
    x_val, y_val = torch.randn(40, 10, generator=g), torch.randint(0, 4, (40,), generator=g)
    config = TrainConfig(epochs=6, batch_size=16, lr=1e-2, seed=3, progress=False)
    loss = DistillationLoss(temperature=2.0, alpha=0.5)

    def view(xb, rows, epoch):  # a deterministic function of (row, epoch), as compressor.data.augment's views are
        return xb + 0.01 * epoch * torch.cos(rows.float())[:, None]

    def student() -> nn.Module:  # a fresh student per call, as tuning builds one per rung; dropout uses the RNG
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))

    whole = student()
    once = train_student(whole, x, y, teacher, x_val, y_val, loss, config, tmp_path / "once", view=view)
    paused = None
    for until in (1, 1, 3, None):
        paused = student()
        result = train_student(paused, x, y, teacher, x_val, y_val, loss, config, tmp_path / "rungs", resume=True,
                               view=view, until=until)
        last = torch.load(tmp_path / "rungs" / LAST_NAME, weights_only=True)
        assert last["epoch"] == (until or config.epochs) and len(result.history) == last["epoch"]
    assert result.resumed_from_epoch == 3
    for a, b in zip(whole.state_dict().values(), paused.state_dict().values()):  # the best epoch's weights
        assert torch.equal(a, b)
    ends = [torch.load(tmp_path / run / LAST_NAME, weights_only=True) for run in ("once", "rungs")]
    for key in ("model_state", "best_model_state"):
        for a, b in zip(ends[0][key].values(), ends[1][key].values()):
            assert torch.equal(a, b)
    assert torch.equal(ends[0]["rng_state"], ends[1]["rng_state"])
    assert (result.best_epoch, result.best_val_accuracy) == (once.best_epoch, once.best_val_accuracy)
    timings = ("seconds", "view_seconds")
    strip = [[{k: v for k, v in h.items() if k not in timings} for h in r.history] for r in (once, result)]
    assert strip[0] == strip[1]  # same losses, accuracies and learning rates epoch by epoch


# ----------------------------------------------------------------------------------------------
# end to end on digits through the CLI


def compress(*args) -> int:
    return main([str(a) for a in args])


def student_logits(path: Path) -> torch.Tensor:
    model = torch.jit.load(str(path))
    with torch.no_grad():
        return model(torch.from_numpy(load_dataset("digits", seed=0).test.x))  # (N, 10)


def with_out(words: list[str], out: Path) -> list[str]:
    words = list(words)
    words[words.index("--out") + 1] = str(out)
    return words


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, digits_ensemble):
    """One ``--recipe auto --tune-trials 2`` run on digits: (its arguments, its --out, its report)."""
    out = tmp_path_factory.mktemp("tuned") / "run"
    args = [str(a) for a in ("--teacher", digits_ensemble, "--recipe", "auto", "--tune-trials", "2", "--out", out,
                             *QUICK)]
    assert main(args) == 0
    return args, out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_a_tuned_run_reports_the_search_and_its_choice(tuned_run):
    args, out, report = tuned_run
    tuning = report["tuning"]
    assert tuning["trials_per_family"] == 2
    assert report["config"]["recipe"] == "auto" and report["config"]["tune_trials"] == 2  # the options as given
    assert Counter(t["family"] for t in tuning["trials"]) == {"distilled": 2, "labels": 2}
    assert tuning["trials"][0]["name"] == "distilled-hinton-T4-a0.9-lr0.003-e3"  # the user's own setting first
    assert tuning["baseline"]["family"] == "labels" and tuning["baseline"]["alpha"] == 0
    finished = {t["family"]: t for t in tuning["trials"] if t["rung"] == len(RUNG_FRACTIONS)}
    assert set(finished) == {"distilled", "labels"}
    assert tuning["baseline"] == finished["labels"]
    assert tuning["chosen"]["val_accuracy"] == max(t["val_accuracy"] for t in finished.values())
    assert tuning["rerun"].startswith("compress ") and "--tune" not in tuning["rerun"]
    assert "--recipe auto" not in tuning["rerun"] and tuning["baseline_rerun"]
    assert report["headline"].endswith(tuning["explanation"])
    markdown = (out / "report.md").read_text()
    assert "## Tuning" in markdown and f"`{tuning['rerun']}`" in markdown
    assert (out / "student.pt").is_file() and (out / "baseline.pt").is_file()
    for trial in tuning["trials"]:
        assert (out / "tuning" / trial["name"] / LAST_NAME).is_file()


@pytest.mark.slow
def test_the_printed_rerun_command_reproduces_the_chosen_student_exactly(tuned_run, tmp_path):
    _, out, report = tuned_run
    tuning = report["tuning"]
    reruns: dict[str, Path] = {}  # the two commands are one when the labels family's winner is chosen
    for command, model, trial in ((tuning["rerun"], "student.pt", tuning["chosen"]),
                                  (tuning["baseline_rerun"], "baseline.pt", tuning["baseline"])):
        if command not in reruns:
            words = shlex.split(command)
            assert words[0] == "compress"
            reruns[command] = tmp_path / model.removesuffix(".pt")
            assert main(with_out(words[1:], reruns[command])) == 0
        rerun_out = reruns[command]
        rerun = json.loads((rerun_out / "report.json").read_text())
        assert rerun["tuning"] is None  # the rerun does not search again
        assert rerun["student"]["training"]["best_val_accuracy"] == trial["val_accuracy"]
        assert torch.equal(student_logits(rerun_out / "student.pt"), student_logits(out / model))


@pytest.mark.slow
def test_an_interrupted_search_resumes_its_finished_trials(tuned_run, tmp_path):
    args, out, report = tuned_run
    again = tmp_path / "run"
    shutil.copytree(out / "tuning", again / "tuning")  # what a search killed before its end leaves behind
    chosen = report["tuning"]["chosen"]["name"]
    shutil.rmtree(again / "tuning" / chosen)  # ... killed before the chosen trial began
    kept = {p.parent.name: p.stat().st_mtime_ns for p in (again / "tuning").glob(f"*/{LAST_NAME}")}
    assert len(kept) == len(report["tuning"]["trials"]) - 1
    assert main([*with_out(args, again), "--resume"]) == 0
    resumed = json.loads((again / "report.json").read_text())["tuning"]

    def rows(tuning):
        return [{k: v for k, v in t.items() if k != "seconds"} for t in tuning["trials"]]
    assert rows(resumed) == rows(report["tuning"]) and resumed["chosen"]["name"] == chosen
    assert {name: (again / "tuning" / name / LAST_NAME).stat().st_mtime_ns for name in kept} == kept  # not retrained
    assert (again / "tuning" / chosen / LAST_NAME).is_file()
    for model in ("student.pt", "baseline.pt"):
        assert torch.equal(student_logits(again / model), student_logits(out / model))


@pytest.mark.slow
def test_a_search_sized_by_its_budget_resumes_with_the_same_choices(digits_ensemble, tmp_path):
    args = [str(a) for a in ("--teacher", digits_ensemble, "--recipe", "auto", "--tune", "0.2", "--out",
                             tmp_path / "first", *QUICK)]
    assert main(args) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())["tuning"]
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "first" / "tuning", again / "tuning")  # every trial finished: nothing costs time now
    assert main([*with_out(args, again), "--resume"]) == 0
    resumed = json.loads((again / "report.json").read_text())["tuning"]
    # the budget is spent in the seconds the trials' histories recorded, so the same trials, rungs, accuracies and
    # costs come out, though the resumed search took almost no time. How many trials fit 0.2 minutes depends on the
    # machine's load, so nothing here counts them: the simulated-clock tests above size searches by a fake clock.
    assert resumed["trials"] == first["trials"] and resumed["chosen"] == first["chosen"]
    assert resumed["trials_per_family"] == first["trials_per_family"], first


@pytest.mark.slow
def test_a_new_search_without_resume_is_not_blocked_by_an_earlier_searchs_trials(tuned_run, tmp_path, capsys):
    args, out, _ = tuned_run
    again = tmp_path / "run"
    shutil.copytree(out / "tuning", again / "tuning")
    capsys.readouterr()
    code = main([*with_out(args, again), "--batch-size", "64"])
    output = capsys.readouterr().err
    assert code == 0, output


@pytest.mark.slow
def test_a_search_from_an_unrounded_learning_rate_runs(digits_ensemble, tmp_path, capsys):
    code = compress("--teacher", digits_ensemble, "--recipe", "auto", "--lr", "0.0012345", "--tune-trials", "10",
                    "--out", tmp_path / "run", *QUICK)
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("tune", [["--tune", "0"], ["--tune", "-1"], ["--tune=-1"]])
def test_a_budget_that_is_not_positive_is_refused_before_any_work(tune, digits_ensemble, tmp_path, capsys):
    out = tmp_path / "out"
    code = compress("--teacher", digits_ensemble, "--out", out, *tune, *QUICK)
    output = capsys.readouterr()
    assert code == 1 and not out.exists()
    errors = [line for line in (output.out + output.err).splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: --tune"), errors
    assert "Traceback" not in output.err


def test_tune_trials_below_one_is_a_usage_error(digits_ensemble, tmp_path, capsys):
    out = tmp_path / "out"
    code = compress("--teacher", digits_ensemble, "--out", out, "--tune", "1", "--tune-trials", "0", *QUICK)
    assert code == 2 and not out.exists()
    assert "--tune-trials" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_with_an_explicit_recipe_starts_from_it(digits_ensemble, tmp_path):
    out = tmp_path / "run"
    assert compress("--teacher", digits_ensemble, "--recipe", "consistent", "--tune", "5", "--tune-trials", "2",
                    "--out", out, *QUICK) == 0
    tuning = json.loads((out / "report.json").read_text())["tuning"]
    assert tuning["budget_minutes"] == 5 and tuning["trials_per_family"] == 2
    first = {}
    for trial in tuning["trials"]:
        first.setdefault(trial["family"], trial)
    assert first["distilled"]["name"] == "distilled-consistent-T4-a0.9-lr0.003-e3"
    assert first["labels"]["name"] == "labels-hinton-lr0.003-e3"  # 8 px digits: no augmentation to add
    others = [t for t in tuning["trials"] if t is not first[t["family"]]]
    assert all(t["recipe"] in ("hinton", "function-matching") for t in others)  # no other consistent trial
    assert (out / "student.pt").is_file() and (out / "baseline.pt").is_file()


def test_a_best_trial_that_would_run_past_the_budget_gives_way_to_the_best_that_fits():
    cheap, good, pricey = (Trial("distilled", "hinton", 4.0, 0.9, lr, 9) for lr in (1e-3, 3e-3, 1e-2))
    outcomes = {cheap: Outcome(cheap, 0, 1, 0.80, 1.0), good: Outcome(good, 0, 1, 0.85, 2.0),
                pricey: Outcome(pricey, 0, 1, 0.90, 30.0)}  # 1, 2 and 30 s per epoch so far; 8 epochs to go
    lines: list[str] = []
    ranked = [pricey, good, cheap]
    assert promote_within(ranked, 1, outcomes, 1e9, lines.append) == [pricey]  # room for it: the best goes on
    assert lines == []
    assert promote_within(ranked, 1, outcomes, 20.0, lines.append) == [good]  # 240 s for pricey, 16 s for good
    assert "would need 4.0 more min, past the 0.3 left" in lines[-1] and good.name in lines[-1]
    assert promote_within(ranked, 1, outcomes, 5.0, lines.append) == [cheap]  # none fits: the soonest to finish
    assert "though it too runs past the budget" in lines[-1]


def test_a_slow_recipe_does_not_take_the_search_far_past_its_budget():
    grid = space()
    lines: list[str] = []
    # the consistent trials' views cost 60× a cached hinton epoch: without a cap the first rung alone would take
    # several budgets, and the best of them promoted alone would be trained to the end, whatever the budget
    clock = SimulatedClock(slow=60.0)
    budget = 600.0
    tuning = successive_halving(grid, clock.train, budget, log=lines.append, clock=clock)
    assert tuning.seconds < 1.5 * budget, lines
    assert any("the rest were not started" in line for line in lines), lines
    # slow only after the first rung (its views were cached by shorter trials): the second rung overruns, which no
    # pace measured so far could foresee, but no consistent trial is then trained to its end: a cheaper one goes on
    lines.clear()
    clock = SimulatedClock(slow=60.0, slow_from=7)
    tuning = successive_halving(grid, clock.train, budget, log=lines.append, clock=clock)
    assert any("goes on instead" in line for line in lines), lines
    assert not [o for o in tuning.outcomes if o.trial.recipe == "consistent" and o.rung == LAST_RUNG]


def test_the_budget_is_spent_in_the_trials_training_seconds_so_a_resumed_search_decides_alike():
    grid = space()
    first = SimulatedClock(slow=5.0, slow_from=2)
    original = successive_halving(grid, first.train, 300.0, log=lambda line: None, clock=first)
    # resumed from checkpoints, every trial reports the seconds its history recorded but takes no time now
    resumed = successive_halving(grid, SimulatedClock(slow=5.0, slow_from=2).train, 300.0, log=lambda line: None,
                                 clock=lambda: 0.0)
    assert [o.describe() for o in resumed.outcomes] == [o.describe() for o in original.outcomes]
    assert resumed.chosen.trial == original.chosen.trial and resumed.seconds == 0.0


# ----------------------------------------------------------------------------------------------
# the low-fidelity screen


class Screen:
    """``screen(trial, epochs)``: a fixed accuracy per trial (``accuracy`` at epoch 1), a ninth of a second per
    epoch (a ninth of the rows); records every call."""

    def __init__(self):
        self.calls: list[tuple[Trial, int]] = []

    def __call__(self, trial: Trial, epochs: int) -> tuple[float, float, object]:
        self.calls.append((trial, epochs))
        return accuracy(trial, 1), epochs / 9, None


@pytest.mark.parametrize("budget_s", [0.0, 60.0, 1e9])
def test_a_budget_sized_search_screens_nine_configurations_per_family_and_keeps_the_best(budget_s):
    grid, screen, train = space(), Screen(), Recorder()
    tuning = successive_halving(grid, train, budget_s, log=lambda line: None, screen=screen)
    for family in FAMILIES:
        screened = [trial for trial, _ in screen.calls if trial.family == family]
        assert len(screened) == len(set(screened)) == SCREEN_TRIALS and screened[0] == grid[family][0]
        assert all(epochs == trial.rung_epochs(0) for trial, epochs in screen.calls)
        ranked = sorted(screened, key=lambda t: -accuracy(t, 1))
        entered = [o.trial for o in tuning.outcomes if o.trial.family == family and o.trial != grid[family][0]]
        # the rungs hold screened trials (and the user's setting, timed as the probe): with budget to spare, the
        # screen's best n; with little, the best that fit (test_the_screens_best_enter_the_rungs_as_the_budget_allows)
        assert set(entered) <= set(screened)
        if budget_s == 1e9:
            assert set(entered) <= set(ranked[:tuning.trials_per_family])
    assert tuning.configurations_per_family == SCREEN_TRIALS >= tuning.trials_per_family
    table = tuning.describe()
    assert table["configurations_per_family"] == SCREEN_TRIALS and table["screen"]["rows"] == SCREEN_ROWS
    assert sum(row["rung"] == 0 for row in table["trials"]) == SCREEN_TRIALS * len(FAMILIES)
    assert f"tried {SCREEN_TRIALS} configuration(s) per family (screened on 11% of the rows" in table["explanation"]


def test_the_screens_seconds_count_against_the_budget_and_a_fixed_trial_count_skips_it():
    grid = space()
    plain = successive_halving(grid, Recorder(), 400.0, log=lambda line: None)
    screened = successive_halving(grid, Recorder(), 400.0, log=lambda line: None, screen=Screen())
    assert sum(o.seconds for o in screened.screened) > 0
    assert screened.trials_per_family <= plain.trials_per_family
    fixed_screen = Screen()
    fixed = successive_halving(grid, Recorder(), 400.0, log=lambda line: None, trials=3, screen=fixed_screen)
    assert not fixed_screen.calls and fixed.screened == [] and fixed.trials_per_family == 3


def test_the_screens_best_enter_the_rungs_as_the_budget_allows():
    grid = [Trial("distilled", "hinton", t, 0.9, 3e-3, 30) for t in (4.0, 1.0, 2.0, 8.0)]  # the user's first
    screened = {t: Outcome(t, -1, 1, accuracy, seconds, rows=SCREEN_ROWS) for t, accuracy, seconds in
                [(grid[0], 0.5, 1.0), (grid[1], 0.9, 10.0), (grid[2], 0.8, 1.0), (grid[3], 0.7, 1.0)]}
    rng = random.Random(0)
    # cost: 1 s per epoch of schedule at the user's pace, times the trial's pace in the screen (grid[1]: 10x)
    assert _first_trials(grid, 2, screened, rng, 1.0, math.inf) == [grid[1], grid[2]]  # the best two
    assert _first_trials(grid, 2, screened, rng, 1.0, 2.5 * 30) == [grid[2], grid[3]]  # grid[1] would not fit
    assert _first_trials(grid, 2, screened, rng, 1.0, 0.0) == [grid[2]]  # nothing fits: the cheapest, best first
