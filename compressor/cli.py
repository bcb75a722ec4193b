"""``compress``: turn arguments into a RunConfig (``compressor.options``, the table ``compressor.compress`` reads too)
and run it as ``compressor.compress`` does (``compressor.api.run_config``). No other logic lives here.

Errors a user can fix (``CompressorError``) print one line and exit non-zero (2 for a missing GPU or package);
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import shlex
import sys
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compressor import __version__
from compressor.config import RunConfig, SpecialistsConfig
from compressor.core.errors import CompressorError
from compressor.options import config_from_options, job_options, parse_normalise

# no emoji codes: a message quoting "--student cnn:abc: ..." must print ":abc:" as typed
stdout = Console(emoji=False)
stderr = Console(stderr=True, emoji=False)


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
    _run_and_summarise(config_from_options(teacher, options, trust_pickle=trust_pickle))


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
    _run_and_summarise(config_from_options(teacher, options))


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
@click.option("--normalise", callback=parse_normalise, default=None, metavar="MEAN/STD",
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
@click.option("--models", "family", default=None, metavar="FAMILY",
              help="List every model name a library family (timm, torchvision) accepts after the colon.")
def students(family: str | None) -> None:
    """List the registered student families (and, for timm and torchvision, how many models each can build)."""
    from compressor.students import list_students, student_catalogue

    if family is not None:
        for name in student_catalogue(family) or []:
            stdout.print(f"{family}:{name}")
        return
    for name in list_students():
        try:
            names = student_catalogue(name)
        except CompressorError as exc:
            stdout.print(f"{name}  (unavailable here: {exc})", highlight=False, soft_wrap=True, markup=False)
            continue
        note = "" if names is None else f"  {name}:NAME, any of {len(names)} models (compress students --models {name})"
        stdout.print(f"{name}{note}", highlight=False)


def _run_and_summarise(config: RunConfig) -> None:
    from compressor.api import run_config

    result = run_config(config, console=stderr)  # what compressor.compress runs too
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    report = result.report
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
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    stdout.print(f"artifacts in {config.output_dir()}: report.md, report.json, pareto.png, student.pt, export/, "
                 f"ensemble-export/, member-export/, bundle/")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI and turn project errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        with warnings.catch_warnings():
            # TorchScript is the safe teacher and student format (no pickle); torch's notice that torch.jit is
            # deprecated would add two lines to every run's output, and to every one-line error
            warnings.filterwarnings("ignore", message=r"`torch\.jit\..*` is deprecated", category=FutureWarning)
            code = cli.main(args=args, prog_name="compress", standalone_mode=False, obj={"argv": list(args)})
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except CompressorError as exc:
        if debug:
            raise
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):  # click turns Ctrl-C into Abort
        stderr.print("interrupted: finished epochs are kept in <out>/checkpoints; rerun with --resume to continue")
        return 130
    except Exception as exc:  # a bug, not bad input: say so in one line unless --debug
        if debug:
            raise
        stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}; rerun with --debug for the "
                     f"traceback and report it", highlight=False, soft_wrap=True)
        return 1
    return code if isinstance(code, int) else 0  # standalone_mode=False returns ctx.exit codes


if __name__ == "__main__":
    sys.exit(main())
