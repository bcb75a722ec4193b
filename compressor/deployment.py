"""The main job's deployment steps (5 to 7 of ``compressor.pipeline``): save the student, export it and check
parity, export the ensemble to the same target, score and time every row, assemble the report and the bundle.

Split out of ``pipeline.py`` so that file stays a table of contents; like ``compressor.compare`` it is part of the
pipeline, where the training package meets ``targets``.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compressor import __version__
from compressor.compare import EAGER, eager_device, ensemble_rows, headline, paired_bootstrap, student_rows, verdict
from compressor.config import RunConfig
from compressor.data import Dataset
from compressor.distill import predict_logits
from compressor.errors import CompressorError
from compressor.fileio import atomic_path
from compressor.specialist_training import score_specialists
from compressor.student_training import TrainedBaseline
from compressor.teachers import Ensemble
from compressor.transfer import Tensors
from targets.base import TARGETS, Artifact, get_target
from targets.benchmark import sweep
from targets.bundle import write_bundle
from targets.cuda_timing import cuda_device_name
from targets.pareto import plot_pareto
from targets.parity import check_parity

REPORT_SCHEMA_VERSION = 2
PARITY_ROWS = 2000          # held-out rows compared between PyTorch and the export
BENCHMARK_POOL = 512        # distinct test inputs cycled through by the latency harness
CALIBRATION_ROWS = 512      # transfer-set rows that calibrate int8 activation ranges


def export_student(student: torch.nn.Module, tensors: Tensors, config: RunConfig):
    """Export the trained student to ``<out>/export`` at the run's precision (int8 calibrated on transfer-set rows),
    load it on the target and check it against PyTorch: returns (artifact, runner, parity)."""
    target = get_target(config.target)
    options = export_options(config)
    if config.precision == "int8":
        options["calibration"] = tensors.x_train[:CALIBRATION_ROWS].numpy()
    artifact = target.export(student, tensors.x_test[:2], config.output_dir() / "export", config.precision, **options)
    runner = target.load(artifact, threads=config.threads, **runner_options(config))
    return artifact, runner, check_student_parity(student, runner, tensors, config)


def save_student(student: torch.nn.Module, example: torch.Tensor, path: Path, config: RunConfig) -> Path:
    """Write the trained student as TorchScript (loadable without unpickling), atomically."""
    student.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript deprecation: still the safest single-file module format
        scripted = torch.jit.trace(student, example)
        meta = json.dumps({"student": config.student, "input_shape": list(example.shape[1:])})
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, str(tmp), _extra_files={"student.json": meta})
    return path


def check_student_parity(student, runner, tensors: Tensors, config: RunConfig):
    """Compare the export with the PyTorch student on held-out inputs under the precision's gate."""
    x = tensors.x_test[:PARITY_ROWS]
    reference = predict_logits(student, x).numpy()
    candidate = runner.infer(x.numpy())
    return check_parity(reference, candidate, config.precision, labels=tensors.y_test[:PARITY_ROWS].numpy(),
                        max_accuracy_drop=config.max_accuracy_drop)


def export_ensemble(ensemble: Ensemble, target, tensors: Tensors, teacher_test: torch.Tensor, config: RunConfig,
                    console: Console):
    """Export the whole ensemble to the same target, so the report can separate distillation from the backend.

    Returns (runner, summary) or (None, summary with the reason) when the ensemble cannot be exported; the run
    goes on either way, because the student is the deliverable and this row is a comparison.
    """
    example = tensors.x_test[:2]
    try:
        with console.status(f"exporting the ensemble to {config.target} for a like-for-like comparison"):
            artifact = target.export(ensemble.as_module(example), example, config.output_dir() / "ensemble-export",
                                     "fp32", **export_options(config))
            runner = target.load(artifact, threads=config.threads, **runner_options(config))
    except CompressorError as exc:
        return None, {"exported": False, "reason": str(exc)}
    x = tensors.x_test[:PARITY_ROWS]
    reference = ensemble.log_probs(teacher_test[:, :PARITY_ROWS]).numpy()
    parity = check_parity(reference, runner.infer(x.numpy()), "fp32")
    summary = {"exported": True, "artifact": artifact.to_dict(), "parity": parity.to_dict()}
    return (runner if parity.passed else None), summary


def runner_options(config: RunConfig) -> dict:
    """Keyword arguments for the target's ``load`` beyond threads: ONNX Runtime's execution provider."""
    return {"provider": config.ort_provider} if config.target in ("onnx", "onnxruntime") else {}


def export_options(config: RunConfig) -> dict:
    """Keyword arguments for the target's ``export`` beyond precision: a GPU engine's optimisation profile is chosen
    from the batch sizes the benchmark will send (``--batch-sizes``), so none of them is split or untuned."""
    return {"batch_sizes": tuple(config.batch_sizes)} if TARGETS[config.target].needs_gpu else {}


def benchmark_and_report(config, ensemble, dataset, tensors, teacher_test, student, runner, artifact, parity,
                         diagnostics, training, normalisation, console, ensemble_runner=None,
                         ensemble_export=None, baseline: TrainedBaseline | None = None,
                         from_generalist: TrainedBaseline | None = None) -> dict:
    """Score and time every row (compressor.compare) on the test split, draw pareto.png, and assemble the report."""
    x_test, y_test = tensors.x_test.numpy(), tensors.y_test.numpy()
    pool = x_test[:BENCHMARK_POOL]
    device = eager_device(ensemble)
    rows = ensemble_rows(ensemble, teacher_test, pool, device, config.target, ensemble_runner, x_test)
    if baseline is not None:
        rows += student_rows("baseline", baseline.model, predict_logits(baseline.model, tensors.x_test).numpy(),
                             pool, device)
    if from_generalist is not None:
        rows += student_rows("generalist-student", from_generalist.model,
                             predict_logits(from_generalist.model, tensors.x_test).numpy(), pool, device,
                             label="student from generalist")
    targets_ = [(runner, config.precision)]
    if "fp32_model" in artifact.files:  # a reduced-precision export: its fp32 graph shows what the precision buys
        fp32 = get_target(config.target).load(Artifact(config.target, "fp32", {"model": artifact.files["fp32_model"]},
                                                       artifact.inputs, artifact.outputs), threads=config.threads,
                                                       **runner_options(config))
        targets_.insert(0, (fp32, "fp32"))
    rows += student_rows("student", student, predict_logits(student, tensors.x_test).numpy(), pool, device,
                         config.target, targets_, x_test)

    reference = rows[0].scores
    measured = [row.describe(y_test, reference) for row in rows]
    gain = verdict(rows, y_test, config.seed)
    total = len(rows) * len(config.batch_sizes) * config.rounds
    with progress_bar(config.progress) as progress:
        task = progress.add_task("benchmark", total=total)

        def step(row, batch, round_):
            progress.update(task, completed=round_ * len(rows) * len(config.batch_sizes)
                            + row * len(config.batch_sizes) + config.batch_sizes.index(batch),
                            description=f"benchmark {rows[row].model} on {rows[row].backend}, batch {batch}, "
                                        f"round {round_ + 1}/{config.rounds}")
        latencies = sweep([row.measure for row in rows], config.batch_sizes, config.warmup_s, config.duration_s,
                          config.rounds, step)
        progress.update(task, completed=total, description="benchmark")
    for entry, latency in zip(measured, latencies):
        entry["latency"] = latency

    warnings_ = list(diagnostics.get("warnings", []))
    if ensemble_export and not ensemble_export["exported"]:
        warnings_.append(f"the ensemble was not run on {config.target} ({ensemble_export['reason']}), so the "
                         f"headline compares with the ensemble in PyTorch eager only")
    elif ensemble_export and not ensemble_export["parity"]["passed"]:
        warnings_.append(f"the ensemble's {config.target} export failed its parity check "
                         f"({'; '.join(ensemble_export['parity']['failures'])}); its row is left out")
    warnings_ += timing_warnings(measured, config.rounds) + precision_warnings(measured, config.target,
                                                                              config.precision)
    if gain is not None and not gain["measurable"]:
        warnings_.append(f"the same-budget hard-label baseline ({gain['baseline_top1']:.2%}) is within the noise of "
                         f"the ensemble ({gain['ensemble_top1']:.2%}) on {gain['examples']:,} test rows: there is "
                         f"no measurable gain for distillation to keep (a stronger ensemble, or more test data to "
                         f"tell the two apart, would change that)")
    try:
        pareto = plot_pareto(measured, config.output_dir() / "pareto.png",
                             title=f"{dataset.name}: test accuracy against batch-1 latency")
    except ImportError:  # a GPU image without the CPU set-up's plotting dependency
        pareto = None
        warnings_.append("pareto.png was not drawn: matplotlib is not installed (pip install matplotlib)")
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": config.command,
        "config": config.to_dict(),
        "environment": environment(config),
        "seed": config.seed,
        "teacher": ensemble.describe(),
        "data": {**dataset.describe(), "normalisation": normalisation},
        "diagnostics": diagnostics,
        "student": {"spec": config.student, "parameters": _parameters(student), "training": training.to_dict()},
        "baseline": None if baseline is None else {"spec": config.student, "loss": "hard-label cross-entropy",
                                                   "training": baseline.training.to_dict()},
        "specialists": None if from_generalist is None else specialist_summary(
            ensemble, teacher_test, rows, y_test, from_generalist, config.seed),
        "export": artifact.to_dict(),
        "runner": {"name": runner.name, **runner.info},
        "parity": parity.to_dict(),
        "ensemble_export": ensemble_export,
        "benchmark": {"device": device, "batch_sizes": list(config.batch_sizes), "warmup_s": config.warmup_s,
                      "duration_s": config.duration_s, "rounds": config.rounds, "pool": len(pool),
                      "split": "test", "examples": len(x_test)},
        "rows": measured,
        "pareto": None if pareto is None else pareto.name,
        "verdict": gain,
        "headline": headline(measured, config.target, training, config.epochs, config.precision, gain,
                             diagnostics.get("warnings")),
        "warnings": warnings_,
    }


def specialist_summary(ensemble: Ensemble, teacher_test: torch.Tensor, rows: list, y_test: np.ndarray,
                       from_generalist: TrainedBaseline, seed: int) -> dict:
    """A specialist ensemble's section of the report: the generalist against the specialist ensemble on the test
    split (overall, on the specialists' classes, by specialists active), and the student distilled from it against
    the student distilled from the generalist alone, with a paired bootstrap 95% interval of the difference."""
    eager = {row.kind: row.scores for row in rows if row.backend == EAGER}
    labelled = y_test >= 0
    right = {kind: eager[kind][labelled].argmax(1) == y_test[labelled] for kind in ("student", "generalist-student")}
    difference = right["student"].astype(float) - right["generalist-student"].astype(float)  # (n,)
    return {"subsets": ensemble.metadata["specialists"].get("subset_names"),
            "test": score_specialists(ensemble, teacher_test, y_test, seed),
            "student_from_specialists_top1": float(right["student"].mean()),
            "student_from_generalist_top1": float(right["generalist-student"].mean()),
            "student_difference": float(difference.mean()),
            "student_difference_interval_95": list(paired_bootstrap(difference, seed)),
            "generalist_student_training": from_generalist.training.to_dict()}


def timing_warnings(rows: list[dict], rounds: int) -> list[str]:
    """Plain-word warnings for figures not to trust: rounds that disagree by over 10%, spread above 2.5%."""
    figures = [(f"{row['model']} on {row['backend']} batch {batch}", stats)
               for row in rows for batch, stats in row["latency"].items()]
    warnings_ = []
    unstable = [(name, stats["round_spread"]) for name, stats in figures if stats.get("unstable")]
    if unstable:
        name, spread = max(unstable, key=lambda item: item[1])
        warnings_.append(f"the {rounds} back-to-back timing rounds disagree by more than 10% for {len(unstable)} of "
                         f"{len(figures)} figures (worst: {name}, {spread:.0%}): the machine was busy or changed "
                         f"speed during the run (another process competing for the cores, frequency scaling); "
                         f"rerun on an idle machine before trusting those figures (report.md marks them ⚠)")
    noisy = [(name, stats["cv"]) for name, stats in figures if stats["noisy"]]
    if noisy:
        name, cv = max(noisy, key=lambda item: item[1])
        warnings_.append(f"{len(noisy)} of {len(figures)} figures have a coefficient of variation above 2.5% (worst: "
                         f"{name}, {cv:.0%}): sub-millisecond calls see rare long outliers (interrupts, other "
                         f"processes); the medians quoted are robust to them, the means and p99s are not")
    return warnings_


def precision_warnings(rows: list[dict], target: str, precision: str) -> list[str]:
    """Say plainly when the reduced-precision export is slower than the fp32 graph on the same target."""
    on_target = {row["precision"]: row for row in rows if row["kind"] == "student" and row["backend"] == target}
    if precision == "fp32" or "fp32" not in on_target or precision not in on_target:
        return []
    fp32, reduced = on_target["fp32"]["latency"], on_target[precision]["latency"]
    slower = [f"batch {batch} ({reduced[batch]['median_ms']:.3f} vs {fp32[batch]['median_ms']:.3f} ms)"
              for batch in reduced if reduced[batch]["median_ms"] > fp32[batch]["median_ms"]]
    if not slower:
        return []
    cause = ("quantize/dequantize around small matrix products costs more than int8 arithmetic saves"
             if precision == "int8" else "this execution provider has no fast fp16 kernels, so it computes in fp32 "
             "between casts")
    return [f"the {precision} export is SLOWER than the fp32 graph on {target} at {', '.join(slower)}: likely, "
            f"{cause}; prefer --precision fp32 for those batch sizes"]


def write_student_bundle(artifact, dataset: Dataset, ensemble: Ensemble, normalisation: dict | None,
                         config: RunConfig, out_dir: Path) -> Path:
    """Write ``bundle/``: the model file and the metadata a service needs to reproduce our preprocessing."""
    spec_in, spec_out = artifact.inputs[0], artifact.outputs[0]
    metadata = {
        "input": {"name": spec_in.name, "shape": [d for d in spec_in.shape if d != "batch"], "dtype": spec_in.dtype},
        "output": {"name": spec_out.name, "shape": [d for d in spec_out.shape if d != "batch"],
                   "dtype": spec_out.dtype},
        "preprocessing": dataset.preprocessing,
        "normalisation": normalisation,
        "class_names": ensemble.class_names or dataset.class_names,
        "precision": config.precision,
        "target": config.target,
        "student": config.student,
        "versions": environment(config)["versions"],
    }
    return write_bundle(Path(artifact.files["model"]), metadata, out_dir / "bundle")


def environment(config: RunConfig) -> dict:
    """Versions, device and threads: what a reader needs to reproduce the figures."""
    import onnx
    import onnxruntime

    return {
        "versions": {"compressor": __version__, "python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": cuda_device_name(),
        "torch_threads": torch.get_num_threads(),
    }


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (hidden with --no-progress) for the steps that take long."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False)
