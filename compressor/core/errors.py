"""The project's exception type: one sentence for a person, and the exit code the CLI returns.

This module imports nothing heavy so that ``targets`` (and a serving process that only has
numpy and onnxruntime) can raise the same error the CLI knows how to print.
"""

from __future__ import annotations


class CompressorError(Exception):
    """A failure a user can fix: the message names the file or value, what was wrong and what to do.

    ``exit_code`` is what ``compress`` exits with: 1 for bad input or a failed gate,
    2 for a missing capability (no GPU, a missing optional package).
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class MissingCapabilityError(CompressorError):
    """The machine lacks something the request needs (a GPU, an optional package); exit code 2."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


class OptionError(CompressorError):
    """An option's name or value the job cannot take (``compressor.compress(..., budgt=3)``, ``--alpha 2``)."""


class TeacherError(CompressorError):
    """The teachers cannot be used as given: a member that fails on the data or returns other than (N, C) logits,
    an ensemble whose parts disagree, teachers handed over that are not modules."""


class ParityError(CompressorError):
    """An export whose outputs do not match PyTorch's within its precision's gate."""


class DataError(CompressorError):
    """The data cannot be used as given: the message names the split, the row and the fix."""


class DataShapeError(DataError):
    """A row whose input has another shape or kind than the split's first row (or than the teachers take)."""


class LabelError(DataError):
    """Labels that are not class indices the teachers predict (0 to C - 1), or -1 for an unlabeled row."""


class EmptySplitError(DataError):
    """A split with no rows: nothing to train, validate or score on."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, at most 200 characters (libraries often append pages of advice
    below it), or the exception's type name when it has no message."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of ``exc``: exporters and compilers wrap the model's own error in their own."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc
