"""``compress``: turn arguments into a RunConfig and call the pipeline (and, for runs started from Python, a RunConfig
back into the ``compress`` line that builds it). No other logic lives here.

Errors a user can fix (``CompressorError``) print one line and exit non-zero (2 for a missing GPU or package);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from compressor import __version__
from compressor.config import PRECISIONS, RunConfig, SpecialistsConfig
from compressor.core.errors import CompressorError
from compressor.training.halving import DEFAULT_TUNE_MINUTES

TARGET_CHOICES = ["onnxruntime", "onnx", "tensorrt", "torch-tensorrt"]
stdout = Console()
stderr = Console(stderr=True)


def _parse_batch_sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,64") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give comma-separated positive integers, e.g. 1,64")
    return sizes


def _parse_normalise(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        mean, std = value.split("/")
        return tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give MEAN/STD with one comma-separated value per channel, "
                                 f"e.g. 0.286/0.353 or 0.485,0.456,0.406/0.229,0.224,0.225") from None


def job_options(func):
    """The options shared by the main job and ``compress demo``."""
    options = [
        click.option("--target", type=click.Choice(TARGET_CHOICES), default="onnxruntime", show_default=True,
                     help="Export target."),
        click.option("--data", default=None, help="digits | IDX folder | file.npz (default: the ensemble's hint)."),
        click.option("--student", default=RunConfig.student, show_default=True,
                     help="Student spec, e.g. mlp:800x800, cnn:16x32, from-teacher:0.25."),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Output folder (default ./compressed/<teacher-stem>-<target>)."),
        click.option("--temperature", "-T", type=float, default=RunConfig.temperature, show_default=True),
        click.option("--alpha", type=float, default=RunConfig.alpha, show_default=True,
                     help="Weight of the soft-target term; 1 - alpha weighs the hard labels."),
        click.option("--epochs", type=int, default=RunConfig.epochs, show_default=True),
        click.option("--batch-size", type=int, default=RunConfig.batch_size, show_default=True),
        click.option("--lr", type=float, default=RunConfig.lr, show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="Precision of the export: fp16 converts the graph, int8 quantizes it (QDQ) calibrated on "
                          "the transfer set."),
        click.option("--max-accuracy-drop", type=float, default=RunConfig.max_accuracy_drop, show_default=True,
                     help="int8 parity gate: the most test accuracy, in points, the export may lose to PyTorch."),
        click.option("--seed", type=int, default=RunConfig.seed, show_default=True),
        click.option("--normalise", callback=_parse_normalise, default=None, metavar="MEAN/STD",
                     help="Per-channel normalisation applied before the teachers, e.g. 0.286/0.353 "
                          "(overrides the ensemble's metadata)."),
        click.option("--max-train", type=int, default=None, help="Cap each split at N examples (quick runs)."),
        click.option("--resume", is_flag=True, help="Continue from <out>/checkpoints/last.pt."),
        click.option("--batch-sizes", callback=_parse_batch_sizes, default="1,64", show_default=True,
                     help="Batch sizes to benchmark, e.g. 1,8,64,256."),
        click.option("--warmup", type=float, default=RunConfig.warmup_s, show_default=True,
                     help="Benchmark warm-up seconds per row and batch size."),
        click.option("--duration", type=float, default=RunConfig.duration_s, show_default=True,
                     help="Benchmark seconds per row and batch size, split over the rounds."),
        click.option("--rounds", type=click.IntRange(min=1), default=RunConfig.rounds, show_default=True,
                     help="Interleaved benchmark rounds; the report flags figures whose rounds disagree by >10%."),
        click.option("--baseline", is_flag=True,
                     help="Also train the student's architecture on the hard labels alone (same budget), so the "
                          "report shows what the teachers add."),
        click.option("--teacher-cache", type=click.Path(path_type=Path), default=None,
                     help="Folder of the teacher-logit cache (default $COMPRESSOR_CACHE_DIR or "
                          "~/.cache/compressor/teacher-logits): teachers run once per teacher file, data and "
                          "preprocessing, and later runs reuse their logits."),
        click.option("--no-cache", is_flag=True,
                     help="Run the teachers on every training batch instead of caching their logits."),
        click.option("--refresh-teacher-cache", is_flag=True, help="Recompute and replace this run's cache entry."),
        click.option("--recipe", type=click.Choice(["hinton", "consistent", "function-matching", "auto"]),
                     default=RunConfig.recipe, show_default=True,
                     help="hinton: the paper; consistent: teachers see the student's augmented view; "
                          "function-matching: mixed pairs of inputs, alpha 1 (Beyer et al. 2022); auto: "
                          f"--tune with {DEFAULT_TUNE_MINUTES:g} minutes unless --tune says otherwise."),
        click.option("--tune", type=float, default=None, metavar="MINUTES",
                     help="Search recipe, T, alpha, lr and epochs on validation by successive halving in about "
                          "this many minutes, with the hard-label baseline tuned alike; the report prints the "
                          "command that reruns the choice."),
        click.option("--tune-trials", type=click.IntRange(min=1), default=None, metavar="N",
                     help="With --tune or --recipe auto: N configurations per family instead of as many as the "
                          "budget fits, so the search itself is the same on any machine."),
        click.option("--unlabeled", is_flag=True,
                     help="Ignore the transfer set's labels: train on the soft targets alone (alpha 1)."),
        click.option("--omit-classes", default=None, metavar="CLASSES",
                     help="Leave these classes out of the transfer set, e.g. 3 or dress,coat (paper §3)."),
        click.option("--bias-fix", default=RunConfig.bias_fix, show_default=True, metavar="auto|none|FLOAT",
                     help="With --omit-classes: raise the omitted classes' output biases by the amount that "
                          "maximises validation accuracy (auto), not at all, or by FLOAT."),
        click.option("--amp", type=click.Choice(["none", "bf16"]), default=RunConfig.amp, show_default=True,
                     help="Mixed precision while training: bf16 autocasts the student's forward pass."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=RunConfig.device,
                     show_default=True, help="Where the student trains (auto: CUDA when present)."),
        click.option("--ort-provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]),
                     default=RunConfig.ort_provider, show_default=True,
                     help="ONNX Runtime execution provider for --target onnxruntime/onnx (auto: CUDA when "
                          "onnxruntime-gpu has it, else CPU; tensorrt: its TensorRT provider, engines cached)."),
        click.option("--threads", type=int, default=None, help="Intra-op threads for PyTorch and ONNX Runtime."),
        click.option("--no-progress", is_flag=True, help="No progress bars."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def _config(teacher: Path, options: dict, **overrides) -> RunConfig:
    return RunConfig(
        teacher=teacher, target=options["target"], data=options["data"], student=options["student"],
        out=options["out"], temperature=options["temperature"], alpha=options["alpha"], epochs=options["epochs"],
        batch_size=options["batch_size"], lr=options["lr"], precision=options["precision"], seed=options["seed"],
        max_accuracy_drop=options["max_accuracy_drop"],
        normalise=options["normalise"], max_train=options["max_train"], resume=options["resume"],
        batch_sizes=options["batch_sizes"], warmup_s=options["warmup"], duration_s=options["duration"],
        rounds=options["rounds"], baseline=options["baseline"], teacher_cache=options["teacher_cache"],
        no_cache=options["no_cache"], refresh_teacher_cache=options["refresh_teacher_cache"],
        unlabeled=options["unlabeled"], omit_classes=options["omit_classes"], bias_fix=options["bias_fix"],
        amp=options["amp"], device=options["device"], ort_provider=options["ort_provider"],
        recipe=options["recipe"], tune=options["tune"], tune_trials=options["tune_trials"],
        threads=options["threads"], progress=not options["no_progress"],
        command=shlex.join(["compress", *click.get_current_context().find_root().obj["argv"]]), **overrides)


# RunConfig field -> its ``compress`` option, for command_line; fields a user cannot set there are absent
_FLAGS = {"trust_pickle": "--trust-pickle", "resume": "--resume", "baseline": "--baseline", "no_cache": "--no-cache",
          "refresh_teacher_cache": "--refresh-teacher-cache", "unlabeled": "--unlabeled"}
_VALUES = {"target": "--target", "data": "--data", "student": "--student", "out": "--out",
           "temperature": "--temperature", "alpha": "--alpha", "epochs": "--epochs", "batch_size": "--batch-size",
           "lr": "--lr", "precision": "--precision", "max_accuracy_drop": "--max-accuracy-drop", "seed": "--seed",
           "normalise": "--normalise", "max_train": "--max-train", "batch_sizes": "--batch-sizes",
           "warmup_s": "--warmup", "duration_s": "--duration", "rounds": "--rounds", "teacher_cache": "--teacher-cache",
           "omit_classes": "--omit-classes", "bias_fix": "--bias-fix", "amp": "--amp", "device": "--device",
           "ort_provider": "--ort-provider", "recipe": "--recipe", "tune": "--tune", "tune_trials": "--tune-trials",
           "threads": "--threads"}


def command_line(config: RunConfig) -> str:
    """The ``compress`` line that builds exactly ``config`` (its ``command`` aside): for a run started from Python,
    such as the benchmarks', so its report prints a command a user can paste, and tuning's rerun lines are too.

    Raises ValueError for a setting the CLI does not offer (weight_decay, extra)."""
    default = RunConfig(teacher=config.teacher)
    for name in ("weight_decay", "extra"):
        if getattr(config, name) != getattr(default, name):
            raise ValueError(f"compress has no option for {name}; this config cannot be written as a command")
    words = ["compress", "--teacher", str(config.teacher)]
    words += [option for name, option in _FLAGS.items() if getattr(config, name)]
    for name, option in _VALUES.items():
        value = getattr(config, name)
        if value is None or value == getattr(default, name):
            continue
        if name == "batch_sizes":
            value = ",".join(map(str, value))
        elif name == "normalise":
            value = "/".join(",".join(map(repr, part)) for part in value)
        words += [option, str(value)]
    if not config.progress:
        words.append("--no-progress")
    return shlex.join(words)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="compressor")
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="Teacher ensemble: save_ensemble archive, ensemble.toml, .onnx (or .pt2 with --trust-pickle).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow a pickled teacher or a torch.export .pt2 member (loading them unpickles, which can run "
                   "arbitrary code).")
@job_options
@click.pass_context
def cli(ctx: click.Context, teacher: Path | None, trust_pickle: bool, **options) -> None:
    """Distil a teacher ensemble into a compact student, export it, and report the trade.

    \b
    compress --teacher ensemble.pt --target onnxruntime
    compress demo                  # a small digits ensemble, end to end, in about a minute
    compress inspect ensemble.pt   # members, parameters, shapes, classes
    compress preflight model.onnx  # will it build with TensorRT? (no GPU needed)
    compress specialists --generalist g.pt --num-specialists 2 --out spec/   # paper §5
    """
    if ctx.invoked_subcommand is not None:
        return
    if teacher is None:
        raise click.UsageError("--teacher is required (or run 'compress demo' to try the whole job)")
    _run_and_summarise(_config(teacher, options, trust_pickle=trust_pickle))


@cli.command()
@job_options
def demo(**options) -> None:
    """Train a small teacher ensemble on scikit-learn's 8×8 digits, then run the main job on it."""
    from compressor.demo import build_demo_teachers

    if options["data"] not in (None, "digits"):
        raise click.UsageError("the demo runs on --data digits only")
    out = options["out"] or Path("compressed") / "demo"
    options = {**options, "out": out, "data": "digits"}
    stderr.print(f"[bold]demo[/] training 3 teachers on digits -> {out / 'teachers'}")
    teacher = build_demo_teachers(out / "teachers", seed=options["seed"], progress=not options["no_progress"])
    _run_and_summarise(_config(teacher, options))


@cli.command()
@click.argument("teacher", type=click.Path(path_type=Path))
@click.option("--data", default=None, help="Score the members and the ensemble on this data's test split.")
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled teacher.")
@click.option("--max-train", type=int, default=None, help="Cap each split at N examples.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(teacher: Path, data: str | None, trust_pickle: bool, max_train: int | None, debug: bool) -> None:
    """Print an ensemble's members, parameters, input shape and classes (and accuracy with --data)."""
    from compressor.inspect import inspect_ensemble

    inspect_ensemble(teacher, data, trust_pickle, max_train, stdout)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def preflight(model: Path, debug: bool) -> None:
    """Check an ONNX file against TensorRT's ONNX parser without a GPU: will it build, or which node will not."""
    from targets.tensorrt_preflight import preflight as check

    result = check(model)
    stdout.print(result.summary(), highlight=False, soft_wrap=True)
    if not result.ok:
        raise click.exceptions.Exit(1)


@cli.command()
@click.option("--generalist", type=click.Path(path_type=Path), required=True,
              help="The generalist: any teacher file compress accepts (one model or an ensemble).")
@click.option("--data", default=None, help="digits | IDX folder | file.npz (default: the generalist's hint).")
@click.option("--num-specialists", "-M", type=int, required=True, help="How many specialists to train.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output folder: ensemble.pt, summary.json, specialists/<m>/ (checkpoints, logs).")
@click.option("--subsets", default=None, metavar="'A,B;C,D'",
              help="The specialists' classes by name or index, ';' between specialists (default: found by "
                   "K-means on the covariance of the generalist's predictions).")
@click.option("--clusters", type=int, default=None,
              help="K-means clusters of classes (default specialists + 1); the most confused become the subsets.")
@click.option("--top-n", type=int, default=SpecialistsConfig.top_n, show_default=True,
              help="The generalist's top-n classes select the specialists active for an input.")
@click.option("--jobs", "-j", type=int, default=SpecialistsConfig.jobs, show_default=True,
              help="Specialists trained at once, one process each.")
@click.option("--epochs", type=int, default=SpecialistsConfig.epochs, show_default=True)
@click.option("--batch-size", type=int, default=SpecialistsConfig.batch_size, show_default=True)
@click.option("--lr", type=float, default=SpecialistsConfig.lr, show_default=True)
@click.option("--seed", type=int, default=SpecialistsConfig.seed, show_default=True)
@click.option("--max-train", type=int, default=None, help="Cap each split at N examples (quick runs).")
@click.option("--normalise", callback=_parse_normalise, default=None, metavar="MEAN/STD",
              help="Per-channel normalisation before the generalist (overrides its metadata).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled generalist.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def specialists(generalist: Path, out: Path, debug: bool, **options) -> None:
    """Build a specialist ensemble (paper §5): a generalist plus specialists for the classes it confuses,
    trained in parallel processes; the result, OUT/ensemble.pt, is a teacher for the main job."""
    from compressor.training.specialist_training import run_specialists

    config = SpecialistsConfig(teacher=generalist, out=out, **options,
                               command=shlex.join(["compress", *click.get_current_context().find_root().obj["argv"]]))
    summary = run_specialists(config, stderr)
    from targets.report import SPECIALIST_COLUMNS, specialist_rows

    table = Table(title="test split: generalist against generalist + specialists")
    for column in SPECIALIST_COLUMNS:
        table.add_column(column, justify="left" if column == "test rows" else "right")
    for cells in specialist_rows(summary["test"]):
        table.add_row(*cells)
    stdout.print(table)
    stdout.print(f"specialist ensemble in {summary['ensemble']}: pass it to compress --teacher; training took "
                 f"{summary['training_seconds']:.0f} s ({summary['specialist_seconds_sum']:.0f} s of specialist "
                 f"training in all)")


@cli.command()
def students() -> None:
    """List the registered student families."""
    from compressor.students import list_students

    for name in list_students():
        stdout.print(name)


def _run_and_summarise(config: RunConfig) -> None:
    from compressor.pipeline import run

    report = run(config, stderr)
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return
    table = Table(title="test split: accuracy and median latency")
    batches = list(report["rows"][0]["latency"])
    for column in ["model", "backend", "top-1", "agreement"] + [f"b{b} p50 ms" for b in batches]:
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for row in report["rows"]:
        acc = row["accuracy"]
        table.add_row(row["model"], row["backend"], _percent(acc["top1"]), _percent(acc["agreement"]),
                      *[f"{row['latency'][b]['median_ms']:.3f}" for b in batches])
    stdout.print(table)
    stdout.print(report["headline"])
    for warning in report["warnings"]:
        stderr.print(f"[yellow]warning:[/] {warning}", highlight=False)
    stdout.print(f"artifacts in {config.output_dir()}: report.md, report.json, pareto.png, student.pt, export/, "
                 f"ensemble-export/, bundle/")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and turn project errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        code = cli.main(args=args, prog_name="compress", standalone_mode=False, obj={"argv": list(args)})
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except CompressorError as exc:
        if debug:
            raise
        stderr.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C into Abort
        stderr.print("interrupted: finished epochs are kept in <out>/checkpoints; rerun with --resume to continue")
        return 130
    except Exception as exc:  # a bug, not bad input: say so in one line unless --debug
        if debug:
            raise
        stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}; rerun with --debug for the "
                     f"traceback and report it", highlight=False, soft_wrap=True)
        return 1
    return code if isinstance(code, int) else 0  # standalone_mode=False returns ctx.exit codes


if __name__ == "__main__":
    sys.exit(main())
