"""compressor: distil a teacher ensemble into a compact student (Hinton, Vinyals, Dean 2015).

The public names are resolved on first use (PEP 562) so that ``import compressor.core.errors``
stays free of torch: a serving process that loads a bundle needs only numpy and onnxruntime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "compress": "compressor.api",
    "choose_student": "compressor.steps",
    "distill": "compressor.steps",
    "export": "compressor.steps",
    "benchmark": "compressor.steps",
    "Result": "compressor.api",
    "Data": "compressor.data.torch_data",
    "save_ensemble": "compressor.teachers",
    "load_ensemble": "compressor.teachers",
    "Ensemble": "compressor.teachers",
    "CompressorError": "compressor.core.errors",
    "OptionError": "compressor.core.errors",
    "TeacherError": "compressor.core.errors",
    "ParityError": "compressor.core.errors",
    "DataError": "compressor.core.errors",
    "DataShapeError": "compressor.core.errors",
    "LabelError": "compressor.core.errors",
    "EmptySplitError": "compressor.core.errors",
    "MissingCapabilityError": "compressor.core.errors",
    "create_student": "compressor.students",
    "list_students": "compressor.students",
    "register_student": "compressor.students",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
