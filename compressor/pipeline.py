"""The main job, step by step: load teachers → diagnose → choose student → distill → export → parity → report.

``run(config)`` is the table of contents: one call per step, in order. The steps live in the packages named after
them (``compressor.teachers``, ``compressor.data``, ``compressor.training``, ``compressor.deployment``); this file,
the CLI and ``compressor.deployment`` are the only places where the training side meets ``targets``. Every check
that can fail on bad input runs before ``--out`` is created, so a rejected run leaves nothing behind; every file is
written atomically.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from compressor.checks import check_before_teachers
from compressor.config import PRECISIONS, RunConfig
from compressor.core.errors import CompressorError, MissingCapabilityError
from compressor.core.fileio import why_unwritable
from compressor.core.inputs import example_of
from compressor.data.loading import check_seq_len, load_data, to_tensors
from compressor.data.torch_data import Data
from compressor.deployment.export import best_member, export_all, save_student, write_student_bundle
from compressor.deployment.report import benchmark, build_report, environment
from compressor.teachers.ensemble import Ensemble
from compressor.teachers.formats import load_ensemble
from compressor.students.candidates import candidate_specs, price_candidates
from compressor.students.sizing import SIZED_FAMILIES, StudentBudget, size_student
from compressor.training.budget import RunBudget
from compressor.training.context import RunContext
from compressor.training.distill import choose_student, distill_generalist, distill_students
from compressor.training.distributed import join, leave
from compressor.training.precision import check_amp
from compressor.training.omitted_classes import omitted_class_indices
from compressor.training.planning import plan_training, resume_plan
from compressor.training.selection import Timers
from compressor.training.recipes import make_recipe
from compressor.training.teacher_cache import check_cache_root
from compressor.training.teacher_outputs import diagnose_teachers, teacher_outputs, transfer_fit
from compressor.training.transfer import check_views, fix_bias, transfer_set
from compressor.training.tuning import tune
from targets.base import check_target_available, check_target_inputs, get_target
from targets.benchmark import measure_latency
from targets.eager import EagerRunner
from targets.onnxruntime import check_provider
from targets.parity import enforce_parity
from targets.report import write_report
from targets.tensorrt_preflight import preflight


@dataclass(frozen=True)
class Sources:
    """What a run from Python hands over in memory instead of files: the teachers (an :class:`Ensemble`, e.g. of
    ``nn.Module``s) and the data (``compressor.Data`` of torch Datasets); None where ``config`` names a file."""

    ensemble: Ensemble | None = None
    data: Data | None = None


@dataclass(frozen=True)
class Finished:
    """A finished run: the report (also in ``<out>/report.json``) and the trained student, in eval mode."""

    report: dict
    student: torch.nn.Module


def run(config: RunConfig, console: Console | None = None, sources: Sources = Sources()) -> Finished | None:
    """Run the main job for ``config`` (the teachers and data of ``sources`` where given) and return the report
    and the student.

    Under torchrun every rank trains; rank 0 alone writes artifacts and returns, the others return None.
    """
    started = time.perf_counter()
    check_before_any_work(config, sources)
    ctx = start(config, console or Console(stderr=True), sources)        # the process group, teachers and data
    ctx.teacher = teacher_outputs(ctx)                                   # 1. the teachers' logits on every split
    diagnostics = diagnose_teachers(ctx)                                 # 2. diagnose
    transfer = None if config.tuned else transfer_set(ctx)
    check_recipe_views(ctx, diagnostics, transfer)
    if ctx.world.is_main:
        config.output_dir().mkdir(parents=True, exist_ok=True)
    budget = start_budget(ctx)
    ctx, transfer, bought = plan_training(ctx, transfer, budget, timers(ctx))  # 3. choose, size
    students = tune(ctx, budget) if config.tuned else distill_students(ctx, transfer)  # 4. distill
    budget.record("tuning" if config.tuned else "distilling", students.seconds())
    students.from_generalist = distill_generalist(ctx, students.transfer)
    budget.stop()                                                        # training ends: the budget's clock too
    if not ctx.world.is_main:
        leave(ctx.world)
        return None
    chosen = ctx.with_config(students.config)                            # a tuned run deploys under its choice
    extras = {"bias_fix": fix_bias(chosen, students.student, students.transfer)}
    save_students(chosen, students)
    exported = export_all(chosen, students.student)                      # 5-6. export, parity
    bench = benchmark(chosen, students, exported)                        # 7. score and time every row
    extras["student_transfer_fit"] = transfer_fit(students.student, ctx)
    extras["baseline_transfer_fit"] = None if students.baseline is None else transfer_fit(students.baseline.model,
                                                                                          ctx)
    write_student_bundle(chosen, exported.artifact, environment()["versions"])
    extras["seconds_total"] = round(time.perf_counter() - started, 2)
    extras["budget"] = budget.describe(bought)
    report = build_report(chosen, config, students, exported, diagnostics, bench, extras)
    write_report(report, config.output_dir())
    leave(ctx.world)
    enforce_parity(exported.parity, f"{config.target} {config.precision} export {exported.artifact.files['model']}")
    return Finished(report, students.student)


def start_budget(ctx: RunContext) -> RunBudget:
    """The run's ``--budget`` clock, started, with the candidates' pricing (done before the teachers ran) charged."""
    budget = RunBudget(60 * ctx.config.budget)
    budget.start()
    if ctx.student_selection and "pricing_seconds" in ctx.student_selection:
        budget.record("pricing", ctx.student_selection["pricing_seconds"])
    return budget


def start(config: RunConfig, console: Console, sources: Sources = Sources()) -> RunContext:
    """Join the process group, seed, load the teachers and the data (``sources``' where given), and validate the
    teachers on it."""
    world = join(config.device)
    check_amp(config.amp, torch.device(world.device))
    if config.tuned and world.size > 1:
        raise CompressorError("--tune and --recipe auto search in one process: run the search without torchrun, "
                              "then rerun the command its report prints under torchrun")
    if not world.is_main:                                           # one voice: rank 0 prints and draws progress
        console, config = Console(stderr=True, quiet=True), dataclasses.replace(config, progress=False)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    ensemble = sources.ensemble or load_ensemble(config.teacher, trust_pickle=config.trust_pickle)
    dataset, normalisation = load_data(config, ensemble, ensemble.probe, sources.data)  # one row: channels, classes
    check_seq_len(config.seq_len, dataset, ensemble, config.teacher)
    check_target_inputs(config.target, dataset.named_inputs)  # before any training: it would fail at the export
    tensors = to_tensors(dataset, normalisation)
    ensemble.validate(tensors.x_val[:8], f"--data {dataset.source}")
    omitted = omitted_class_indices(config, ensemble, dataset)
    config, selection = settle_or_price(config, ensemble, dataset, tensors, world)
    if selection is not None and "why" in selection:
        console.print(f"[bold]student[/] {config.student}: {selection['why']}")
    ctx = RunContext(config, ensemble, dataset, tensors, normalisation, world, console, omitted=omitted,
                     student_selection=selection)
    check_before_teachers(ctx)  # every pairing of the options, the data and the student (--student-weights too)
    console.print(f"[bold]teachers[/] {len(ensemble.members)} members, {ensemble.parameters:,} parameters; "
                  f"[bold]data[/] {dataset.name} {len(dataset.train)}/{len(dataset.val)}/{len(dataset.test)}")
    return ctx


def settle_or_price(config: RunConfig, ensemble, dataset, tensors, world) -> tuple[RunConfig, dict | None]:
    """The student before the teachers run: a --resume'd run's settled choice (``<out>/selection.json``); for
    ``--student auto`` every candidate built and timed on the target (the choice comes after the teachers' pass);
    a bare cnn / mlp sized by its ladder; any other spec as it is."""
    resumed = resume_plan(config, ensemble, dataset)
    if resumed is not None:
        config, selection = resumed
        if selection is not None:
            return config, selection
    if config.student != "auto":
        return resolve_student(config, ensemble, dataset, _target_latency(config, tensors.x_val[:64]))
    if world.size > 1:
        raise CompressorError("--student auto measures its candidates in one process: run it without torchrun, "
                              "then rerun under torchrun with the --student, --alpha and --temperature its report "
                              "chose")
    return config, price(config, ensemble, dataset)


def price(config: RunConfig, ensemble, dataset) -> dict:
    """``--student auto``'s candidates (compressor.students.candidates), each built and its parameters and
    multiply-adds counted; they are timed once the best member is known (``timers``)."""
    started = time.perf_counter()
    architecture = next((m.architecture for m in ensemble.members if m.architecture), None)
    hf_config = ensemble.metadata.get("hf_config")
    if dataset.named_inputs and hf_config is None:
        raise CompressorError("--student auto builds text students from the teachers' transformers config, and "
                              f"{ensemble.path} records none; give --student hf:DIR or hf:CONFIG.json")
    specs = candidate_specs(tuple(dataset.input_shape), dataset.named_inputs, hf_config, architecture is not None)
    rows = price_candidates(specs, tuple(dataset.input_shape), ensemble.num_classes, dataset.example(), architecture,
                            hf_config)
    return {"requested": "auto", "candidates": rows, "target": config.target,
            "pricing_seconds": round(time.perf_counter() - started, 2)}


def resolve_student(config: RunConfig, ensemble, dataset, latency_ms=None) -> tuple[RunConfig, dict | None]:
    """A bare cnn / mlp sized to the teachers by its ladder (compressor.students.sizing): the config with the chosen
    spec and the record of the candidates; any other spec as it is, with None."""
    if config.student not in SIZED_FAMILIES:
        return config, None
    budget = StudentBudget(config.student_budget, config.max_params, config.max_latency_ms if latency_ms else None)
    spec, selection = size_student(budget, ensemble, tuple(dataset.input_shape), ensemble.num_classes, latency_ms,
                                   config.student, dataset.example())
    return dataclasses.replace(config, student=spec), selection


TIMING = {"warmup_s": 0.03, "duration_s": 0.15}  # how briefly candidates are timed
PRECISE = {"warmup_s": 0.1, "duration_s": 0.6}  # the best member, and candidates near the limit


def _target_latency(config: RunConfig, pool, timing: dict = TIMING):
    """A model's median batch-1 latency in ms on ``--target``, exported there in a scratch folder and timed for
    ``timing``: how --student auto and --max-latency-ms price candidates and members."""
    def latency_ms(model) -> float:
        if not isinstance(model, torch.nn.Module):  # an ONNX member: a function over onnxruntime already
            return _eager_latency(pool, timing)(model)
        target = get_target(config.target)
        with tempfile.TemporaryDirectory(prefix="compressor-sizing-") as folder:
            artifact = target.export(model, example_of(pool), Path(folder), "fp32")
            runner = target.load(artifact, threads=config.threads)
            return measure_latency(runner.infer, pool.numpy(), 1, **timing).median_ms
    return latency_ms


def _eager_latency(pool, timing: dict = TIMING):
    """A model's (or an ONNX member's function's) median batch-1 latency in ms in PyTorch eager on the CPU."""
    def latency_ms(model) -> float:
        return EagerRunner(model).measure(pool.numpy(), 1, **timing).median_ms
    return latency_ms


def timers(ctx: RunContext) -> Timers:
    """--student auto's clocks: a model on the target and in eager at batch 1, and the best member by validation
    accuracy timed both ways (without one, a specialist ensemble or no labels: the fastest member)."""
    pool = ctx.tensors.x_val[:64]

    def reference() -> dict:
        chosen = best_member(ctx)
        members = ctx.ensemble.members if chosen is None else [ctx.ensemble.members[chosen[0]]]
        timed = [{"member": m.name, "latency_ms": round(_target_latency(ctx.config, pool, PRECISE)(m.forward), 4),
                  "eager_ms": round(_eager_latency(pool, PRECISE)(m.forward), 4)} for m in members]
        if chosen is not None:
            return {**timed[0], "val_accuracy": chosen[1], "chosen_by": "validation accuracy"}
        return {**min(timed, key=lambda t: t["latency_ms"]),
                "chosen_by": "the fastest member: there is no best one by validation accuracy (no labels, or a "
                             "specialist ensemble)"}
    return Timers(_target_latency(ctx.config, pool), _eager_latency(pool), reference,
                  _target_latency(ctx.config, pool, PRECISE))


def check_recipe_views(ctx: RunContext, diagnostics: dict, transfer) -> None:
    """Score the teachers on the recipe's views (a tuned run: on the shifts its search may choose) and warn when
    they are not robust to them; the result lands in ``diagnostics["view_check"]``."""
    if transfer is None:
        x = ctx.tensors.x_train
        recipe = make_recipe("consistent", tuple(x.shape[1:]), x, ctx.config.seed)
    else:
        recipe = transfer.recipe
    diagnostics["view_check"] = check_views(ctx, recipe)
    if diagnostics["view_check"] and diagnostics["view_check"]["warning"]:
        diagnostics["warnings"].append(diagnostics["view_check"]["warning"])
        ctx.console.print(f"[yellow]warning:[/] {diagnostics['view_check']['warning']}")


def save_students(ctx: RunContext, students) -> None:
    """``student.pt`` (and ``baseline.pt``, kept so its predictions can be checked or compared later) in --out."""
    example = ctx.tensors.x_test[:2]
    save_student(students.student, example, ctx.config.output_dir() / "student.pt", ctx.config)
    if students.baseline is not None:
        save_student(students.baseline.model, example, ctx.config.output_dir() / "baseline.pt", ctx.config)


def check_before_any_work(config: RunConfig, sources: Sources = Sources()) -> None:
    """Every check of the options that needs no training: the target is available here (else, for TensorRT, the
    preflight's verdict), the values make sense, and --out can be written."""
    try:
        check_target_available(config.target, config.precision)  # no GPU, no TensorRT: stop before any work
    except MissingCapabilityError as missing:
        if config.target != "tensorrt":
            raise
        preflight_without_gpu(config, missing, sources)            # say whether the student would build, then stop
    _check_config(config)
    _check_writable(config.output_dir())
    check_cache_root(config.teacher_cache, config.no_cache)      # the caches' folder, before the teachers run


def preflight_without_gpu(config: RunConfig, missing: MissingCapabilityError, sources: Sources = Sources()) -> None:
    """``--target tensorrt`` where no GPU or no TensorRT is: export the (untrained) student's graph to a temporary
    ONNX file, check it against TensorRT's ONNX parser, and stop with the verdict, before any training or --out.

    The graph of an untrained student is the graph of the trained one: only weights change in training.
    """
    ensemble = sources.ensemble or load_ensemble(config.teacher, trust_pickle=config.trust_pickle)
    dataset, _ = load_data(config, ensemble, data=sources.data)
    if config.student == "auto":  # the choice needs training: check each family's smallest candidate's graph
        built = [row for row in price(config, ensemble, dataset)["candidates"] if "skipped" not in row]
        smallest = {}
        for row in sorted(built, key=lambda r: r["parameters"]):
            smallest.setdefault(row["family"], row["spec"])
        specs = list(smallest.values())
    else:
        specs = [resolve_student(config, ensemble, dataset)[0].student]  # sized without --max-latency-ms
    example = example_of(to_tensors(dataset, None).x_test)  # only its shape matters to the graph
    verdicts = []
    for spec in specs:
        torch.manual_seed(config.seed)
        student = choose_student(dataclasses.replace(config, student=spec), ensemble, dataset).eval()
        with tempfile.TemporaryDirectory(prefix="compressor-preflight-") as scratch:
            artifact = get_target("onnx").export(student, example, Path(scratch), "fp32")
            result = preflight(artifact.files["model"])
        verdicts.append((spec, result.ok, result.summary().replace(artifact.files["model"].name, f"--student {spec}",
                                                                    1)))
    good = [v for v in verdicts if v[1]]
    if not good:
        raise CompressorError(f"{verdicts[0][2]}; choose another --student (TensorRT preflight, run without "
                              f"TensorRT)")
    verdict = good[0][2] if len(verdicts) == 1 else (
        f"{good[0][2]}; --student auto: {len(good)} of {len(verdicts)} candidate families' smallest graphs would "
        f"build ({', '.join(spec for spec, ok, _ in verdicts if ok)})")
    raise MissingCapabilityError(f"{missing} (TensorRT preflight, run without TensorRT: {verdict})")


def _check_config(config: RunConfig) -> None:
    if config.precision not in PRECISIONS:
        raise CompressorError(f"--precision {config.precision}: choose one of {', '.join(PRECISIONS)}")
    if not config.temperature > 0:  # NaN too
        raise CompressorError(f"--temperature {config.temperature}: must be positive (Hinton et al. use 1 to 20)")
    if not 0 <= config.alpha <= 1:
        raise CompressorError(f"--alpha {config.alpha}: must be between 0 (labels only) and 1 (soft targets only)")
    if (config.epochs is not None and config.epochs < 1) or config.batch_size < 1:
        raise CompressorError("--epochs and --batch-size must be at least 1")
    _check_numbers(config)
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
        check_provider(config.ort_provider)  # no onnxruntime-gpu: stop before training
    if config.student == "auto" and config.student_weights is not None:
        raise CompressorError(f"--student-weights {config.student_weights} belongs to one architecture: give the "
                              f"--student spec it was saved from")
    StudentBudget(config.student_budget, config.max_params, config.max_latency_ms).check()
    if not config.budget > 0 or not config.min_speedup > 0:
        raise CompressorError(f"--budget {config.budget:g} / --min-speedup {config.min_speedup:g}: give minutes above 0 "
                              f"and a speed-up above 0 (2 = twice as fast as the best member)")
    if config.tune is not None and not config.tune > 0:
        raise CompressorError(f"--tune {config.tune:g}: give the search's budget in minutes, more than 0")
    if config.no_cache and config.refresh_teacher_cache:
        raise CompressorError("--no-cache and --refresh-teacher-cache contradict each other; pass one of them")
    if config.no_cache and config.cache_top_k is not None:
        raise CompressorError("--no-cache and --cache-top-k contradict each other: --cache-top-k says how the "
                              "cache stores logits; pass one of them")


def _check_numbers(config: RunConfig) -> None:
    """The numeric options the training and the benchmark read late: refused here, not after the teachers ran."""
    if config.seed < 0:
        raise CompressorError(f"--seed {config.seed}: give a whole number, 0 or more")
    if not config.lr > 0:
        raise CompressorError(f"--lr {config.lr:g}: give a learning rate above 0 (e.g. 3e-3)")
    if config.threads is not None and config.threads < 1:
        raise CompressorError(f"--threads {config.threads}: give at least 1 thread, or leave it out for the "
                              f"libraries' default")
    if not config.warmup_s >= 0 or not config.duration_s > 0:
        raise CompressorError(f"--warmup {config.warmup_s:g} / --duration {config.duration_s:g}: give seconds, "
                              f"--warmup 0 or more and --duration above 0")
    if not config.max_accuracy_drop >= 0:
        raise CompressorError(f"--max-accuracy-drop {config.max_accuracy_drop:g}: give the points of test accuracy "
                              f"an int8 export may lose, 0 or more")


def _check_writable(out_dir: Path) -> None:
    """Fail now, not after training, if ``--out`` cannot be written; leave nothing behind when checking."""
    problem = why_unwritable(out_dir)
    if problem is not None:
        raise CompressorError(f"--out {out_dir}: {problem[0]} {problem[1]}; choose another --out")

