"""The run context every step of the main job takes: the options, the teachers, the data and its tensors, the
normalisation, the process group and the console, and (once step 1 ran) the teachers' outputs on every split.
One object handed along instead of the same eight arguments to each step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from compressor.config import RunConfig
from compressor.data.datasets import Dataset
from compressor.data.loading import Tensors
from compressor.teachers.ensemble import Ensemble
from compressor.training.distributed import World
from compressor.training.cached_logits import CachedLogits


@dataclass
class TeacherOutputs:
    """The members' logits per split: ``train`` as the training loop reads it (cached on disk, or a function that
    runs the teachers on each batch with --no-cache), ``val`` and ``test`` as (K, N, C) tensors, and ``online``,
    the function that runs the teachers on any batch (for recipes whose inputs change every epoch)."""

    train: object
    val: torch.Tensor
    test: torch.Tensor
    cache: dict
    online: object
    views: Path | None = None        # where the teachers' logits on augmented views are cached (None: --no-cache)

    def take_train(self, rows: torch.Tensor, x_train: torch.Tensor) -> torch.Tensor:
        """The members' logits (K, S, C) on the transfer rows ``rows`` (S,): read from the cache, or with
        --no-cache computed by running the teachers on those rows once more."""
        if isinstance(self.train, CachedLogits):
            return self.train.take(rows)
        return self.online(x_train[rows])


@dataclass
class RunContext:
    """What a run knows before its students train. ``teacher`` is None until :func:`teacher_outputs` fills it;
    ``omitted`` holds the class indices of --omit-classes."""

    config: RunConfig
    ensemble: Ensemble
    dataset: Dataset
    tensors: Tensors
    normalisation: dict | None
    world: World
    console: Console
    teacher: TeacherOutputs | None = None
    omitted: tuple[int, ...] = ()
    student_selection: dict | None = None  # --student auto: the candidates priced and why one was chosen

    def with_config(self, config: RunConfig, quiet: bool = False) -> "RunContext":
        """The same run under other options (a tuning trial's); ``quiet`` silences its console."""
        console = Console(stderr=True, quiet=True) if quiet else self.console
        return dataclasses.replace(self, config=config, console=console)
