"""``--student-weights FILE.safetensors``: initialise a student from local weights (no download, no unpickling):
every tensor whose name and shape match the student's is loaded; the rest (a classifier head for another number
of classes, say) keeps its fresh initialisation, and the counts are reported."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line


def load_student_weights(model: nn.Module, path: Path) -> dict:
    """Copy the matching tensors of ``path`` into ``model`` in place; return what was loaded and what was not."""
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise CompressorError("--student-weights needs the safetensors package (pip install safetensors)") from exc
    path = Path(path)
    if not path.is_file():
        raise CompressorError(f"--student-weights {path}: no such file; give a .safetensors file of the student's "
                              f"weights")
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a corrupt or foreign file
        raise CompressorError(f"--student-weights {path}: not a readable safetensors file ({first_line(exc)}); save "
                              f"it with safetensors.torch.save_file(model.state_dict(), path)") from exc
    prefix = getattr(model, "weights_prefix", "")  # a wrapper's prefix (hf: a save_pretrained file lacks "model.")
    if prefix and not any(name.startswith(prefix) for name in saved):
        saved = {prefix + name: tensor for name, tensor in saved.items()}
    own = model.state_dict()
    matching = {name: tensor for name, tensor in saved.items() if name in own and own[name].shape == tensor.shape}
    if not matching:
        raise CompressorError(f"--student-weights {path}: none of its {len(saved)} tensors matches a tensor of the "
                              f"student by name and shape; were they saved from this --student?")
    with torch.no_grad():
        for name, tensor in matching.items():
            own[name].copy_(tensor.to(own[name].dtype))
    mismatched = sorted(name for name in saved if name in own and name not in matching)
    return {"file": str(path), "loaded": len(matching), "of_student": len(own), "of_file": len(saved),
            "shape_mismatch": mismatched[:10], "missing_from_file": sorted(set(own) - set(saved))[:10]}
