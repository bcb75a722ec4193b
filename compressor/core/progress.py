"""The one progress bar every long step draws (teachers, training epochs, the benchmark), on stderr so that stdout
stays for the caller's output, hidden with --no-progress."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool, title: str = "[bold]{task.description}", fields: str | None = None) -> Progress:
    """A rich progress bar: ``title`` left of the bar, ``fields`` (a format of the task's live fields, e.g.
    ``"loss {task.fields[loss]}"``) right of the count, then elapsed and remaining time."""
    columns = [TextColumn(title), BarColumn(), MofNCompleteColumn()]
    if fields is not None:
        columns.append(TextColumn(fields))
    return Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled)
