"""The main job's step 7: score every row on the test split and time it through one harness (the rows come
from ``compressor.deployment.rows``), draw pareto.png, and assemble ``report.json`` in one place,
:func:`build_report`; ``targets.report`` renders it as report.md."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch

from compressor import __version__
from compressor.config import RunConfig
from compressor.core.inference import parameter_count, predict_logits
from compressor.core.inputs import NamedInputs
from compressor.core.metrics import paired_bootstrap
from compressor.core.progress import progress_bar
from compressor.deployment.export import Exported, fp32_runner, sequence_length
from compressor.deployment.rows import EAGER, Row, eager_device, ensemble_rows, infer_rows, runner_row, student_rows
from compressor.deployment.verdict import headline, verdict
from compressor.teachers.ensemble import Ensemble
from compressor.training.context import RunContext
from compressor.training.distill import Students, TrainedBaseline
from compressor.training.specialist_training import score_specialists
from compressor.training.view_cache import VariantLogits, ViewLogits
from targets.benchmark import sweep
from targets.cuda_timing import cuda_device_name
from targets.pareto import plot_pareto

REPORT_SCHEMA_VERSION = 2
BENCHMARK_POOL = 512        # distinct test inputs cycled through by the latency harness


@dataclass
class Benchmark:
    """Step 7's measurements: the rows (scores and runners), their report entries with latency, the PyTorch rows'
    device, the pool of test inputs the harness cycles through, and the verdict on the gain kept."""

    rows: list[Row]
    measured: list[dict]
    device: str
    pool: int
    gain: dict | None


def benchmark(ctx: RunContext, students: Students, exported: Exported) -> Benchmark:
    """Every row scored on the test split and timed at every ``--batch-sizes`` in interleaved rounds."""
    config, tensors = ctx.config, ctx.tensors
    x_test, y_test = tensors.x_test, tensors.y_test.numpy()  # x_test: a tensor, or a streamed split
    timed = benchmark_pool(ctx)
    pool = timed.numpy()  # an array, or name → array for named inputs
    device = eager_device(ctx.ensemble)
    rows = ensemble_rows(ctx.ensemble, ctx.teacher.test, pool, device, config.target, exported.ensemble_runner,
                         x_test)
    if exported.member_runner is not None:  # the best member alone on the target: what a deployer might ship
        member = next(m for m in ctx.ensemble.members if m.name == exported.member_export["member"])
        rows.append(runner_row(f"member {member.name}", "member", config.target, "fp32", member.parameters,
                               infer_rows(exported.member_runner, x_test), exported.member_runner, pool))
    for kind, trained, label in (("baseline", students.baseline, None),
                                 ("generalist-student", students.from_generalist, "student from generalist")):
        if trained is not None:
            rows += student_rows(kind, trained.model, predict_logits(trained.model, tensors.x_test).numpy(), pool,
                                 device, label=label)
    runners = [(exported.runner, config.precision)]
    fp32 = fp32_runner(config, exported.artifact)
    if fp32 is not None:  # a reduced-precision export: its fp32 graph shows what the precision buys
        runners.insert(0, (fp32, "fp32"))
    student = students.student
    rows += student_rows("student", student, predict_logits(student, tensors.x_test).numpy(), pool, device,
                         config.target, runners, x_test)
    reference = rows[0].scores
    measured = [row.describe(y_test, reference) for row in rows]
    for entry, latency in zip(measured, _time_rows(rows, config)):
        entry["latency"] = latency
    return Benchmark(rows, measured, device, len(timed), verdict(rows, y_test, config.seed))


def benchmark_pool(ctx: RunContext):
    """The test inputs the harness cycles through; text rows at ``--seq-len`` tokens (default: the training
    split's median length), so every timed call has one known sequence length."""
    pool = ctx.tensors.x_test[:BENCHMARK_POOL]
    if isinstance(pool, NamedInputs):
        pool = pool.at_length(sequence_length(ctx))
    return pool


def _time_rows(rows: list[Row], config: RunConfig) -> list[dict]:
    """Every row at every batch size, in ``--rounds`` interleaved rounds, with a progress bar."""
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
    return latencies


def build_report(ctx: RunContext, requested: RunConfig, students: Students, exported: Exported, diagnostics: dict,
                 bench: Benchmark, extras: dict) -> dict:
    """``report.json``'s content, assembled here and nowhere else (DESIGN.md, Benchmark and report).

    ``requested`` is the run's options as given (a tuned run trains under ``students.config``, its choice);
    ``extras`` holds what the pipeline measured around the steps: ``bias_fix``, ``transfer_fit`` of the student
    and of the baseline, and ``seconds_total``."""
    config = students.config
    transfer = students.transfer
    warnings_ = report_warnings(config, diagnostics, exported, bench) + speed_warnings(ctx.student_selection,
                                                                                        bench.measured, config)
    pareto = _draw_pareto(ctx, bench.measured, warnings_)
    transfer_error = (diagnostics.get("transfer") or {}).get("accuracy")
    evidence = {"val_examples": int((ctx.tensors.y_val >= 0).sum()), "spec": config.student,
                "selection": ctx.student_selection,
                "transfer_error": None if transfer_error is None else 1.0 - transfer_error}
    text = headline(bench.measured, config.target, students.training, config.epochs, config.precision, bench.gain,
                    diagnostics.get("warnings"), evidence)
    selection = ctx.student_selection or {}
    if requested.student == "auto" and selection.get("why"):
        text += f" The student was chosen by measurement: {selection['why']}."
    if students.tuning is not None:
        text += f" {students.tuning['explanation']}"
    transfer_info = dict(transfer.info)
    if isinstance(transfer.teacher, (ViewLogits, VariantLogits)):  # an augmenting recipe's view cache
        transfer_info["view_cache"] = transfer.teacher.describe()
    baseline = None
    if students.baseline is not None:
        baseline = {"spec": config.student, "loss": "hard-label cross-entropy",
                    "training": students.baseline.training.to_dict(),
                    "transfer_fit": extras["baseline_transfer_fit"]}
    y_test = ctx.tensors.y_test.numpy()
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": config.command,
        "config": requested.to_dict(),  # the options as given; a tuned run's choice is in "tuning"
        "environment": {**environment(), "distributed": ctx.world.describe()},
        "seed": config.seed,
        "teacher": ctx.ensemble.describe(),
        "data": {**ctx.dataset.describe(), "normalisation": ctx.normalisation},
        "diagnostics": diagnostics,
        "teacher_cache": ctx.teacher.cache,
        "transfer_set": transfer_info,
        "tuning": students.tuning,
        "student": {"spec": config.student, "parameters": parameter_count(students.student),
                    "selection": ctx.student_selection, "training": students.training.to_dict(),
                    "loss": {"soft_term": config.loss, "temperature": config.temperature,
                             "alpha": transfer.info.get("alpha", config.alpha),
                             **({"beta": config.beta} if config.loss == "dkd" else {})},
                    "bias_fix": extras["bias_fix"], "transfer_fit": extras["student_transfer_fit"]},
        "baseline": baseline,
        "budget": extras.get("budget"),
        "specialists": None if students.from_generalist is None else specialist_summary(
            ctx.ensemble, ctx.teacher.test, bench.rows, y_test, students.from_generalist, config.seed),
        "export": exported.artifact.to_dict(),
        "runner": {"name": exported.runner.name, **exported.runner.info},
        "parity": exported.parity.to_dict(),
        "ensemble_export": exported.ensemble_export,
        "best_member_export": exported.member_export,
        "benchmark": {"device": bench.device, "batch_sizes": list(config.batch_sizes), "warmup_s": config.warmup_s,
                      "duration_s": config.duration_s, "rounds": config.rounds, "pool": bench.pool,
                      "sequence_length": sequence_length(ctx),
                      "split": "test", "examples": len(y_test)},
        "rows": bench.measured,
        "pareto": None if pareto is None else pareto.name,
        "verdict": bench.gain,
        "headline": text,
        "warnings": warnings_,
        "seconds_total": extras["seconds_total"],
    }


def report_warnings(config: RunConfig, diagnostics: dict, exported: Exported, bench: Benchmark) -> list[str]:
    """Everything a reader should doubt: the diagnostics' warnings, an ensemble or best member not run on the target,
    timings not to trust, a reduced precision slower than fp32, and an ensemble within the noise of its baseline."""
    warnings_ = list(diagnostics.get("warnings", []))
    member = exported.member_export
    for summary, what, without in ((exported.ensemble_export, "the ensemble",
                                    "the headline compares with the ensemble in PyTorch eager only"),
                                   (member, f"the best member ({member['member']})" if member else "",
                                    "the report cannot say whether the student beats shipping it alone")):
        if summary and not summary["exported"]:
            warnings_.append(f"{what} was not run on {config.target} ({summary['reason']}), so {without}")
        elif summary and not summary["parity"]["passed"]:
            warnings_.append(f"{what}'s {config.target} export failed its parity check "
                             f"({'; '.join(summary['parity']['failures'])}); its row is left out")
    warnings_ += timing_warnings(bench.measured, config.rounds) + precision_warnings(bench.measured, config.target,
                                                                                    config.precision)
    gain = bench.gain
    if gain is not None and not gain["measurable"]:
        warnings_.append(f"the same-budget hard-label baseline ({gain['baseline_top1']:.2%}) is within the noise of "
                         f"the ensemble ({gain['ensemble_top1']:.2%}) on {gain['examples']:,} test rows: there is "
                         f"no measurable gain for distillation to keep (a stronger ensemble, or more test data to "
                         f"tell the two apart, would change that)")
    return warnings_


def speed_warnings(selection: dict | None, measured: list[dict], config: RunConfig) -> list[str]:
    """--student auto priced its candidates against the best member; when this run's own benchmark (longer, in
    interleaved rounds) puts the student below the speed-up the choice asked for, say so with both figures."""
    constraint = (selection or {}).get("constraint") or {}
    if not constraint.get("reference_ms") or constraint["max_latency_ms"] is not None or \
            constraint["max_params"] is not None:  # an absolute limit asked for no speed-up
        return []
    rows = {row["kind"]: row for row in measured
            if row["backend"] == config.target and row["precision"] == "fp32" and row["kind"] in ("member", "student")}
    if len(rows) < 2 or "1" not in rows["student"]["latency"] or "1" not in rows["member"]["latency"]:
        return []
    benchmarked = rows["member"]["latency"]["1"]["median_ms"] / rows["student"]["latency"]["1"]["median_ms"]
    chosen = next((row for row in selection["candidates"] if row["spec"] == selection.get("chosen")), {})
    asked = constraint["min_speedup"]
    if benchmarked >= asked or not chosen.get("latency_ms"):
        return []
    priced = constraint["reference_ms"] / chosen["latency_ms"]
    return [f"the choice priced the student {priced:.1f}× faster than the best member at batch 1, but this "
            f"benchmark measures {benchmarked:.1f}×, below the {asked:g}× asked (--min-speedup): batch-1 calls of "
            f"well under a millisecond move by tens of percent with what the machine ran just before; rerun the "
            f"benchmark on an idle machine, or ask for more (--min-speedup) or an absolute --max-latency-ms"]


def _draw_pareto(ctx: RunContext, measured: list[dict], warnings_: list[str]):
    """pareto.png in --out (None, with a warning, where matplotlib is missing)."""
    try:
        return plot_pareto(measured, ctx.config.output_dir() / "pareto.png",
                           title=f"{ctx.dataset.name}: test accuracy against batch-1 latency")
    except ImportError:  # a GPU image without the CPU set-up's plotting dependency
        warnings_.append("pareto.png was not drawn: matplotlib is not installed (pip install matplotlib)")
        return None


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


def environment() -> dict:
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
