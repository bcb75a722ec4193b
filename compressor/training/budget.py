"""``--budget MINUTES``: one bound on the run's training, spent on choosing the student (a share), then on
distilling it with its baseline (or, with ``--recipe auto``, on tuning).

The clock starts when the first training of the run starts (the teachers' pass is cached and comes before);
exporting and the benchmark come after and are not counted. ``--epochs`` left out means "as many epochs as the
budget buys, at most ``MAX_EPOCHS``", sized from the pace the run measured; ``--epochs N`` is obeyed and the budget
then bounds the choice alone. The cap counts optimiser steps as well as epochs: at most ``MAX_EPOCHS`` epochs or
``MAX_STEPS`` steps, whichever is more, so a small transfer set (3,000 rows are 24 steps an epoch at batch 128) is
not stopped after a few hundred steps with most of the budget unspent. The report (``budget``) says what the budget
bought: candidates priced and screened, screen configurations, epochs, and the seconds of each phase.

Default: 10 minutes. A default run on a 60k-row 28 × 28 dataset ends within 15 minutes on 2 idle CPU cores
(teachers' pass, export and benchmark included; benchmarks/RESULTS.md); on a GPU the same minutes buy more
epochs, up to the cap, so such a run usually ends well inside it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

DEFAULT_BUDGET_MINUTES = 10.0
MAX_EPOCHS = 30          # --epochs left out: as many as the budget buys, at most this many epochs ...
MAX_STEPS = 3000         # ... or this many optimiser steps, whichever is more (benchmarks/RESULTS.md, issue 29)
CHOICE_SHARE = 1 / 3     # of the budget, for choosing the student (pricing and screening)
MIN_SCREEN_SHARE = 1 / 6  # of the budget, for the screen however long pricing took (exports of library models)


@dataclass
class RunBudget:
    """The run's budget in seconds, its clock and what each phase spent."""

    seconds: float
    clock: Callable[[], float] = time.perf_counter
    spent: dict[str, float] = field(default_factory=dict)
    started: float | None = None
    stopped: float | None = None

    def start(self) -> None:
        """Start the clock (once: the first training phase calls it)."""
        if self.started is None:
            self.started = self.clock()

    def stop(self) -> None:
        """Stop the clock when the last training ends: the export and the benchmark after it are not the budget's."""
        if self.started is not None and self.stopped is None:
            self.stopped = self.clock()

    def elapsed(self) -> float:
        """Seconds from :meth:`start` to :meth:`stop`, or to now while running (0 before the start)."""
        if self.started is None:
            return 0.0
        return (self.clock() if self.stopped is None else self.stopped) - self.started

    def left(self) -> float:
        """Seconds of the budget left (negative once overrun)."""
        return self.seconds - self.elapsed()

    def record(self, phase: str, seconds: float) -> None:
        """Charge ``seconds`` to ``phase`` for the report."""
        self.spent[phase] = round(self.spent.get(phase, 0.0) + seconds, 2)

    def describe(self, bought: dict) -> dict:
        """The report's ``budget`` section: minutes, seconds used per phase, and ``bought`` (what they paid for)."""
        return {"minutes": round(self.seconds / 60, 2), "seconds_used": round(self.elapsed(), 1),
                "phases": dict(self.spent), "bought": bought}


def epoch_cap(steps_per_epoch: int) -> int:
    """The most epochs ``--epochs`` left out may buy: ``MAX_EPOCHS``, or as many as ``MAX_STEPS`` optimiser steps
    take at ``steps_per_epoch``, whichever is more."""
    return max(MAX_EPOCHS, math.ceil(MAX_STEPS / max(1, steps_per_epoch)))


def epochs_that_fit(seconds_left: float, seconds_per_epoch: float, runs: int, cap: int = MAX_EPOCHS) -> int:
    """How many epochs each of ``runs`` trainings (the student, its baseline, ...) can take at ``seconds_per_epoch``
    within ``seconds_left``: at least 1, at most ``cap``."""
    if seconds_per_epoch <= 0:
        return cap
    return max(1, min(cap, math.floor(seconds_left / (runs * seconds_per_epoch))))
