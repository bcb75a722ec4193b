"""The main job, step by step: load teachers → diagnose → choose student → distill → export → parity → report.

``run(config)`` is the table of contents: one call per step, in order. It is the one place (with the CLI) where
the training package ``compressor`` and the deployment package ``targets`` meet. Every check that can fail on bad
input runs before ``--out`` is created, so a rejected run leaves nothing behind; every file is written atomically.
"""

from __future__ import annotations

import dataclasses
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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from compressor import __version__
from compressor.augment import default_augmentation
from compressor.config import PRECISIONS, RunConfig
from compressor.compare import EAGER, eager_device, ensemble_rows, headline, paired_bootstrap, student_rows, verdict
from compressor.data import Dataset, load_dataset
from compressor.diagnostics import diagnose, transfer_sample
from compressor.distill import TrainConfig, TrainResult, check_amp, predict_logits, train_student
from compressor.distributed import World, barrier, join, leave
from compressor.errors import CompressorError, MissingCapabilityError
from compressor.fileio import atomic_path
from compressor.losses import DistillationLoss, HardLabelLoss
from compressor.omitted_classes import parse_class_list
from compressor.recipes import make_recipe
from compressor.specialist_training import score_specialists
from compressor.students import create_student
from compressor.teacher_cache import CachedLogits, TeacherCache, cache_key, default_cache_root
from compressor.teachers import Ensemble, load_ensemble
from compressor.transfer import TeacherOutputs, Tensors, TransferSet, check_views, fix_bias, transfer_set
from compressor.tuning import DEFAULT_TUNE_MINUTES, search_space, successive_halving
from compressor.view_cache import ViewLogits
from targets.base import TARGETS, Artifact, check_target_available, get_target
from targets.benchmark import classification_metrics, sweep
from targets.bundle import apply_normalisation, write_bundle
from targets.cuda_timing import cuda_device_name
from targets.pareto import plot_pareto
from targets.parity import check_parity, enforce_parity
from targets.report import write_report

REPORT_SCHEMA_VERSION = 2
PARITY_ROWS = 2000          # held-out rows compared between PyTorch and the export
BENCHMARK_POOL = 512        # distinct test inputs cycled through by the latency harness
CALIBRATION_ROWS = 512      # transfer-set rows that calibrate int8 activation ranges


@dataclass
class TrainedBaseline:
    """The hard-label baseline: the student's architecture trained without the teachers."""

    model: torch.nn.Module
    training: TrainResult


def run(config: RunConfig, console: Console | None = None) -> dict | None:
    """Run the main job for ``config`` and return the report (also written to ``<out>/report.json``).

    Under torchrun every rank trains; rank 0 alone writes artifacts and returns the report, the others None.
    """
    console = console or Console(stderr=True)
    started = time.perf_counter()
    try:
        check_target_available(config.target, config.precision)  # no GPU, no TensorRT: stop before any work
    except MissingCapabilityError as missing:
        if config.target != "tensorrt":
            raise
        preflight_without_gpu(config, missing)                     # say whether the student would build, then stop
    _check_config(config)
    out_dir = config.output_dir()
    _check_writable(out_dir)
    world = join(config.device)
    check_amp(config.amp, torch.device(world.device))
    if tuned(config) and world.size > 1:
        raise CompressorError("--tune and --recipe auto search in one process: run the search without torchrun, "
                              "then rerun the command its report prints under torchrun")
    if not world.is_main:                                           # one voice: rank 0 prints and draws progress
        console, config = Console(stderr=True, quiet=True), dataclasses.replace(config, progress=False)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)

    ensemble = load_ensemble(config.teacher, trust_pickle=config.trust_pickle)          # 1. teachers
    dataset, normalisation = load_data(config, ensemble)
    tensors = to_tensors(dataset, normalisation)
    ensemble.validate(tensors.x_val[:8], f"--data {dataset.source}")
    omitted = omitted_classes(config, ensemble, dataset)
    console.print(f"[bold]teachers[/] {len(ensemble.members)} members, {ensemble.parameters:,} parameters; "
                  f"[bold]data[/] {dataset.name} {len(dataset.train)}/{len(dataset.val)}/{len(dataset.test)}")
    teacher = teacher_outputs(ensemble, dataset, tensors, normalisation, config, world, console)
    diagnostics = diagnose_teachers(ensemble, tensors, teacher, config)                  # 2. diagnose
    for line in diagnostics["warnings"]:
        console.print(f"[yellow]warning:[/] {line}")
    tuning = None
    if tuned(config):  # the check runs on the augmentation the search may choose
        recipe = make_recipe("consistent", tuple(tensors.x_train.shape[1:]), tensors.x_train, config.seed)
    else:
        transfer = transfer_set(config, ensemble, tensors, teacher, omitted, console)
        recipe = transfer.recipe
    diagnostics["view_check"] = check_views(ensemble, recipe, tensors, teacher)
    if diagnostics["view_check"] and diagnostics["view_check"]["warning"]:
        diagnostics["warnings"].append(diagnostics["view_check"]["warning"])
        console.print(f"[yellow]warning:[/] {diagnostics['view_check']['warning']}")

    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    requested = config
    if tuned(config):                                                                   # 3-4. tuned students
        search = tune(config, ensemble, dataset, tensors, teacher, omitted, normalisation, world, console)
        config, transfer, student, training, baseline = (search.config, search.transfer, search.student,
                                                         search.training, search.baseline)
        tuning = search.report
    else:
        torch.manual_seed(config.seed)                              # the student and the baseline start alike
        student = choose_student(config, ensemble, dataset)                             # 3. student
        training = distill(config, ensemble, dataset, tensors, transfer, student, normalisation, world, console)
        baseline = (train_baseline(config, ensemble, dataset, tensors, transfer, world, console)   # 4. distill
                    if config.baseline else None)
    from_generalist = distill_generalist(config, ensemble, dataset, tensors, transfer, normalisation, world, console)
    if not world.is_main:
        leave(world)
        return None
    bias_fix = fix_bias(config, student, tensors, transfer, console)
    save_student(student, tensors.x_test[:2], out_dir / "student.pt", config)
    if baseline is not None:  # kept beside the student so its predictions can be checked or compared later
        save_student(baseline.model, tensors.x_test[:2], out_dir / "baseline.pt", config)

    target = get_target(config.target)                                                  # 5. export
    options = export_options(config)
    if config.precision == "int8":
        options["calibration"] = tensors.x_train[:CALIBRATION_ROWS].numpy()
    artifact = target.export(student, tensors.x_test[:2], out_dir / "export", config.precision, **options)
    runner = target.load(artifact, threads=config.threads, **runner_options(config))
    parity = check_student_parity(student, runner, tensors, config)                      # 6. parity

    ensemble_runner, ensemble_export = export_ensemble(ensemble, target, tensors, teacher.test, config, console)
    report = benchmark_and_report(config, ensemble, dataset, tensors, teacher.test, student, runner,  # 7.
                                  artifact, parity, diagnostics, training, normalisation, console,
                                  ensemble_runner, ensemble_export, baseline, from_generalist)
    report["teacher_cache"] = teacher.cache
    report["tuning"] = tuning
    report["config"] = requested.to_dict()  # the options as given; a tuned run's choice is in report["tuning"]
    report["transfer_set"] = transfer.info
    if isinstance(transfer.teacher, ViewLogits):
        report["transfer_set"]["view_cache"] = transfer.teacher.describe()
    if tuning is not None:
        report["headline"] += f" {tuning['explanation']}"
    report["student"]["bias_fix"] = bias_fix
    report["student"]["transfer_fit"] = transfer_fit(student, ensemble, tensors, teacher, config.seed)
    if baseline is not None:
        report["baseline"]["transfer_fit"] = transfer_fit(baseline.model, ensemble, tensors, teacher, config.seed)
    report["environment"]["distributed"] = world.describe()
    write_student_bundle(artifact, dataset, ensemble, normalisation, config, out_dir)
    report["seconds_total"] = round(time.perf_counter() - started, 2)
    write_report(report, out_dir)
    leave(world)
    enforce_parity(parity, f"{config.target} {config.precision} export {artifact.files['model']}")
    return report


def run_teachers(ensemble: Ensemble, splits: dict[str, torch.Tensor], config: RunConfig) -> dict[str, torch.Tensor]:
    """Run every member once over each split's inputs: (K, N, C) logits per split, with a progress bar."""
    total = len(ensemble.members) * sum(len(x) for x in splits.values())
    with progress_bar(config.progress) as progress:
        task = progress.add_task(f"teachers ({len(ensemble.members)} members)", total=total)
        return {name: ensemble.member_logits(x, on_batch=lambda rows: progress.advance(task, rows))
                for name, x in splits.items()}


def teacher_outputs(ensemble: Ensemble, dataset: Dataset, tensors: Tensors, normalisation: dict | None,
                    config: RunConfig, world: World, console: Console) -> TeacherOutputs:
    """The members' logits on every split, from the teacher cache when it holds them; else computed once and
    stored there by rank 0 (the other ranks read what it stored). With --no-cache the teachers run on the held-out
    splits once and on every training batch, for inputs that change from epoch to epoch."""
    splits = {"train": tensors.x_train, "val": tensors.x_val, "test": tensors.x_test}

    def online(xb: torch.Tensor) -> torch.Tensor:
        return ensemble.member_logits(xb.cpu(), batch_size=max(len(xb), 1))  # (K, B, C)

    if config.no_cache:
        held_out = run_teachers(ensemble, {"val": splits["val"], "test": splits["test"]}, config)
        return TeacherOutputs(online, held_out["val"], held_out["test"], {"enabled": False}, online)
    key = cache_key(ensemble.fingerprint(), dataset.fingerprint(),
                    {"preprocessing": dataset.preprocessing, "normalisation": normalisation})
    cache = TeacherCache(config.teacher_cache or default_cache_root(), key)
    entries, hit = None, False
    if world.is_main:
        entries = None if config.refresh_teacher_cache else cache.load()
        hit = entries is not None
        if hit:
            console.print(f"[bold]teacher cache[/] reusing {cache.path}")
        else:
            entries = cache.store(run_teachers(ensemble, splits, config), replace=config.refresh_teacher_cache)
            console.print(f"[bold]teacher cache[/] stored {cache.path}")
    barrier(world)
    if not world.is_main:
        entries = cache.load()
        if entries is None:  # no filesystem shared with rank 0: this rank computes its own copy in memory
            computed = run_teachers(ensemble, splits, config)
            entries = {name: CachedLogits(logits.numpy()) for name, logits in computed.items()}
    return TeacherOutputs(entries["train"], entries["val"].to_tensor(), entries["test"].to_tensor(),
                          cache.describe(hit), online, cache.root / "views")


def diagnose_teachers(ensemble: Ensemble, tensors: Tensors, teacher: TeacherOutputs, config: RunConfig) -> dict:
    """The ensemble on validation and on a sample of the transfer set (compressor.diagnostics)."""
    rows = transfer_sample(tensors.y_train, config.seed)  # (S,)
    if isinstance(teacher.train, CachedLogits):
        transfer = teacher.train.take(rows)  # (K, S, C): only the sampled rows are read
    else:  # --no-cache: the teachers run on the sample once more
        transfer = teacher.train(tensors.x_train[rows])
    return diagnose(ensemble, teacher.val, tensors.y_val, transfer_logits=transfer,
                    transfer_labels=tensors.y_train[rows])


def omitted_classes(config: RunConfig, ensemble: Ensemble, dataset: Dataset) -> tuple[int, ...]:
    """The class indices of --omit-classes (numbers or class names), checked before any work."""
    if not config.omit_classes:
        return ()
    omitted = parse_class_list(config.omit_classes, ensemble.class_names or dataset.class_names,
                               ensemble.num_classes)
    if not dataset.labelled:
        raise CompressorError(f"--omit-classes {config.omit_classes}: the transfer set has no labels to tell "
                              f"which rows belong to those classes; label it or drop --omit-classes")
    return omitted


def transfer_fit(model: torch.nn.Module, ensemble: Ensemble, tensors: Tensors, teacher: TeacherOutputs,
                 seed: int) -> dict:
    """How closely ``model`` imitates the ensemble on rows it trained on (a seeded sample of the transfer set, the
    plain images): top-1 agreement and mean KL(ensemble ‖ model) in nats at T = 1. A student that agrees little
    even there cannot represent the teachers' function, so no recipe or schedule will make it keep their gain."""
    rows = transfer_sample(torch.zeros_like(tensors.y_train), seed)  # (S,) every row counts, labelled or not
    member = teacher.train.take(rows) if isinstance(teacher.train, CachedLogits) else teacher.online(
        tensors.x_train[rows])  # (K, S, C)
    reference = ensemble.log_probs(member).numpy()  # (S, C)
    metrics = classification_metrics(predict_logits(model, tensors.x_train[rows]).numpy(), None, reference)
    return {"rows": len(rows), "agreement": metrics["agreement"], "kl_to_ensemble": metrics["kl_to_reference"]}


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr (hidden with --no-progress) for the steps that take long."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled, transient=False)


def preflight_without_gpu(config: RunConfig, missing: MissingCapabilityError) -> None:
    """``--target tensorrt`` where no GPU or no TensorRT is: export the (untrained) student's graph to a temporary
    ONNX file, check it against TensorRT's ONNX parser, and stop with the verdict, before any training or --out.

    The graph of an untrained student is the graph of the trained one: only weights change in training.
    """
    from targets.tensorrt_preflight import preflight

    ensemble = load_ensemble(config.teacher, trust_pickle=config.trust_pickle)
    dataset, _ = load_data(config, ensemble)
    torch.manual_seed(config.seed)
    student = choose_student(config, ensemble, dataset).eval()
    example = torch.from_numpy(dataset.test.x[:2])
    with tempfile.TemporaryDirectory(prefix="compressor-preflight-") as scratch:
        artifact = get_target("onnx").export(student, example, Path(scratch), "fp32")
        result = preflight(artifact.files["model"])
    verdict = result.summary().replace(artifact.files["model"].name, f"--student {config.student}", 1)
    if not result.ok:
        raise CompressorError(f"{verdict}; choose another --student (TensorRT preflight, run without TensorRT)")
    raise MissingCapabilityError(f"{missing} (TensorRT preflight, run without TensorRT: {verdict})")


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


def distill(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, transfer: TransferSet,
            student: torch.nn.Module, normalisation: dict | None, world: World, console: Console,
            folder: str = "checkpoints", until: int | None = None, resume: bool | None = None) -> TrainResult:
    """Train the student on the ensemble's soft targets at temperature T, mixed with the hard labels, on this
    rank's device, checkpointing into ``<out>/<folder>``; the student is back on the CPU afterwards.

    With α = 0 the teachers play no part: the labels alone train it, on the recipe's labelled views (what a tuned
    baseline is). ``until`` pauses after that epoch (a tuning rung); ``resume`` overrides --resume."""
    hard = transfer.alpha == 0
    loss = HardLabelLoss() if hard else DistillationLoss(temperature=config.temperature, alpha=transfer.alpha,
                                                         combine=transfer.combine, weights=transfer.weights)
    fingerprint = {
        "teacher_sha256": ensemble.fingerprint(), "data_sha256": dataset.fingerprint(),
        "student": config.student, "temperature": config.temperature, "alpha": transfer.alpha,
        "normalisation": json.dumps(normalisation, sort_keys=True),
        "transfer_set": {key: transfer.info.get(key)
                         for key in ("unlabeled", "omitted_classes", "best_epoch_by", "recipe", "augmentation")},
        "teacher_logits": "recomputed every batch" if config.no_cache else "teacher cache",
        "soft_targets": transfer.info.get("soft_targets"),
    }
    resume = config.resume if resume is None else resume
    checkpoints = config.output_dir() / folder
    if (checkpoints / "last.pt").exists() and not resume:
        console.print(f"[yellow]note:[/] {checkpoints / 'last.pt'} exists; starting over (pass --resume to continue it)")
    student.to(world.device)
    try:
        return train_student(student, transfer.x, transfer.y, None if hard else transfer.teacher, tensors.x_val,
                             transfer.y_val, loss, _train_config(config), checkpoints, resume=resume,
                             fingerprint=fingerprint,
                             view=transfer.recipe.baseline_view if hard else transfer.recipe.view, until=until)
    finally:
        student.cpu()


def distill_generalist(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors,
                       transfer: TransferSet, normalisation: dict | None, world: World,
                       console: Console) -> TrainedBaseline | None:
    """For a specialist ensemble, the same student distilled from its generalist alone with the same budget, so
    the report shows what the specialists add to distillation; None for any other ensemble."""
    if transfer.generalist is None:
        return None
    console.print(f"[bold]student from the generalist[/] {config.student}, the same budget, the generalist's soft "
                  f"targets alone")
    torch.manual_seed(config.seed)
    model = choose_student(config, ensemble, dataset)
    alone = dataclasses.replace(transfer, teacher=transfer.generalist, generalist=None,
                                info={**transfer.info, "soft_targets": "the generalist alone"})
    training = distill(config, ensemble, dataset, tensors, alone, model, normalisation, world, console,
                       folder="checkpoints-generalist")
    return TrainedBaseline(model, training)


@dataclass
class TunedRun:
    """What --tune (or --recipe auto) hands on: the chosen configuration, its transfer set and student, the tuned
    hard-label baseline, and the search for the report."""

    config: RunConfig
    transfer: TransferSet
    student: torch.nn.Module
    training: TrainResult
    baseline: TrainedBaseline | None
    report: dict


def tune(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, teacher: TeacherOutputs,
         omitted: tuple[int, ...], normalisation: dict | None, world: World, console: Console) -> TunedRun:
    """Successive halving on validation (compressor.tuning) over recipe, T, α, lr and epochs, with the hard-label
    family tuned alike as the baseline. Trials checkpoint into ``<out>/tuning/<trial>/``; with --resume a killed
    search continues where it stopped. Each recipe's transfer set (and its view cache) is built once."""
    transfers: dict[str, TransferSet] = {}

    def trial_config(trial) -> RunConfig:
        return dataclasses.replace(config, recipe=trial.recipe, temperature=trial.temperature, alpha=trial.alpha,
                                   lr=trial.lr, epochs=trial.epochs)

    def trial_transfer(trial) -> TransferSet:
        if trial.recipe not in transfers:
            transfers[trial.recipe] = transfer_set(trial_config(trial), ensemble, tensors, teacher, omitted,
                                                   Console(stderr=True, quiet=True))
        transfer = transfers[trial.recipe]
        alpha = transfer.alpha if transfer.recipe.alpha is not None else trial.alpha
        return dataclasses.replace(transfer, alpha=alpha, info={**transfer.info, "alpha": alpha})

    begun: set = set()  # trials this search has trained: later rungs resume them; a first rung resumes only --resume

    def train(trial, epochs: int):
        torch.manual_seed(config.seed)  # every trial starts from the weights a plain run of it would
        student = choose_student(config, ensemble, dataset)
        training = distill(trial_config(trial), ensemble, dataset, tensors, trial_transfer(trial), student,
                           normalisation, world, console, folder=f"tuning/{trial.name}", until=epochs,
                           resume=config.resume or trial in begun)
        begun.add(trial)
        return training.best_val_accuracy, (student, training)

    labelled = bool((tensors.y_train >= 0).any()) and not config.unlabeled
    space = search_space(config.recipe, config.temperature, config.alpha, config.lr, config.epochs,
                         default_augmentation(tuple(tensors.x_train.shape[1:])) is not None, labelled)
    minutes = config.tune or DEFAULT_TUNE_MINUTES
    console.print(f"[bold]tune[/] successive halving on validation, budget {minutes:g} min")
    search = successive_halving(space, train, 60 * minutes, config.seed,
                                log=lambda line: console.print(f"[bold]tune[/] {line}"), trials=config.tune_trials)
    report = search.describe(config.command)
    console.print(f"[bold]tune[/] {report['explanation']}")
    chosen = search.chosen.trial
    student, training = search.chosen.result
    labels = search.winners.get("labels")
    baseline = None if labels is None else TrainedBaseline(*labels.result)
    return TunedRun(trial_config(chosen), trial_transfer(chosen), student, training, baseline, report)


def _train_config(config: RunConfig) -> TrainConfig:
    return TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                       weight_decay=config.weight_decay, seed=config.seed, amp=config.amp, progress=config.progress)


def train_baseline(config: RunConfig, ensemble: Ensemble, dataset: Dataset, tensors: Tensors, transfer: TransferSet,
                   world: World, console: Console) -> TrainedBaseline | None:
    """The student's architecture trained on the hard labels alone with the same budget (--baseline).

    Same initial weights, epochs, schedule and batch order as the distilled student, and the best epoch on
    validation like it, so the comparison shows what the teachers add and not what a longer schedule adds.
    """
    if int((transfer.y >= 0).sum()) == 0:
        console.print("[yellow]note:[/] --baseline skipped: the transfer set has no labels to train it on")
        return None
    torch.manual_seed(config.seed)
    model = choose_student(config, ensemble, dataset).to(world.device)
    console.print(f"[bold]baseline[/] {config.student} on the hard labels alone, {config.epochs} epochs")
    fingerprint = {"data_sha256": dataset.fingerprint(), "student": config.student, "loss": "hard-label",
                   "omitted_classes": transfer.info.get("omitted_classes"), "recipe": config.recipe}
    training = train_student(model, transfer.x, transfer.y, None, tensors.x_val, transfer.y_val, HardLabelLoss(),
                             _train_config(config), config.output_dir() / "checkpoints-baseline",
                             resume=config.resume, fingerprint=fingerprint, view=transfer.recipe.baseline_view)
    return TrainedBaseline(model.cpu(), training)


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


def tuned(config: RunConfig) -> bool:
    """Whether the run searches its settings on validation: --tune MINUTES or --recipe auto."""
    return config.tune is not None or config.recipe == "auto"


def _check_config(config: RunConfig) -> None:
    if config.precision not in PRECISIONS:
        raise CompressorError(f"--precision {config.precision}: choose one of {', '.join(PRECISIONS)}")
    if config.temperature <= 0:
        raise CompressorError(f"--temperature {config.temperature}: must be positive (Hinton et al. use 1 to 20)")
    if not 0 <= config.alpha <= 1:
        raise CompressorError(f"--alpha {config.alpha}: must be between 0 (labels only) and 1 (soft targets only)")
    if config.epochs < 1 or config.batch_size < 1:
        raise CompressorError("--epochs and --batch-size must be at least 1")
    if config.bias_fix not in ("auto", "none"):
        try:
            float(config.bias_fix)
        except ValueError:
            raise CompressorError(f"--bias-fix {config.bias_fix}: give auto, none or a number of logits "
                                  f"(the paper raised the omitted 3's bias by 3.5)") from None
    if config.ort_provider != "auto":
        if config.target not in ("onnx", "onnxruntime"):
            raise CompressorError(f"--ort-provider {config.ort_provider} applies to --target onnxruntime or onnx, "
                                  f"not --target {config.target}; drop it")
        from targets.onnxruntime import check_provider

        check_provider(config.ort_provider)  # no onnxruntime-gpu: stop before training
    if config.tune is not None and not config.tune > 0:
        raise CompressorError(f"--tune {config.tune:g}: give the search's budget in minutes, more than 0")
    if config.no_cache and config.refresh_teacher_cache:
        raise CompressorError("--no-cache and --refresh-teacher-cache contradict each other; pass one of them")


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

