"""The main job, step by step: load teachers → diagnose → choose student → distill → export → parity → report.

``run(config)`` is the table of contents: one call per step, in order. The training steps live in
``compressor.student_training`` and the deployment steps in ``compressor.deployment`` (with ``compressor.compare``);
these and the CLI are the only places where the training package ``compressor`` and the deployment package
``targets`` meet. Every check that can fail on bad
input runs before ``--out`` is created, so a rejected run leaves nothing behind; every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from compressor.config import PRECISIONS, RunConfig
from compressor.data import Dataset, load_dataset
from compressor.deployment import (benchmark_and_report, export_ensemble, export_student, progress_bar, save_student,
                                   write_student_bundle)
from compressor.diagnostics import diagnose, transfer_sample
from compressor.distill import check_amp, predict_logits
from compressor.distributed import World, barrier, join, leave
from compressor.errors import CompressorError, MissingCapabilityError
from compressor.omitted_classes import parse_class_list
from compressor.recipes import make_recipe
from compressor.student_training import choose_student, distill, distill_generalist, train_baseline, tune
from compressor.teacher_cache import CachedLogits, TeacherCache, cache_key, default_cache_root
from compressor.teachers import Ensemble, load_ensemble
from compressor.transfer import TeacherOutputs, Tensors, check_views, fix_bias, transfer_set
from compressor.view_cache import VariantLogits, ViewLogits
from targets.base import check_target_available, get_target
from targets.benchmark import classification_metrics
from targets.bundle import apply_normalisation
from targets.parity import enforce_parity
from targets.report import write_report


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

    artifact, runner, parity = export_student(student, tensors, config)                 # 5-6. export, parity
    target = get_target(config.target)
    ensemble_runner, ensemble_export = export_ensemble(ensemble, target, tensors, teacher.test, config, console)
    report = benchmark_and_report(config, ensemble, dataset, tensors, teacher.test, student, runner,  # 7.
                                  artifact, parity, diagnostics, training, normalisation, console,
                                  ensemble_runner, ensemble_export, baseline, from_generalist)
    report["teacher_cache"] = teacher.cache
    report["tuning"] = tuning
    report["config"] = requested.to_dict()  # the options as given; a tuned run's choice is in report["tuning"]
    report["transfer_set"] = transfer.info
    if isinstance(transfer.teacher, (ViewLogits, VariantLogits)):
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

