"""The student registry: ``--student SPEC`` → a freshly initialised ``nn.Module``.

Modelled on timm's ``register_model`` / ``create_model`` / ``list_models``: each family lives in its own file
(the file name is the word the user types) and registers one factory under that name; ``create_student`` parses
the spec, looks the family up and checks that what comes back is a classifier of the promised shape. The
families are imported one by one in ``compressor/students/__init__.py``; nothing registers by ``import *``.

A spec is ``family`` or ``family:args``, e.g. ``mlp``, ``mlp:800x800``, ``cnn:16x32``, ``from-teacher:0.25``;
what ``args`` means is up to the family.
"""

from __future__ import annotations

import difflib
import math
from typing import Callable, Protocol

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.core.inputs import call


class StudentFactory(Protocol):
    def __call__(self, args: str | None, input_shape: tuple[int, ...], num_classes: int, **context) -> nn.Module: ...


# name → factory. Written only by @register_student when a family module is imported; read by everything else.
_FACTORIES: dict[str, StudentFactory] = {}
# name → the model names a library family can build (timm's, torchvision's), asked for only when listed
_CATALOGUES: dict[str, Callable[[], list[str]]] = {}


def register_student(name: str, catalogue: Callable[[], list[str]] | None = None
                     ) -> Callable[[StudentFactory], StudentFactory]:
    """Decorator: register ``factory(args, input_shape, num_classes, **context) -> nn.Module`` as family ``name``.

    ``args`` is the text after the first ``:`` of the spec (None when there is none); ``input_shape`` excludes the
    batch axis, e.g. (1, 28, 28) or (64,); ``context`` carries optional extras such as ``teacher_architecture``
    that a family may use or ignore. A name may be registered once; a second registration raises ValueError.
    ``catalogue()`` lists the model names a family wrapping a library accepts after the ``:`` (``compress students``).

        @register_student("mlp")
        def mlp(args, input_shape, num_classes, **context): ...
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip().lower():
        raise ValueError(f"student family name {name!r} must be a non-empty lower-case string without ':'")

    def decorator(factory: StudentFactory) -> StudentFactory:
        if name in _FACTORIES:
            raise ValueError(f"student family {name!r} is already registered (by {_FACTORIES[name].__module__})")
        _FACTORIES[name] = factory
        if catalogue is not None:
            _CATALOGUES[name] = catalogue
        return factory

    return decorator


def list_students() -> list[str]:
    """The registered family names, sorted, e.g. ``['cnn', 'from-teacher', 'mlp']``."""
    return sorted(_FACTORIES)


def student_catalogue(family: str) -> list[str] | None:
    """The model names ``family`` accepts (a library family's), or None for a family with its own spec syntax.
    Raises CompressorError when the library is not installed."""
    return _CATALOGUES[family]() if family in _CATALOGUES else None


def create_student(spec: str, input_shape: tuple[int, ...], num_classes: int,
                   teacher_architecture: list[dict] | None = None, teacher_config: dict | None = None,
                   example=None) -> nn.Module:
    """Build the student ``spec`` for inputs (N, *input_shape) and ``num_classes`` classes.

    The module comes back freshly initialised (seed torch first for a reproducible one), float32, in train mode,
    mapping (N, *input_shape) float32 to (N, num_classes) logits. ``teacher_architecture`` is a member's
    description from ``describe_architecture`` (needed by ``from-teacher`` only), ``teacher_config`` the teachers'
    Hugging Face config dict (``hf:teacher``), and ``example`` a batch of 2 to check the student on where zeros of
    ``input_shape`` will not do (named int64 inputs, :class:`~compressor.core.inputs.NamedInputs`). Bad specs raise
    CompressorError naming the spec and the valid forms.

        create_student("mlp:800x800", (1, 8, 8), 10)
        create_student("from-teacher:0.25", (1, 28, 28), 10, teacher_architecture=member.architecture)
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CompressorError(f"--student {spec!r} is not a student spec; use FAMILY or FAMILY:ARGS with FAMILY one of "
                              f"{', '.join(list_students())} (e.g. mlp:800x800)")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or min(input_shape) < 1 or int(num_classes) < 1:
        raise CompressorError(f"--student {spec}: cannot build a student for input shape {input_shape} and "
                              f"{num_classes} classes; the data must have at least one feature and one class")
    family, sep, args = spec.strip().partition(":")
    family = family.strip().lower()
    if family not in _FACTORIES:
        close = difflib.get_close_matches(family, list_students(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CompressorError(f"--student {spec}: unknown student family {family!r}{hint}; "
                              f"the registered families are {', '.join(list_students())}")
    model = _FACTORIES[family](args.strip() if sep else None, input_shape, int(num_classes),
                               teacher_architecture=teacher_architecture, teacher_config=teacher_config)
    model = model.float().train()
    _check_output(model, spec, input_shape, int(num_classes), example)
    return model


def _check_output(model: nn.Module, spec: str, input_shape: tuple[int, ...], num_classes: int, example) -> None:
    """One dummy forward to hold every factory to the contract."""
    batch = torch.zeros(2, *input_shape) if example is None else example[:2]
    check_student_runs(model, spec, batch, num_classes, f"inputs of shape (N, {', '.join(map(str, input_shape))})")


def check_student_runs(model: nn.Module, spec: str, batch, num_classes: int, rows: str) -> None:
    """Run ``model`` once in eval mode (no running statistics touched) on ``batch`` (B, ...), a tensor or named
    inputs, described in words by ``rows``, and hold it to the contract: finite (B, ``num_classes``) logits. The
    main job asks again on real rows of the data (the longest, the largest ids) before the teachers run."""
    model.eval()
    try:
        with torch.no_grad():
            logits = call(model, batch)  # (B, C)
    except Exception as exc:  # a factory bug or a family that cannot serve these inputs
        raise CompressorError(f"--student {spec}: the student does not run on {rows} ({type(exc).__name__}: "
                              f"{first_line(exc)}); choose another student") from exc
    finally:
        model.train()
    n = len(batch)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (n, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CompressorError(f"--student {spec}: the student returns {shape} for a batch of {n}, not ({n}, "
                              f"{num_classes}); a student must map (N, ...) inputs to (N, classes) logits")
    if not bool(torch.isfinite(logits).all()):
        raise CompressorError(f"--student {spec}: the student returns non-finite logits on {rows}; check "
                              f"--student-weights (or its initialisation)")


def parse_widths(family: str, args: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    """``"800x800"`` → (800, 800); None → ``default``. Anything else raises CompressorError naming the spec."""
    if args is None:
        return default
    parts = args.lower().split("x")
    if all(p.strip().isdecimal() and int(p) > 0 for p in parts):
        return tuple(int(p) for p in parts)
    example = "x".join(map(str, default))
    raise CompressorError(f"--student {family}:{args}: {args!r} is not a list of positive widths; use {family} "
                          f"(= {family}:{example}) or {family}:WxWx... with whole numbers, e.g. {family}:{example}")


def scaled(width: int, scale: float) -> int:
    """``width × scale`` rounded half up, at least 1: 800 × 0.25 → 200, 3 × 0.25 → 1."""
    return max(1, math.floor(width * scale + 0.5))
