"""The main job, step by step: load teachers → diagnose → choose student → distill → export → parity → report.

``run(config)`` is the table of contents: one call per step, in order. It is the one place (with the CLI) where
the training package ``compressor`` and the deployment package ``targets`` meet. Every check that can fail on bad
input runs before ``--out`` is created, so a rejected run leaves nothing behind; every file is written atomically.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from compressor import __version__
from compressor.config import PRECISIONS, RunConfig
from compressor.data import Dataset, load_dataset
from compressor.diagnostics import diagnose
from compressor.distill import TrainConfig, TrainResult, predict_logits, train_student
from compressor.errors import CompressorError
from compressor.fileio import atomic_path
from compressor.losses import DistillationLoss
from compressor.students import create_student
from compressor.teachers import Ensemble, load_ensemble
from targets.base import check_target_available, get_target
from targets.benchmark import classification_metrics, measure_latency
from targets.bundle import apply_normalisation, write_bundle
from targets.parity import check_parity, enforce_parity
from targets.report import write_report

REPORT_SCHEMA_VERSION = 1
PARITY_ROWS = 2000          # held-out rows compared between PyTorch and the export
BENCHMARK_POOL = 512        # distinct test inputs cycled through by the latency harness


@dataclass
class Tensors:
    """The dataset's splits as torch tensors, normalised exactly as the bundle will normalise them."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def run(config: RunConfig, console: Console | None = None) -> dict:
    """Run the main job for ``config`` and return the report (also written to ``<out>/report.json``)."""
    console = console or Console(stderr=True)
    started = time.perf_counter()
    check_target_available(config.target)                        # no GPU, no TensorRT: stop before any work
    _check_config(config)
    out_dir = config.output_dir()
    _check_writable(out_dir)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    ensemble = load_ensemble(config.teacher, trust_pickle=config.trust_pickle)          # 1. teachers
    dataset, normalisation = load_data(config, ensemble)
    tensors = to_tensors(dataset, normalisation)
    ensemble.validate(tensors.x_val[:8], f"--data {dataset.source}")
    console.print(f"[bold]teachers[/] {len(ensemble.members)} members, {ensemble.parameters:,} parameters; "
                  f"[bold]data[/] {dataset.name} {len(dataset.train)}/{len(dataset.val)}/{len(dataset.test)}")
    with console.status(f"running {len(ensemble.members)} teachers once over train/val/test "
                        f"({len(tensors.x_train) + len(tensors.x_val) + len(tensors.x_test):,} inputs)"):
        teacher = {split: ensemble.member_logits(x) for split, x in   # (K, N, C) each, reused every epoch
                   (("train", tensors.x_train), ("val", tensors.x_val), ("test", tensors.x_test))}
    diagnostics = diagnose(ensemble, teacher["val"], tensors.y_val)                      # 2. diagnose
    for line in diagnostics["warnings"]:
        console.print(f"[yellow]warning:[/] {line}")

    student = choose_student(config, ensemble, dataset)                                 # 3. student
    out_dir.mkdir(parents=True, exist_ok=True)
    training = distill(config, ensemble, dataset, tensors, teacher["train"], student, normalisation, console)  # 4.
    save_student(student, tensors.x_test[:2], out_dir / "student.pt", config)

    target = get_target(config.target)                                                  # 5. export
    artifact = target.export(student, tensors.x_test[:2], out_dir / "export", config.precision)
    runner = target.load(artifact, threads=config.threads)
    parity = check_student_parity(student, runner, tensors, config)                      # 6. parity

    ensemble_runner, ensemble_export = export_ensemble(ensemble, target, tensors, teacher["test"], config, console)
    report = benchmark_and_report(config, ensemble, dataset, tensors, teacher["test"], student, runner,
                                  artifact, parity, diagnostics, training, normalisation, console,
                                  ensemble_runner, ensemble_export)  # 7.
    write_student_bundle(artifact, dataset, ensemble, normalisation, config, out_dir)
    report["seconds_total"] = round(time.perf_counter() - started, 2)
    write_report(report, out_dir)
    enforce_parity(parity, f"{config.target} {config.precision} export {artifact.files['model']}")
    return report


def load_data(config: RunConfig, ensemble: Ensemble) -> tuple[Dataset, dict | None]:
    """Load ``--data`` (or the ensemble's dataset hint) and decide the normalisation; check it fits the teachers."""
    spec = config.data or ensemble.metadata.get("dataset") or "digits"
    dataset = load_dataset(spec, seed=config.seed, max_train=config.max_train)
    if ensemble.input_shape and tuple(dataset.input_shape) != tuple(ensemble.input_shape):
        raise CompressorError(
            f"--data {spec} gives inputs of shape {list(dataset.input_shape)} but the teachers in {config.teacher} "
            f"expect {list(ensemble.input_shape)}; pass the data the teachers were trained on")
    classes = dataset.num_classes
    if classes is not None and ensemble.num_classes is not None and classes > ensemble.num_classes:
        raise CompressorError(
            f"--data {spec} has {classes} classes but the teachers in {config.teacher} predict "
            f"{ensemble.num_classes}; pass the data the teachers were trained on")
    normalisation = ensemble.normalisation
    if config.normalise is not None:
        normalisation = {"mean": list(config.normalise[0]), "std": list(config.normalise[1]), "source": "--normalise"}
    elif normalisation is not None:
        normalisation = {**normalisation, "source": f"ensemble metadata of {config.teacher}"}
    if normalisation is not None:
        channels = dataset.input_shape[0] if len(dataset.input_shape) > 1 else 1
        for key in ("mean", "std"):
            if len(normalisation[key]) not in (1, channels):
                raise CompressorError(f"normalisation {key} has {len(normalisation[key])} values for "
                                      f"{channels} input channels; give one value per channel")
        if any(s <= 0 for s in normalisation["std"]):
            raise CompressorError("normalisation std must be positive")
    return dataset, normalisation


def to_tensors(dataset: Dataset, normalisation: dict | None) -> Tensors:
    """Normalise every split with the bundle's own preprocessing function, then wrap them as tensors."""
    def prepare(split):
        return torch.from_numpy(apply_normalisation(split.x, normalisation)), torch.from_numpy(split.y)
    return Tensors(*prepare(dataset.train), *prepare(dataset.val), *prepare(dataset.test))


def choose_student(config: RunConfig, ensemble: Ensemble, dataset: Dataset) -> torch.nn.Module:
    """Build the ``--student`` spec for the ensemble's input shape and class count."""
    architecture = next((m.architecture for m in ensemble.members if m.architecture), None)
    return create_student(config.student, tuple(dataset.input_shape), ensemble.num_classes,
                          teacher_architecture=architecture)


def distill(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, teacher_train: torch.Tensor,
            student: torch.nn.Module, normalisation: dict | None, console: Console) -> TrainResult:
    """Train the student on the ensemble's soft targets at temperature T, mixed with the hard labels."""
    loss = DistillationLoss(temperature=config.temperature, alpha=config.alpha, combine=ensemble.combine,
                            weights=tuple(ensemble.weights) if ensemble.weights else None)
    fingerprint = {
        "teacher_sha256": ensemble.fingerprint(), "data_sha256": dataset.fingerprint(),
        "student": config.student, "temperature": config.temperature, "alpha": config.alpha,
        "normalisation": json.dumps(normalisation, sort_keys=True),
    }
    checkpoints = config.output_dir() / "checkpoints"
    if (checkpoints / "last.pt").exists() and not config.resume:
        console.print(f"[yellow]note:[/] {checkpoints / 'last.pt'} exists; starting over (pass --resume to continue it)")
    train_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                               weight_decay=config.weight_decay, seed=config.seed, progress=config.progress)
    return train_student(student, tensors.x_train, tensors.y_train, teacher_train, tensors.x_val, tensors.y_val,
                         loss, train_config, checkpoints, resume=config.resume, fingerprint=fingerprint)


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
    return check_parity(reference, candidate, config.precision, labels=tensors.y_test[:PARITY_ROWS].numpy())


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
                                     "fp32")
            runner = target.load(artifact, threads=config.threads)
    except CompressorError as exc:
        return None, {"exported": False, "reason": str(exc)}
    x = tensors.x_test[:PARITY_ROWS]
    reference = ensemble.log_probs(teacher_test[:, :PARITY_ROWS]).numpy()
    parity = check_parity(reference, runner.infer(x.numpy()), "fp32")
    summary = {"exported": True, "artifact": artifact.to_dict(), "parity": parity.to_dict()}
    return (runner if parity.passed else None), summary


def benchmark_and_report(config, ensemble, dataset, tensors, teacher_test, student, runner, artifact, parity,
                         diagnostics, training, normalisation, console, ensemble_runner=None,
                         ensemble_export=None) -> dict:
    """Accuracy and latency of the ensemble, the student in PyTorch and the student on the target, as one report."""
    x_test, y_test = tensors.x_test.numpy(), tensors.y_test.numpy()
    ensemble_scores = ensemble.log_probs(teacher_test).numpy()
    student.eval()

    @torch.no_grad()
    def ensemble_eager(x: np.ndarray):
        return ensemble.log_probs(ensemble.member_logits(torch.from_numpy(x)))

    @torch.no_grad()
    def student_eager(x: np.ndarray):
        return student(torch.from_numpy(x))

    rows = [("ensemble", "PyTorch eager", "fp32", ensemble.parameters, ensemble_scores, ensemble_eager)]
    if ensemble_runner is not None:
        rows.append(("ensemble", config.target, "fp32", ensemble.parameters, ensemble_runner.infer(x_test),
                     ensemble_runner.infer))
    rows += [
        ("student", "PyTorch eager", "fp32", _parameters(student), predict_logits(student, tensors.x_test).numpy(),
         student_eager),
        ("student", config.target, config.precision, _parameters(student), runner.infer(x_test), runner.infer),
    ]
    pool = x_test[:BENCHMARK_POOL]
    measured = []
    with console.status("benchmarking") as status:
        for model, backend, precision, params, scores, fn in rows:
            latency = {}
            for batch in config.batch_sizes:
                status.update(f"benchmarking {model} on {backend}, batch {batch}")
                latency[str(batch)] = measure_latency(fn, pool, batch, config.warmup_s, config.duration_s).to_dict()
            measured.append({"model": model, "backend": backend, "precision": precision, "parameters": params,
                             "accuracy": classification_metrics(scores, y_test, ensemble_scores),
                             "latency": latency})
    warnings_ = list(diagnostics.get("warnings", []))
    if ensemble_export and not ensemble_export["exported"]:
        warnings_.append(f"the ensemble was not run on {config.target} ({ensemble_export['reason']}), so the "
                         f"headline compares with the ensemble in PyTorch eager only")
    elif ensemble_export and not ensemble_export["parity"]["passed"]:
        warnings_.append(f"the ensemble's {config.target} export failed its parity check "
                         f"({'; '.join(ensemble_export['parity']['failures'])}); its row is left out")
    noisy = [f"{row['model']} on {row['backend']} batch {batch} {stats['cv']:.0%}"
             for row in measured for batch, stats in row["latency"].items() if stats["cv"] > 0.025]
    if noisy:
        warnings_.append(f"noisy timings (coefficient of variation above 2.5%): {', '.join(noisy)}. Sub-millisecond "
                         f"calls see rare long outliers (interrupts, other processes); the medians quoted are robust "
                         f"to them, the means and p99s are not")
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
        "export": artifact.to_dict(),
        "runner": {"name": runner.name, **runner.info},
        "parity": parity.to_dict(),
        "ensemble_export": ensemble_export,
        "rows": measured,
        "headline": headline(measured, config.target, training, config.epochs),
        "warnings": warnings_,
    }


def headline(rows: list[dict], target: str, training: TrainResult, epochs: int) -> str:
    """What a person reads first: the student's batch-1 speed-up over the ensemble on the same backend (and in
    PyTorch eager), the accuracy it keeps, and, when it loses more than a point, the likely cause."""
    find = {(row["model"], row["backend"]): row for row in rows}
    eager, student = find[("ensemble", "PyTorch eager")], find[("student", target)]
    same_backend = find.get(("ensemble", target))
    batch = "1" if "1" in eager["latency"] else next(iter(eager["latency"]))

    def median(row):
        return row["latency"][batch]["median_ms"]

    def speed(reference):
        ratio = median(reference) / median(student)
        return f"{ratio:.1f}× faster than" if ratio >= 1 else f"{1 / ratio:.1f}× SLOWER than"

    student_acc, ensemble_acc = student["accuracy"]["top1"], eager["accuracy"]["top1"]
    if same_backend is not None:
        text = (f"On {target} the student is {speed(same_backend)} the ensemble on {target} ({speed(eager)} the "
                f"ensemble in PyTorch eager) at batch {batch}: median {median(student):.3f} ms vs "
                f"{median(same_backend):.3f} ms vs {median(eager):.3f} ms.")
    else:
        text = (f"On {target} the student is {speed(eager)} the ensemble in PyTorch eager at batch {batch} (median "
                f"{median(student):.3f} ms vs {median(eager):.3f} ms); the ensemble was not run on {target}, so "
                f"this mixes what distillation buys with what {target} buys.")
    text += (f" It keeps {student_acc / ensemble_acc:.1%} of the ensemble's test accuracy "
             f"({student_acc:.2%} vs {ensemble_acc:.2%}).")
    drop = 100 * (ensemble_acc - student_acc)
    if drop > 1.0:
        if training.best_epoch == epochs:
            cause = (f"its validation accuracy was still rising at its last epoch ({epochs}), so it is likely "
                     f"undertrained: try more --epochs")
        else:
            cause = (f"its validation accuracy peaked at epoch {training.best_epoch} of {epochs}, so more epochs "
                     f"will not help; with {student['parameters']:,} parameters against the ensemble's "
                     f"{eager['parameters']:,} it is likely too small: try a wider --student")
        text += f" The student loses {drop:.1f} points: {cause}."
    return text


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
        "torch_threads": torch.get_num_threads(),
    }


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_config(config: RunConfig) -> None:
    if config.precision not in PRECISIONS:
        raise CompressorError(f"--precision {config.precision}: choose one of {', '.join(PRECISIONS)}")
    if config.temperature <= 0:
        raise CompressorError(f"--temperature {config.temperature}: must be positive (Hinton et al. use 1 to 20)")
    if not 0 <= config.alpha <= 1:
        raise CompressorError(f"--alpha {config.alpha}: must be between 0 (labels only) and 1 (soft targets only)")
    if config.epochs < 1 or config.batch_size < 1:
        raise CompressorError("--epochs and --batch-size must be at least 1")


def _check_writable(out_dir: Path) -> None:
    """Fail now, not after training, if ``--out`` cannot be written; leave nothing behind when checking."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CompressorError(f"--out {out_dir}: {probe} is a file, not a folder; choose another --out")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".compressor-write-check-"):
            pass
    except OSError as exc:
        raise CompressorError(f"--out {out_dir}: cannot write in {probe} ({exc.strerror}); choose another --out") from exc

