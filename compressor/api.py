"""The main job from Python: ``compressor.compress(teachers, data, target=..., **options) -> Result``.

One path for every caller: ``compress`` turns its arguments into the :class:`~compressor.config.RunConfig` the
``compress`` command builds from the same option table (:func:`compressor.options.option_table`), and
:func:`run_config` runs it, which is what the command calls too. Teachers and data may be objects in memory
(``nn.Module``s, :class:`~compressor.data.torch_data.Data` of torch Datasets) as well as files.

Progress goes through ``logging`` (logger ``compressor``: the run's messages; ``compressor.training.loop``: one
line per epoch) and the optional ``on_epoch(dict)`` callback; the rich progress bar is the command's alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console

from compressor.config import RunConfig
from compressor.core.errors import OptionError
from compressor.data.torch_data import Data
from compressor.options import command_line, config_from_options, options_from_kwargs
from compressor.pipeline import Sources, run
from compressor.teachers.ensemble import Ensemble
from compressor.teachers.in_memory import LABEL, ensemble_from_modules
from compressor.training.loop import EPOCH_CALLBACK
from targets.bundle import Bundle, load_bundle

log = logging.getLogger("compressor")
FILES = {"report": "report.json", "report_md": "report.md", "pareto": "pareto.png", "student": "student.pt",
         "baseline": "baseline.pt", "selection": "selection.json", "bundle": "bundle", "export": "export"}


@dataclass
class Result:
    """A finished run: ``report`` (report.json as a dict), ``student`` (the trained ``nn.Module``, eval mode),
    ``out`` (the folder written) and ``paths`` (name → file: report, report_md, pareto, student, bundle, export,
    model). ``bundle`` loads ``<out>/bundle`` on first use: ``result.bundle.predict(x)`` runs the export."""

    report: dict
    student: torch.nn.Module
    out: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def headline(self) -> str:
        """The report's one-line verdict (accuracy kept, speed-up, size)."""
        return self.report["headline"]

    @functools.cached_property
    def bundle(self) -> Bundle:
        """The deployable bundle, loaded (onnxruntime) and ready for ``predict``."""
        return load_bundle(self.paths["bundle"])


def compress(teachers, data=None, target: str = "onnxruntime", student: str = "auto", out: str | Path | None = None,
             *, on_epoch: Callable[[dict], None] | None = None, **options) -> Result:
    """Distil ``teachers`` into a student on ``data``, export it to ``target`` and report the trade.

    ``teachers``: a list of ``nn.Module``s (logits (N, C); transformers classifiers too), an ensemble file, or an
    :class:`Ensemble`. ``data``: a ``--data`` spec (``"digits"``, a folder, ``"hf:DIR"``, ...), a
    :class:`Data` of torch Datasets yielding ``(input, label)``, or one Dataset (val and test carved from it);
    None: the ensemble's hint. ``options``: the command's options by their Python names (``budget=5``,
    ``baseline=True``, ``batch_sizes=(1, 64)``, ``trust_pickle=True``); the progress bar is off unless
    ``no_progress=False``. ``on_epoch(record)`` is called after every epoch of every training (the screen's
    candidates, the student, the baseline) with its epoch, losses, accuracies and run name. Raises a
    :class:`~compressor.core.errors.CompressorError` subclass naming what to fix, before any work where it can.

    Example::

        result = compressor.compress([net_a, net_b], compressor.Data(train=train_ds, test=test_ds), budget=5)
        print(result.headline); result.bundle.predict(x)
    """
    config, sources = config_and_sources(teachers, data, target, student, out, options)
    return run_config(config, sources, on_epoch=on_epoch)


def config_and_sources(teachers, data, target: str, student: str, out, options: dict) -> tuple[RunConfig, Sources]:
    """What :func:`compress` and the steps (:mod:`compressor.steps`) run: the RunConfig of the options (the
    command's table) and the teachers and data held in memory. Raises OptionError for a name or value the command
    would refuse, before anything is loaded."""
    options = dict(options)
    trust_pickle = bool(options.pop("trust_pickle", False))
    options = options_from_kwargs({"no_progress": True, **options, "target": target, "student": student, "out": out})
    ensemble, teacher, named = _teachers(teachers)
    if isinstance(data, torch.utils.data.Dataset):
        data = Data(train=data)
    if isinstance(data, Path):
        data = str(data)
    if not isinstance(data, (str, Data, type(None))):
        raise OptionError(f"data: give a --data spec (str), a compressor.Data or a torch Dataset, not "
                          f"{type(data).__name__}")
    if data is None and ensemble is not None:
        raise OptionError("data: teachers in memory name no dataset; give data=compressor.Data(train=...), a torch "
                          "Dataset, or a --data spec such as 'digits'")
    options["data"] = data if isinstance(data, str) else None
    if options["out"] is None and ensemble is not None:
        options["out"] = Path("compressed") / f"in-memory-{target}"
    config = config_from_options(teacher, options, trust_pickle=trust_pickle, command="")
    sources = Sources(ensemble, data if isinstance(data, Data) else None)
    return dataclasses.replace(config, command=_command(config, sources, named)), sources


def run_config(config: RunConfig, sources: Sources = Sources(), console: Console | None = None,
               on_epoch: Callable[[dict], None] | None = None) -> Result | None:
    """Run the main job for ``config``: what :func:`compress` and the ``compress`` command both call. Messages go
    to ``console`` (the command's stderr), else to logging; None on a torchrun rank other than 0."""
    with epochs_to(on_epoch):
        finished = run(config, console or logging_console(), sources)
    if finished is None:
        return None
    out = config.output_dir()
    paths = {name: out / file for name, file in FILES.items() if (out / file).exists()}
    report = json.loads(paths["report"].read_text())  # report.json as written: lists, not the run's tuples
    model = report.get("export", {}).get("files", {}).get("model")
    if model:
        paths["model"] = Path(model)
    return Result(report, finished.student, out, paths)


def _teachers(teachers) -> tuple[Ensemble | None, Path, str]:
    """(the ensemble in memory, or None for a file; the path or label messages name it by; how the report's
    command names it)."""
    if isinstance(teachers, (str, Path)):
        return None, Path(teachers), str(teachers)
    if isinstance(teachers, Ensemble):
        return teachers, teachers.path, f"Ensemble({teachers.path})"
    if isinstance(teachers, torch.nn.Module):
        teachers = [teachers]
    if isinstance(teachers, Sequence) and teachers:
        return ensemble_from_modules(teachers), LABEL, f"[{', '.join(type(m).__name__ for m in teachers)}]"
    raise OptionError(f"teachers: give a list of torch.nn.Modules, an ensemble file or an Ensemble, not "
                      f"{type(teachers).__name__}")


def _command(config: RunConfig, sources: Sources, teachers: str) -> str:
    """The exact call, for the report: the ``compress`` line when teachers and data are files, else the Python
    call with the objects named (``teachers``: how to name them)."""
    if sources.ensemble is None and sources.data is None:
        return command_line(config)
    words = shlex.split(command_line(config))[3:]  # the options, after "compress --teacher FILE"
    data = sources.data.label() if sources.data is not None else repr(config.data)
    return f"compressor.compress({teachers}, {data}) with the options of: compress {shlex.join(words)}"


class _LogLines(io.TextIOBase):
    """A text stream that hands each finished line to the ``compressor`` logger (INFO)."""

    def __init__(self):
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                level = logging.WARNING if line.lstrip().startswith("warning:") else logging.INFO
                log.log(level, line)
        return len(text)


def logging_console() -> Console:
    """A rich console (no colour, no bars' redraws) whose lines go to logging."""
    return Console(file=_LogLines(), force_terminal=False, no_color=True, width=200, emoji=False)


@contextlib.contextmanager
def epochs_to(on_epoch: Callable[[dict], None] | None):
    """While the run lasts, every finished epoch is handed to ``on_epoch`` as a dict."""
    token = EPOCH_CALLBACK.set(on_epoch)
    try:
        yield
    finally:
        EPOCH_CALLBACK.reset(token)
