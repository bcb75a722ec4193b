"""The main job's checks between loading and the teachers' pass: every pairing of the options with the teachers,
the data and the built student (the recipe, --cache-top-k, the bias fix, the student on the data's most demanding
rows, --resume's checkpoints). The teachers' pass can take hours, so a run it reaches fails only in its own work;
the checks of the options alone, before anything is loaded, are ``pipeline.check_before_any_work``."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict

import torch
from torch import nn

from compressor.core.errors import CompressorError, first_line
from compressor.core.inputs import NamedInputs
from compressor.students.hf import check_fits_data, student_config
from compressor.students.registry import check_student_runs
from compressor.training.cached_logits import check_top_k
from compressor.training.checkpoints import check_compatible, check_fits, load_checkpoint
from compressor.training.context import RunContext
from compressor.training.distill import choose_student, resume_points
from compressor.training.loop import TrainConfig
from compressor.training.omitted_classes import apply_bias_shift
from compressor.training.recipes import check_recipe

PROBE_ROWS = 8  # rows of image or vector data the student is tried on (any row has the shape of all)


def check_before_teachers(ctx: RunContext) -> None:
    """Refuse, in one line, any pairing that would fail once the teachers ran. The student is built here from
    --student (and --student-weights) as training will build it, run on real rows and its head probed, then
    dropped: training builds its own from the seed."""
    config, dataset = ctx.config, ctx.dataset
    check_recipe(config.recipe, dataset.named_inputs, f"--data {dataset.source}")
    if config.cache_top_k is not None:
        check_top_k(config.cache_top_k, ctx.ensemble.num_classes)
    splits = {name: x for name, x in (("train", ctx.tensors.x_train), ("val", ctx.tensors.x_val),
                                      ("test", ctx.tensors.x_test)) if len(x)}
    if config.student == "auto":
        check_candidates(ctx, splits)
        return
    student = check_student(ctx, splits)
    if config.resume:
        check_resume(ctx, student)


def check_student(ctx: RunContext, splits: dict) -> nn.Module:
    """--student (and --student-weights) built as training will build it, run on the data's most demanding rows,
    and its head probed for --omit-classes' bias fix; returns it."""
    config = ctx.config
    if ctx.dataset.named_inputs:
        check_text_limits(ctx, splits)  # an hf: config against the data, before a model of it is built
    student = choose_student(config, ctx.ensemble, ctx.dataset)
    check_student_on_data(ctx, student, splits)
    if ctx.omitted and config.bias_fix != "none":
        try:
            apply_bias_shift(student, ctx.omitted, 0.0)  # a shift of 0: only whether there is a bias to shift
        except CompressorError as exc:
            raise CompressorError(f"--omit-classes with --bias-fix {config.bias_fix}: {exc}; or pass --bias-fix "
                                  f"none") from exc
    return student


def check_candidates(ctx: RunContext, splits: dict) -> None:
    """--student auto: every candidate that was built is checked as :func:`check_student` checks a given one
    (text: on the longest rows and largest ids; images and vectors ran on rows of their shape when priced, so only
    the bias fix is probed); one that fails is kept out of the choice with the reason, and when none is left the
    run stops with the first reason."""
    built = [row for row in ctx.student_selection["candidates"] if "skipped" not in row]
    for row in built if ctx.dataset.named_inputs or ctx.omitted else []:
        try:
            check_student(ctx.with_config(dataclasses.replace(ctx.config, student=row["spec"])), splits)
        except CompressorError as exc:
            row["skipped"] = first_line(exc)
    if not any("skipped" not in row for row in ctx.student_selection["candidates"]):
        reasons = [row["skipped"] for row in ctx.student_selection["candidates"]]
        raise CompressorError(f"--student auto: no candidate student fits --data {ctx.dataset.source} "
                              f"({reasons[0] if reasons else 'no candidates'}); give --student SPEC")


def check_text_limits(ctx: RunContext, splits: dict[str, NamedInputs]) -> None:
    """An hf: student's vocabulary, token types and positions against the largest ids and the longest row of
    every split (and --seq-len, the length the benchmark times): one line naming the config and the fix."""
    config = ctx.config
    found = student_config(config.student, ctx.ensemble.num_classes, ctx.ensemble.metadata.get("hf_config"))
    if found is None:
        return
    names = next(iter(splits.values())).names
    largest = {name: max(int(x.tensors[name].max()) for x in splits.values()) for name in names}
    longest = max(int(x.lengths.max()) for x in splits.values())
    check_fits_data(config.student, *found, f"--data {ctx.dataset.source}", largest,
                    max(longest, config.seq_len or 0))


def check_student_on_data(ctx: RunContext, student: nn.Module, splits: dict) -> None:
    """One forward pass of the student on real rows: the first rows of images or vectors; for text, each split's
    longest row and the rows holding the largest ids, and a row of --seq-len tokens (the benchmark's length)."""
    config, classes = ctx.config, ctx.ensemble.num_classes
    spec, data = config.student, f"--data {ctx.dataset.source}"
    if not ctx.dataset.named_inputs:
        check_student_runs(student, spec, ctx.tensors.x_train[:PROBE_ROWS], classes, f"the first rows of {data}")
        return
    for name, x in splits.items():
        check_student_runs(student, spec, extreme_rows(x), classes, f"the longest rows of {data} ({name} split)")
    if config.seq_len and config.seq_len > int(ctx.tensors.x_train.lengths.max()):
        check_student_runs(student, spec, ctx.tensors.x_train[:2].at_length(config.seq_len), classes,
                           f"rows of --seq-len {config.seq_len} tokens")


def extreme_rows(x: NamedInputs) -> NamedInputs:
    """The rows of ``x`` a text model is most likely to fail on: the longest, and the one holding the largest value
    of each input (the largest token id, token type id, ...)."""
    rows = {int(x.lengths.argmax())} | {int(t.amax(dim=1).argmax()) for t in x.tensors.values()}
    return x[torch.tensor(sorted(rows))]


def check_resume(ctx: RunContext, student: nn.Module) -> None:
    """--resume: each ``last.pt`` this run would continue from, read (weights only) and checked now: readable, a
    training checkpoint, written under these settings and this run's fingerprint as far as it is known, and
    holding weights of this student's shapes. A run without one starts fresh, as it always did."""
    defaults = asdict(TrainConfig())
    for path, settings, fingerprint in resume_points(ctx):
        if not path.exists():
            continue
        checkpoint = load_checkpoint(path)
        check_compatible(path, checkpoint, settings, fingerprint, defaults, partial=True)
        check_fits(path, checkpoint, student)
