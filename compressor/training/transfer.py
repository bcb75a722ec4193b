"""The main job's transfer set: what the student learns from, and the teachers' outputs it learns them from.

:func:`transfer_set` turns the training split into what one recipe trains on: labels kept or dropped
(--unlabeled), classes left out (--omit-classes, with the bias fix after training), the teachers' logits on the
plain rows or, for augmenting recipes, on each epoch's views (:mod:`compressor.training.view_cache`), and a
specialist ensemble's combination. :func:`check_views` scores the teachers on the recipe's views first.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from compressor.core.inference import predict_logits
from compressor.data.lazy import RowSubset
from compressor.training.context import RunContext
from compressor.training.omitted_classes import apply_bias_shift, fit_bias_shift, keep_rows
from compressor.training.recipes import Recipe, make_recipe, soft_weight
from compressor.training.cached_logits import CachedLogits
from compressor.teachers.ensemble import Ensemble
from compressor.training.view_cache import VariantLogits, ViewLogits, open_view_cache


@dataclass
class TransferSet:
    """What the student trains on: rows ``x``/``y`` (-1 = unlabeled), the teachers' logits for them, the labels
    that choose the best epoch on validation, the soft-term weight, and the classes left out."""

    x: torch.Tensor
    y: torch.Tensor
    teacher: object
    y_val: torch.Tensor
    alpha: float
    recipe: Recipe
    omitted: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)
    combine: str = "arithmetic"                  # how the loss mixes ``teacher``'s members
    weights: tuple[float, ...] | None = None
    generalist: object = None                    # a specialist ensemble's generalist alone, as ``teacher`` is read


def transfer_set(ctx: RunContext) -> TransferSet:
    """The rows the student learns from: the training split, its labels dropped with --unlabeled, the classes of
    --omit-classes left out (paper §3). Without labels the soft term alone trains (α = 1), and without labelled
    validation rows the best epoch is the one that agrees most with the ensemble."""
    config, ensemble, tensors, teacher, omitted, console = (ctx.config, ctx.ensemble, ctx.tensors, ctx.teacher,
                                                            ctx.omitted, ctx.console)
    x, y, source, rows = tensors.x_train, tensors.y_train, teacher.train, None
    if config.unlabeled:
        y = torch.full_like(y, -1)
    info: dict = {"rows": len(x), "unlabeled": config.unlabeled}
    if omitted:
        rows = torch.nonzero(keep_rows(tensors.y_train, omitted)).flatten()  # (N_kept,)
        x, y = x[rows], y[rows]
        if isinstance(source, CachedLogits):  # with --no-cache the teachers run on the kept rows themselves
            source = source.subset(rows.numpy())
        info.update(rows=len(rows), omitted_classes=list(omitted), rows_dropped=len(tensors.x_train) - len(rows))
        console.print(f"[bold]transfer set[/] {len(rows)} rows: classes {list(omitted)} left out "
                      f"({info['rows_dropped']} rows)")
    recipe = make_recipe(config.recipe, tuple(x.shape[1:]), x, config.seed)
    if recipe.teachers_per_batch:  # the teachers see each batch's view, which changes every epoch
        source = view_source(ctx, x, rows, recipe)
    info.update(recipe.describe())
    if isinstance(source, VariantLogits):
        info["teachers"] = ("run once per (row, view) pair and cached: at most one pass per epoch and "
                            f"{recipe.view.variants} in all (compressor.training.view_cache)")
    elif isinstance(source, ViewLogits):
        info["teachers"] = "run once per epoch on every row's view and cached (compressor.training.view_cache)"
    alpha = soft_weight(config.alpha, recipe, bool((y >= 0).any()))
    if not bool((y >= 0).any()):
        if config.alpha != 1.0:
            console.print(f"[yellow]note:[/] the transfer set has no labels: training on the soft targets alone "
                          f"(alpha 1, not {config.alpha})")
    y_val, selection = tensors.y_val, "validation accuracy"
    if not bool((y_val >= 0).any()):
        y_val = ensemble.log_probs(teacher.val).argmax(dim=1)  # (N_val,) the ensemble's answers
        selection = "agreement with the ensemble on validation (the validation split has no labels)"
        console.print(f"[yellow]note:[/] best epoch chosen by {selection}")
    info.update(alpha=alpha, best_epoch_by=selection)
    if ensemble.specialist_subsets is None:
        return TransferSet(x, y, source, y_val, alpha, recipe, omitted, info,
                           ensemble.combine, tuple(ensemble.weights) if ensemble.weights else None)
    info["soft_targets"] = "the specialist ensemble's combination q (paper §5), softened as softmax(log q / T)"
    combined, generalist = specialist_sources(ensemble, source)
    return TransferSet(x, y, combined, y_val, alpha, recipe, omitted, info, generalist=generalist)


def view_source(ctx: RunContext, x: torch.Tensor, rows: torch.Tensor | None, recipe: Recipe):
    """The teachers' logits on the recipe's views: from the view cache (compressor.training.view_cache), each view's
    computed once and reused by later epochs, runs and tuning trials; with --no-cache, or for a specialist ensemble
    (whose combination is not cached per view), the teachers run on every batch instead."""
    config, ensemble, teacher = ctx.config, ctx.ensemble, ctx.teacher
    if teacher.views is None or ensemble.specialist_subsets is not None:
        return teacher.online
    transfer_rows = "all" if rows is None else hashlib.sha256(rows.numpy().tobytes()).hexdigest()
    key = {**teacher.cache["key"], "transfer_rows": transfer_rows, "recipe": recipe.name,
           "view": recipe.view.describe(), "view_seed": config.seed}
    return open_view_cache(teacher.online, x, recipe.view, len(ensemble.members), ensemble.num_classes, teacher.views,
                           key, refresh=config.refresh_teacher_cache)


def row_subset(transfer: TransferSet, rows: torch.Tensor, online) -> TransferSet:
    """``transfer`` seen through ``rows`` (indices into its rows), for a tuning search's low-fidelity screen: the
    inputs (read through, never copied), labels, cached teachers' logits and views of those rows. A per-epoch
    source (the view cache, which computes every row's views) gives way to ``online``, the teachers run on each
    viewed batch, so the screen pays for its own rows only."""
    def through(view):
        return None if view is None else (lambda xb, idx, epoch: view(xb, rows[idx], epoch))

    def subset(source):
        if isinstance(source, CachedLogits):
            return source.subset(rows.numpy())
        return online if hasattr(source, "for_epoch") else source

    recipe = dataclasses.replace(transfer.recipe, view=through(transfer.recipe.view),
                                 baseline_view=through(transfer.recipe.baseline_view))
    return dataclasses.replace(transfer, x=RowSubset(transfer.x, rows), y=transfer.y[rows],
                               teacher=subset(transfer.teacher), generalist=subset(transfer.generalist), recipe=recipe)


COMBINE_ROWS = 8192  # transfer rows combined at a time when a specialist ensemble's soft targets are precomputed


def specialist_sources(ensemble: Ensemble, source) -> tuple[object, object]:
    """A specialist ensemble's teacher source as two one-member sources the loss reads as is: its combined
    log-probabilities log q (1, N, C), computed once for cached logits, and its generalist's logits (1, N, C)."""
    if isinstance(source, CachedLogits):
        n = source.shape[1]
        combined = torch.cat([ensemble.log_probs(source.take(torch.arange(i, min(i + COMBINE_ROWS, n))))
                              for i in range(0, n, COMBINE_ROWS)])  # (N, C)
        return CachedLogits(combined[None].numpy()), source.first_member()
    return (lambda xb: ensemble.log_probs(source(xb))[None]), (lambda xb: source(xb)[:1])


MAX_VIEW_DROP = 0.02  # teachers losing more validation accuracy than this on the recipe's views are not robust to them


def check_views(ctx: RunContext, recipe: Recipe) -> dict | None:
    """The teachers' validation accuracy on the recipe's labelled views (its shifts) against the plain inputs;
    a warning when they lose more than 2 points, since their soft targets on those views then teach their errors."""
    ensemble, tensors, teacher = ctx.ensemble, ctx.tensors, ctx.teacher
    if recipe.baseline_view is None:
        return None
    labelled = tensors.y_val >= 0
    if not bool(labelled.any()):
        return None
    x, y = tensors.x_val[labelled], tensors.y_val[labelled]
    rows = torch.arange(len(x)) + len(tensors.x_train)  # rows no training view uses, so the check is its own draw
    viewed = recipe.baseline_view(x, rows, 1)
    plain = float((ensemble.log_probs(teacher.val[:, labelled]).argmax(1) == y).double().mean())
    on_views = float((ensemble.log_probs(ensemble.member_logits(viewed)).argmax(1) == y).double().mean())
    warning = None
    if plain - on_views > MAX_VIEW_DROP:
        warning = (f"the teachers reach {on_views:.2%} on the recipe's views of the validation split against "
                   f"{plain:.2%} on the plain images: they are not robust to {recipe.baseline_view.describe()}, "
                   f"so --recipe {recipe.name} would teach their errors; prefer --recipe hinton or teachers "
                   f"trained with that augmentation")
    return {"plain_accuracy": plain, "view_accuracy": on_views, "warning": warning}


def fix_bias(ctx: RunContext, student: torch.nn.Module, transfer: TransferSet) -> dict | None:
    """Paper §3's bias fix: raise the left-out classes' output biases by the shift that maximises validation
    accuracy (--bias-fix auto) or by a given amount; None when no class was left out or --bias-fix none."""
    config, tensors, console = ctx.config, ctx.tensors, ctx.console
    if not transfer.omitted or config.bias_fix == "none":
        return None
    val_logits = predict_logits(student, tensors.x_val)  # (N_val, C)
    if config.bias_fix == "auto":
        fit = fit_bias_shift(val_logits, transfer.y_val, transfer.omitted)
        shift, summary = fit.shift, fit.to_dict()
    else:
        shift = float(config.bias_fix)
        raised = val_logits.clone()
        raised[:, list(transfer.omitted)] += shift
        labelled = transfer.y_val >= 0
        accuracy = [float((v[labelled].argmax(1) == transfer.y_val[labelled]).double().mean())
                    for v in (val_logits, raised)]
        summary = {"classes": list(transfer.omitted), "shift": shift, "val_accuracy_before": accuracy[0],
                   "val_accuracy_after": accuracy[1]}
    apply_bias_shift(student, transfer.omitted, shift)
    console.print(f"[bold]bias fix[/] classes {list(transfer.omitted)} raised by {shift:g}: validation accuracy "
                  f"{summary['val_accuracy_before']:.2%} -> {summary['val_accuracy_after']:.2%}")
    return summary
