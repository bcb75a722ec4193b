"""Teachers with named inputs (text classifiers: ``input_ids``, ``attention_mask``, ...): how an archive
describes them, a random batch to validate them on, and the check that every member takes the same inputs."""

from __future__ import annotations

import torch

from compressor.core.errors import TeacherError
from compressor.core.inputs import NamedInputs
from compressor.teachers.ensemble import Ensemble, Member


def named_inputs_meta(example: dict, hf_config: dict | None, metadata: dict) -> dict:
    """The archive's description of named inputs: names and dtypes in call order, and the ids' limits."""
    config = hf_config or {}
    return {"input_shape": None,
            "inputs": [{"name": name, "dtype": str(t.dtype).replace("torch.", "")} for name, t in example.items()],
            "vocab_size": metadata.get("vocab_size", config.get("vocab_size")),
            "max_length": metadata.get("max_length", config.get("max_position_embeddings")),
            "hf_config": hf_config}


def random_named_inputs(inputs: list[dict], vocab_size: int | None, rows: int = 3, length: int = 8) -> NamedInputs:
    """A batch of named inputs to validate text teachers on: random ids below ``vocab_size``, a full attention
    mask, token type 0."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size or 2, (rows, length), generator=generator)
    fill = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    tensors = {spec["name"]: fill.get(spec["name"], torch.zeros_like(ids)) for spec in inputs}
    return NamedInputs(tensors, torch.full((rows,), length))


def member_input_names(member: Member) -> list[str] | None:
    """The input names a member declares: an ONNX graph's inputs, a traced module's forward arguments."""
    forward = member.forward
    if hasattr(forward, "input_names"):
        return list(forward.input_names)
    schema = getattr(getattr(forward, "forward", None), "schema", None)
    return [arg.name for arg in schema.arguments[1:]] if schema is not None else None


def check_member_inputs(ensemble: Ensemble) -> None:
    """Every member must take the ensemble's named inputs, in its order: one line naming the member that does not."""
    wanted = ensemble.input_names
    for member in ensemble.members:
        names = member_input_names(member)
        if names is not None and names != wanted:
            raise TeacherError(f"{ensemble.path}: member '{member.name}' ({member.source}) takes the inputs "
                                  f"{', '.join(names)} but the ensemble declares {', '.join(wanted)}; every member "
                                  f"must take the same named inputs in the same order")
