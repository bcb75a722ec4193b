"""targets: export a trained student, check it against PyTorch, measure it, and bundle it for serving.

``targets`` never imports the training code. ``load_bundle`` needs only numpy and onnxruntime,
so the public names are resolved on first use (PEP 562) instead of importing torch here.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "load_bundle": "targets.bundle",
    "write_bundle": "targets.bundle",
    "get_target": "targets.base",
    "list_targets": "targets.base",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'targets' has no attribute {name!r}")
