"""The main job's steps 5 and 6: save the student as TorchScript, export it to the target and check its parity
with PyTorch, export the whole ensemble to the same target for a like-for-like comparison, and write the bundle a
service embeds. Part of the pipeline layer, where the training side meets ``targets``."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_path
from compressor.core.inference import predict_logits
from compressor.core.inputs import NamedInputs, example_of, trace_args
from compressor.training.context import RunContext
from targets.base import TARGETS, Artifact, get_target
from targets.bundle import write_bundle
from targets.parity import ParityResult, check_parity

PARITY_ROWS = 2000          # held-out rows compared between PyTorch and the export
CALIBRATION_ROWS = 512      # transfer-set rows that calibrate int8 activation ranges


@dataclass
class Exported:
    """What steps 5 and 6 produced: the student's artifact, its runner and parity; the ensemble's runner on the
    target (None when it could not be exported or failed parity) and the summary of that export."""

    artifact: Artifact
    runner: object
    parity: ParityResult
    ensemble_runner: object
    ensemble_export: dict
    member_runner: object = None     # the best single member on the target (None when it could not be exported)
    member_export: dict | None = None


def export_all(ctx: RunContext, student: torch.nn.Module) -> Exported:
    """Export the student (checking parity), the ensemble and its best single member to ``--target``."""
    artifact, runner, parity = export_student(ctx, student)
    ensemble_runner, ensemble_export = export_ensemble(ctx)
    member_runner, member_export = export_best_member(ctx)
    return Exported(artifact, runner, parity, ensemble_runner, ensemble_export, member_runner, member_export)


def export_student(ctx: RunContext, student: torch.nn.Module):
    """Export the trained student to ``<out>/export`` at the run's precision (int8 calibrated on transfer-set rows),
    load it on the target and check it against PyTorch: returns (artifact, runner, parity)."""
    config, tensors = ctx.config, ctx.tensors
    target = get_target(config.target)
    options = export_options(ctx)
    if config.precision == "int8":
        options["calibration"] = tensors.x_train[:CALIBRATION_ROWS].numpy()
    artifact = target.export(student, example_of(tensors.x_test), config.output_dir() / "export", config.precision,
                             **options)
    runner = target.load(artifact, threads=config.threads, **runner_options(config))
    x = tensors.x_test[:PARITY_ROWS]
    parity = check_parity(predict_logits(student, x).numpy(), runner.infer(x.numpy()), config.precision,
                          labels=tensors.y_test[:PARITY_ROWS].numpy(), max_accuracy_drop=config.max_accuracy_drop)
    return artifact, runner, parity


def save_student(student: torch.nn.Module, example, path: Path, config: RunConfig) -> Path:
    """Write the trained student as TorchScript (loadable without unpickling), atomically; a student of named
    inputs takes them positionally, in the order ``student.json`` lists."""
    student.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation: still the safest single-file module format
        scripted = torch.jit.trace(student, trace_args(example))
        shape = {"inputs": example.describe()} if isinstance(example, NamedInputs) else {
            "input_shape": list(example.shape[1:])}
        meta = json.dumps({"student": config.student, **shape})
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={"student.json": meta})
    return path


def export_ensemble(ctx: RunContext):
    """Export the whole ensemble to the same target, so the report can separate distillation from the backend.

    Returns (runner, summary) or (None, summary with the reason) when the ensemble cannot be exported; the run
    goes on either way, because the student is the deliverable and this row is a comparison.
    """
    config, tensors, ensemble = ctx.config, ctx.tensors, ctx.ensemble
    target = get_target(config.target)
    example = example_of(tensors.x_test)
    try:
        with ctx.console.status(f"exporting the ensemble to {config.target} for a like-for-like comparison"):
            artifact = target.export(ensemble.as_module(example), example, config.output_dir() / "ensemble-export",
                                     "fp32", **export_options(ctx))
            runner = target.load(artifact, threads=config.threads, **runner_options(config))
    except CompressorError as exc:
        return None, {"exported": False, "reason": str(exc)}
    x = tensors.x_test[:PARITY_ROWS]
    reference = ensemble.log_probs(ctx.teacher.test[:, :PARITY_ROWS]).numpy()
    parity = check_parity(reference, runner.infer(x.numpy()), "fp32")
    summary = {"exported": True, "artifact": artifact.to_dict(), "parity": parity.to_dict()}
    return (runner if parity.passed else None), summary


def best_member(ctx: RunContext) -> tuple[int, float] | None:
    """The member with the best validation top-1, and that accuracy: what a deployer would ship instead of the
    student. None for a specialist ensemble (its members are not standalone classifiers) or without labels."""
    labelled = ctx.tensors.y_val >= 0
    if ctx.ensemble.specialist_subsets is not None or not bool(labelled.any()):
        return None
    hits = ctx.teacher.val[:, labelled].argmax(-1) == ctx.tensors.y_val[labelled]  # (K, n)
    accuracy = hits.double().mean(1)  # (K,)
    return int(accuracy.argmax()), float(accuracy.max())


def export_best_member(ctx: RunContext):
    """The best single member exported to the target (fp32, parity-checked against its PyTorch logits), so the
    report answers the deployer's question: does the student beat shipping that member alone? Returns (runner,
    summary), or (None, summary with the reason)."""
    chosen = best_member(ctx)
    if chosen is None:
        return None, None
    k, val_accuracy = chosen
    member, config = ctx.ensemble.members[k], ctx.config
    summary = {"member": member.name, "val_accuracy": val_accuracy, "exported": False}
    if not isinstance(member.forward, torch.nn.Module):
        return None, {**summary, "reason": f"member {member.name} is an ONNX file run by onnxruntime, not exported"}
    example = example_of(ctx.tensors.x_test)
    try:
        with ctx.console.status(f"exporting the best member ({member.name}) to {config.target}"):
            artifact = get_target(config.target).export(member.forward, example,
                                                        config.output_dir() / "member-export", "fp32",
                                                        **export_options(ctx))
            runner = get_target(config.target).load(artifact, threads=config.threads, **runner_options(config))
    except CompressorError as exc:
        return None, {**summary, "reason": str(exc)}
    x = ctx.tensors.x_test[:PARITY_ROWS]
    reference = (ctx.teacher.test[k, :PARITY_ROWS] * member.temperature).numpy()  # its raw logits
    parity = check_parity(reference, runner.infer(x.numpy()), "fp32")
    summary.update(exported=True, artifact=artifact.to_dict(), parity=parity.to_dict())
    return (runner if parity.passed else None), summary


def fp32_runner(config: RunConfig, artifact: Artifact):
    """For a reduced-precision export, a runner of the fp32 graph it was converted from (None for an fp32 export),
    so the report shows what the precision buys on the same target."""
    if "fp32_model" not in artifact.files:
        return None
    fp32 = Artifact(config.target, "fp32", {"model": artifact.files["fp32_model"]}, artifact.inputs, artifact.outputs)
    return get_target(config.target).load(fp32, threads=config.threads, **runner_options(config))


def runner_options(config: RunConfig) -> dict:
    """Keyword arguments for the target's ``load`` beyond threads: ONNX Runtime's execution provider."""
    return {"provider": config.ort_provider} if config.target in ("onnx", "onnxruntime") else {}


def export_options(ctx: RunContext) -> dict:
    """Keyword arguments for the target's ``export`` beyond precision: a GPU engine's optimisation profile is chosen
    from the batch sizes the benchmark will send (``--batch-sizes``), so none of them is split or untuned, and for
    a text model spans 1..the longest sequence, tuned for the length the benchmark sends."""
    config = ctx.config
    if not TARGETS[config.target].needs_gpu:
        return {}
    options: dict = {"batch_sizes": tuple(config.batch_sizes)}
    if ctx.dataset.named_inputs:
        options.update(max_sequence=longest_sequence(ctx), opt_sequence=sequence_length(ctx))
    return options


def sequence_length(ctx: RunContext) -> int | None:
    """The sequence length text rows are timed at (``--seq-len``, else the data's median), None for other data."""
    if not ctx.dataset.named_inputs:
        return None
    return ctx.config.seq_len or ctx.dataset.split_info.get("median_length") or int(
        ctx.tensors.x_train.lengths.median())


def longest_sequence(ctx: RunContext) -> int:
    """The longest input a text model is exported for: the teachers' limit (their position embeddings), else the
    data's longest row."""
    return int(ctx.ensemble.metadata.get("max_length") or ctx.dataset.split_info.get("max_length")
               or ctx.tensors.x_train.shape[1])


def text_metadata(ctx: RunContext) -> dict:
    """What a service must know to feed a text bundle: the longest input, the vocabulary, how rows are padded."""
    if not ctx.dataset.named_inputs:
        return {}
    return {"max_length": longest_sequence(ctx), "vocab_size": ctx.ensemble.metadata.get("vocab_size"),
            "padding": "right-padded with token id 0 and attention_mask 0; any length from 1 to max_length",
            "benchmark_sequence_length": sequence_length(ctx)}


def write_student_bundle(ctx: RunContext, artifact: Artifact, versions: dict) -> Path:
    """Write ``bundle/``: the model file and the metadata a service needs to reproduce our preprocessing."""
    config = ctx.config
    spec_out = artifact.outputs[0]
    inputs = [{"name": spec.name, "shape": [d for d in spec.shape if d != "batch"], "dtype": spec.dtype}
              for spec in artifact.inputs]
    metadata = {
        "input": inputs[0],
        "inputs": inputs,  # every model input in call order (a text model's input_ids, attention_mask, ...)
        "output": {"name": spec_out.name, "shape": [d for d in spec_out.shape if d != "batch"],
                   "dtype": spec_out.dtype},
        "preprocessing": ctx.dataset.preprocessing,
        "image": ctx.dataset.image_spec,  # how an image file becomes an input (Bundle.predict_images); None else
        "normalisation": ctx.normalisation,
        "class_names": ctx.ensemble.class_names or ctx.dataset.class_names,
        "precision": config.precision,
        "target": config.target,
        "student": config.student,
        "serving": {"batch_sizes": sorted(set(config.batch_sizes))},  # the Triton config's batching, as timed
        **text_metadata(ctx),
        "versions": versions,
    }
    return write_bundle(Path(artifact.files["model"]), metadata, config.output_dir() / "bundle")
