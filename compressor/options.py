"""The main job's options: the tables of ``compress`` flags (inputs, the student and its training, benchmark and
export) with their defaults from :class:`compressor.config.RunConfig`, the RunConfig they build, and
:func:`command_line`, the inverse, which writes a RunConfig back as the ``compress`` line that builds it."""

from __future__ import annotations

import difflib
import functools
import shlex
from pathlib import Path

import click

from compressor.config import LOSSES, PRECISIONS, RunConfig
from compressor.core.errors import OptionError
from compressor.training.halving import DEFAULT_TUNE_MINUTES

TARGET_CHOICES = ["onnxruntime", "onnx", "tensorrt", "torch-tensorrt"]


def parse_batch_sizes(ctx, param, value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,64") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r}: give comma-separated positive integers, e.g. 1,64")
    return sizes


def parse_normalise(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        mean, std = value.split("/")
        return tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give MEAN/STD with one comma-separated value per channel, "
                                 f"e.g. 0.286/0.353 or 0.485,0.456,0.406/0.229,0.224,0.225") from None


# The main job's options, in the groups --help lists them: inputs, the student and its training, benchmark and
# export. Tables of options, not logic.
_INPUT_OPTIONS = [
        click.option("--target", type=click.Choice(TARGET_CHOICES), default="onnxruntime", show_default=True,
                     help="Export target."),
        click.option("--data", default=None,
                     help="digits | image folder (DIR/train/<class>/*.png) | hf:DIR (save_to_disk) | "
                          "parquet:GLOB | IDX folder | file.npz (default: the ensemble's hint)."),
        click.option("--channels", type=click.IntRange(min=1), default=None,
                     help="Image folders: 1 (grayscale) or 3 (RGB) (default: the teachers' recorded input, else the "
                          "images' own modes, checked by running a teacher)."),
        click.option("--resize", type=int, default=None, metavar="PIXELS",
                     help="Image folders: resize the shorter side to PIXELS (bilinear)."),
        click.option("--crop", type=int, default=None, metavar="PIXELS",
                     help="Image folders: then crop a centred PIXELS x PIXELS square."),
        click.option("--input-columns", default=None, metavar="COLUMNS",
                     help="hf: / parquet: data: the image column (default: its first column of Image type), or "
                          "the token columns of pre-tokenised text, e.g. input_ids,attention_mask (default: those "
                          "of input_ids, attention_mask, token_type_ids present)."),
        click.option("--label-column", default=None, metavar="COLUMN",
                     help="hf: / parquet: data: the label column (default: label, when there is one)."),
        click.option("--on-bad-image", type=click.Choice(["stop", "skip"]), default=RunConfig.on_bad_image,
                     show_default=True, help="Image folders: an image that cannot be read stops the run or is "
                                             "left out (and counted in the report)."),
]
_TRAINING_OPTIONS = [
        click.option("--student", default=RunConfig.student, show_default=True,
                     help="Student spec, e.g. mlp:800x800, cnn:16x32, from-teacher:0.25, timm:resnet18, "
                          "torchvision:mobilenet_v3_small (compress students lists them); auto: candidates of every "
                          "family that fits the data, timed on --target, screened by distillation on validation; "
                          "cnn / mlp: the largest of that family within --student-budget."),
        click.option("--student-budget", type=float, default=RunConfig.student_budget, show_default=True,
                     help="--student cnn / mlp: at most this share of the median teacher member's multiply-adds."),
        click.option("--min-speedup", type=float, default=RunConfig.min_speedup, show_default=True,
                     help="--student auto: candidates at least this many times faster than the best member at "
                          "batch 1 on --target (replaced by --max-latency-ms / --max-params when given)."),
        click.option("--max-params", type=int, default=None,
                     help="--student auto / cnn / mlp: at most this many parameters."),
        click.option("--max-latency-ms", type=float, default=None,
                     help="--student auto / cnn / mlp: at most this many milliseconds per batch-1 call on --target "
                          "(each candidate is exported and timed there)."),
        click.option("--screen-trials", type=click.IntRange(min=1), default=None, metavar="N",
                     help="--student auto: screen N candidates in full instead of as many as the budget fits, so "
                          "the choice does not depend on the machine's speed."),
        click.option("--budget", type=float, default=RunConfig.budget, show_default=True, metavar="MINUTES",
                     help="Minutes of training for the whole run: choosing the student, distilling it and its "
                          "baseline, tuning; without --epochs, the epochs are as many as it buys (at most 30, or "
                          "3,000 optimiser steps where that is more)."),
        click.option("--student-weights", type=click.Path(path_type=Path), default=None,
                     help="Initialise the student from a .safetensors file: every tensor whose name and shape "
                          "match (a classifier head for other classes stays fresh)."),
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Output folder (default ./compressed/<teacher-stem>-<target>)."),
        click.option("--temperature", "-T", type=float, default=RunConfig.temperature, show_default=True),
        click.option("--alpha", type=float, default=RunConfig.alpha, show_default=True,
                     help="Weight of the soft-target term; 1 - alpha weighs the hard labels."),
        click.option("--loss", type=click.Choice(LOSSES), default=RunConfig.loss, show_default=True,
                     help="The soft-target term: kd (Hinton et al.), dkd (decoupled KD), ls (KD on standardised "
                          "logits), dist (DIST's correlations); docs/kernels.md."),
        click.option("--beta", type=click.FloatRange(min=0), default=RunConfig.beta, show_default=True,
                     help="--loss dkd: the weight on the non-target classes."),
        click.option("--epochs", type=int, default=None,
                     help="Epochs of the student's training (default: as many as --budget buys, at most 30 or "
                          "3,000 optimiser steps, whichever is more)."),
        click.option("--batch-size", type=int, default=RunConfig.batch_size, show_default=True),
        click.option("--lr", type=float, default=RunConfig.lr, show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
                     help="Precision of the export: fp16 converts the graph, int8 quantizes it (QDQ) calibrated on "
                          "the transfer set."),
        click.option("--max-accuracy-drop", type=float, default=RunConfig.max_accuracy_drop, show_default=True,
                     help="int8 parity gate: the most test accuracy, in points, the export may lose to PyTorch."),
        click.option("--seed", type=int, default=RunConfig.seed, show_default=True),
        click.option("--normalise", callback=parse_normalise, default=None, metavar="MEAN/STD",
                     help="Per-channel normalisation applied before the teachers, e.g. 0.286/0.353 "
                          "(overrides the ensemble's metadata)."),
        click.option("--max-train", type=int, default=None, help="Cap each split at N examples (quick runs)."),
        click.option("--resume", is_flag=True, help="Continue from <out>/checkpoints/last.pt."),
]
_OTHER_OPTIONS = [
        click.option("--batch-sizes", callback=parse_batch_sizes, default="1,64", show_default=True,
                     help="Batch sizes to benchmark, e.g. 1,8,64,256."),
        click.option("--seq-len", type=click.IntRange(min=1), default=None, metavar="TOKENS",
                     help="Text models: the sequence length the benchmark times (default: the data's median)."),
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
        click.option("--teacher-precision", type=click.Choice(["fp32", "bf16"]), default=RunConfig.teacher_precision,
                     show_default=True,
                     help="bf16: run the PyTorch teachers under bfloat16 autocast on --device (faster on GPUs "
                          "with bf16 tensor cores; logits are stored float32, and the cache keys them apart)."),
        click.option("--cache-top-k", type=click.IntRange(min=1), default=None,
                     help="Cache only each member's K largest transfer-set logits per row and the rest's "
                          "log-sum-exp (for many classes: 1000 classes at K=20 is ~16x less disk); the loss reads "
                          "rows rebuilt from them."),
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
        click.option("--teachers-saw-val", is_flag=True,
                     help="The teachers trained on the validation rows (e.g. on a whole official training set): fit "
                          "and judge them on half of the test split (detected when validation beats test clearly)."),
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


def job_options(func):
    """The options shared by the main job and ``compress demo``."""
    options = _INPUT_OPTIONS + _TRAINING_OPTIONS + _OTHER_OPTIONS
    return functools.reduce(lambda f, option: option(f), reversed(options), func)


def option_table() -> dict[str, click.Option]:
    """The main job's options by their Python names (``budget``, ``batch_sizes``, ``no_progress``, ...): the one
    table the ``compress`` command and :func:`compressor.compress` both read."""
    def holder():
        """Only here to collect the options' decorators."""
    job_options(holder)
    return {param.name: param for param in holder.__click_params__}


def options_from_kwargs(given: dict) -> dict:
    """``compressor.compress(**options)`` as the ``compress`` command would have parsed them: every option of
    :func:`option_table`, the given ones converted and checked by their click types and callbacks (a tuple
    ``batch_sizes`` or ``normalise`` as the flag's text), the others at their defaults. An unknown name or a bad
    value raises OptionError naming it."""
    table = option_table()
    unknown = sorted(set(given) - set(table))
    if unknown:
        close = difflib.get_close_matches(unknown[0], table, n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; the options are {', '.join(sorted(table))}"
        raise OptionError(f"compress() got an unknown option {unknown[0]!r}{hint}")
    ctx = click.Context(click.Command("compress", params=list(table.values())))
    values = {}
    for name, param in table.items():
        value = _as_flag_text(name, given[name]) if name in given else param.get_default(ctx)
        try:
            values[name] = param.process_value(ctx, value)
        except click.BadParameter as exc:
            raise OptionError(f"compress() option {name}={given.get(name)!r}: {exc.format_message()}") from None
    return values


def _as_flag_text(name: str, value):
    """A Python value of an option whose flag takes text (``batch_sizes=(1, 64)``, ``normalise=((m,), (s,))``)."""
    if name == "batch_sizes" and isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    if name == "normalise" and isinstance(value, (tuple, list)) and len(value) == 2:
        return "/".join(",".join(map(repr, map(float, part))) for part in value)
    return value


def config_from_options(teacher: Path, options: dict, **overrides) -> RunConfig:
    """The RunConfig of the main job's options (as :func:`job_options` parses them); ``command`` defaults to the
    ``compress`` line being run."""
    if "command" not in overrides:
        overrides["command"] = shlex.join(["compress", *click.get_current_context().find_root().obj["argv"]])
    return RunConfig(
        teacher=teacher, target=options["target"], data=options["data"], student=options["student"],
        out=options["out"], temperature=options["temperature"], alpha=options["alpha"], epochs=options["epochs"],
        loss=options["loss"], beta=options["beta"],
        batch_size=options["batch_size"], lr=options["lr"], precision=options["precision"], seed=options["seed"],
        max_accuracy_drop=options["max_accuracy_drop"],
        normalise=options["normalise"], max_train=options["max_train"], resume=options["resume"],
        student_weights=options["student_weights"], student_budget=options["student_budget"],
        max_params=options["max_params"], max_latency_ms=options["max_latency_ms"],
        min_speedup=options["min_speedup"], screen_trials=options["screen_trials"], budget=options["budget"],
        channels=options["channels"], resize=options["resize"],
        crop=options["crop"], on_bad_image=options["on_bad_image"], input_columns=options["input_columns"],
        label_column=options["label_column"], seq_len=options["seq_len"],
        batch_sizes=options["batch_sizes"], warmup_s=options["warmup"], duration_s=options["duration"],
        rounds=options["rounds"], baseline=options["baseline"], teacher_cache=options["teacher_cache"],
        no_cache=options["no_cache"], refresh_teacher_cache=options["refresh_teacher_cache"],
        cache_top_k=options["cache_top_k"], teacher_precision=options["teacher_precision"],
        unlabeled=options["unlabeled"], teachers_saw_val=options["teachers_saw_val"],
        omit_classes=options["omit_classes"], bias_fix=options["bias_fix"],
        amp=options["amp"], device=options["device"], ort_provider=options["ort_provider"],
        recipe=options["recipe"], tune=options["tune"], tune_trials=options["tune_trials"],
        threads=options["threads"], progress=not options["no_progress"], **overrides)


# RunConfig field -> its ``compress`` option, for command_line; fields a user cannot set there are absent
_FLAGS = {"trust_pickle": "--trust-pickle", "resume": "--resume", "baseline": "--baseline", "no_cache": "--no-cache",
          "refresh_teacher_cache": "--refresh-teacher-cache", "unlabeled": "--unlabeled",
          "teachers_saw_val": "--teachers-saw-val"}
_VALUES = {"target": "--target", "data": "--data", "student": "--student", "out": "--out",
           "temperature": "--temperature", "alpha": "--alpha", "loss": "--loss", "beta": "--beta",
           "epochs": "--epochs", "batch_size": "--batch-size",
           "lr": "--lr", "precision": "--precision", "max_accuracy_drop": "--max-accuracy-drop", "seed": "--seed",
           "normalise": "--normalise", "max_train": "--max-train", "batch_sizes": "--batch-sizes",
           "warmup_s": "--warmup", "duration_s": "--duration", "rounds": "--rounds", "teacher_cache": "--teacher-cache",
           "cache_top_k": "--cache-top-k", "student_budget": "--student-budget", "max_params": "--max-params",
           "max_latency_ms": "--max-latency-ms", "min_speedup": "--min-speedup", "screen_trials": "--screen-trials",
           "budget": "--budget", "teacher_precision": "--teacher-precision",
           "omit_classes": "--omit-classes", "bias_fix": "--bias-fix", "amp": "--amp", "device": "--device",
           "ort_provider": "--ort-provider", "recipe": "--recipe", "tune": "--tune", "tune_trials": "--tune-trials",
           "threads": "--threads", "student_weights": "--student-weights", "channels": "--channels",
           "resize": "--resize", "crop": "--crop", "on_bad_image": "--on-bad-image", "input_columns": "--input-columns",
           "label_column": "--label-column", "seq_len": "--seq-len"}


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
