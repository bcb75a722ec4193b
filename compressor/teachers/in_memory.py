"""Teachers handed over as ``nn.Module``s (``compressor.compress([net_a, net_b], data)``): an :class:`Ensemble`
built in memory, nothing saved or scripted, identified by a hash of the members' weights so the teacher cache and
``--resume`` key them as they key a file. A transformers classifier is wrapped to return its logits, and its config
recorded as an archive records it (``--student hf:teacher/SCALE`` copies it)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from compressor.core.errors import TeacherError
from compressor.core.inference import parameter_count
from compressor.students import describe_architecture
from compressor.students.hf import HFClassifier, is_hf_model
from compressor.teachers.ensemble import Ensemble, Member

IN_MEMORY = "in-memory modules"
LABEL = Path("in-memory teachers")  # what messages name, where a file's path would be


def ensemble_from_modules(models: Sequence[nn.Module], metadata: dict | None = None) -> Ensemble:
    """An ensemble of ``models`` (each (N, ...) → (N, C) logits, or a transformers classifier) in eval mode.

    ``metadata`` may hold what :func:`~compressor.teachers.save_ensemble` takes (``class_names``, ``weights``,
    ``member_names``, ``combine``); the input shape and class count come from the data when it is first run.
    Members with named inputs take them as the data yields them, positionally in its order."""
    models = list(models)
    metadata = dict(metadata or {})
    if not models or not all(isinstance(m, nn.Module) for m in models):
        kinds = ", ".join(sorted({type(m).__name__ for m in models})) or "nothing"
        raise TeacherError(f"teachers: give a list of torch.nn.Modules (got {kinds}), an ensemble file or an "
                              f"Ensemble")
    names = metadata.pop("member_names", None) or [f"member-{k}" for k in range(len(models))]
    weights = metadata.pop("weights", None)
    if len(names) != len(models) or (weights is not None and len(weights) != len(models)):
        raise TeacherError(f"teachers: {len(models)} models but {len(names)} member_names / "
                              f"{len(weights or models)} weights")
    hf_config = next((m.config.to_dict() for m in models if is_hf_model(m)), None)
    members = []
    for name, model in zip(names, models):
        module = (HFClassifier(model) if is_hf_model(model) else model).eval()
        members.append(Member(name, "module", "in memory", module, parameter_count(module),
                              describe_architecture(module)))
    meta = {"class_names": metadata.get("class_names"), "num_classes": None, "normalisation": None,
            "combine": metadata.get("combine", "arithmetic"), "takes_data_inputs": True}
    if hf_config is not None:
        meta.update(hf_config=hf_config, vocab_size=hf_config.get("vocab_size"),
                    max_length=hf_config.get("max_position_embeddings"))
    ensemble = Ensemble(LABEL, IN_MEMORY, members, weights, meta["combine"], meta)
    ensemble._digest = weights_digest(models, meta)
    return ensemble


def weights_digest(models: Sequence[nn.Module], metadata: dict) -> str:
    """sha256 over every member's class, parameter and buffer names, shapes, dtypes and bytes, and ``metadata``:
    what keys in-memory teachers in the teacher cache and checkpoints (the same weights hash the same)."""
    digest = hashlib.sha256(repr(sorted((k, str(v)) for k, v in metadata.items())).encode())
    for model in models:
        digest.update(type(model).__qualname__.encode())
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}\0{list(tensor.shape)}\0{tensor.dtype}\0".encode())
            array = tensor.detach().cpu()
            if array.dtype == torch.bfloat16:
                array = array.float()
            digest.update(np.ascontiguousarray(array.numpy()).data)
    return digest.hexdigest()
