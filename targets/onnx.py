"""``--target onnx``: the student as one self-contained fp32 ONNX file with a dynamic batch axis, run with ONNX
Runtime. fp32 only, so the file stays portable to any runtime; fp16 and int8 are ``--target onnxruntime``'s, which
converts this same export with ONNX Runtime's tools (``targets.quantize``). The export itself is
``targets.onnx_export``, shared by every ONNX-based target.
"""

from __future__ import annotations

from pathlib import Path

from targets.base import Artifact, Runner
from targets.onnx_export import export_onnx
from targets.onnxruntime import load as ort_load


def export(model, example_input, out_dir: Path, precision: str = "fp32") -> Artifact:
    """Export ``model`` (in eval mode) to ``out_dir/model.onnx``: input "input" (N, ...), output "logits" (N, C).

    ``example_input`` is one real batch, e.g. (2, 1, 8, 8) float32; its batch size does not matter, the batch
    axis is dynamic. The file is checked with ``onnx.checker`` before it is renamed into place. Metadata records
    the opset, the exporter, torch/onnx/onnxscript versions, export seconds and file bytes.
    """
    return export_onnx(model, example_input, out_dir, precision, target="onnx")


def load(artifact: Artifact, threads: int | None = None, provider: str = "auto") -> Runner:
    """Run the ONNX file with ONNX Runtime on ``provider`` (see ``targets.onnxruntime.OrtRunner``)."""
    return ort_load(artifact, threads=threads, provider=provider)
