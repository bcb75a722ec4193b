"""Step 1's output: the members' logits on every split, from the teacher cache when it holds them (else computed
once and stored), the diagnostics' reading of them on a sample of the transfer set, and how closely a trained
model imitates them there."""

from __future__ import annotations

import contextlib

import torch

from compressor.core.fileio import default_cache_root
from compressor.core.inference import predict_logits
from compressor.core.metrics import classification_metrics
from compressor.core.progress import progress_bar
from compressor.teachers.diagnostics import diagnose, transfer_sample
from compressor.teachers.ensemble import Ensemble
from compressor.training.context import RunContext, TeacherOutputs
from compressor.training.distributed import barrier, broadcast_from_main
from compressor.training.cached_logits import CachedLogits, check_top_k
from compressor.training.teacher_cache import StreamedLogits, TeacherCache, cache_key
from compressor.training.teacher_shards import assembled, remove_shards, shard_bounds, write_shard


@contextlib.contextmanager
def _teachers_progress(ensemble: Ensemble, splits: dict[str, torch.Tensor], progress: bool):
    """A progress bar over every member's pass over ``splits``; yields the ``on_batch(rows)`` that advances it."""
    with progress_bar(progress) as bar:
        task = bar.add_task(f"teachers ({len(ensemble.members)} members)",
                            total=len(ensemble.members) * sum(len(x) for x in splits.values()))
        yield lambda rows: bar.advance(task, rows)


def run_teachers(ensemble: Ensemble, splits: dict[str, torch.Tensor], progress: bool, device: str = "cpu",
                 precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Run every member once over each split's inputs on ``device`` (the run's: CUDA when it trains there) at
    ``precision``: (K, N, C) logits per split on the CPU, with a progress bar."""
    with _teachers_progress(ensemble, splits, progress) as advance:
        return {name: ensemble.member_logits(x, on_batch=advance, device=device, precision=precision)
                for name, x in splits.items()}


def store_teachers(cache: TeacherCache, ensemble: Ensemble, splits: dict[str, torch.Tensor], progress: bool,
                   device: str, replace: bool, precision: str = "fp32",
                   train: StreamedLogits | None = None) -> dict[str, CachedLogits]:
    """Run the teachers over every split and store their logits in ``cache``: the held-out splits' in RAM first,
    then the transfer set's written to disk batch by batch as they come (never (K, N, C) in RAM). ``train``, the
    transfer set's logits already computed (the torchrun ranks' shards), stands in for its pass."""
    counted = splits if train is None else {name: splits[name] for name in ("val", "test")}
    with _teachers_progress(ensemble, counted, progress) as advance:
        logits = {name: ensemble.member_logits(splits[name], on_batch=advance, device=device, precision=precision)
                  for name in ("val", "test")}
        logits["train"] = train or StreamedLogits(len(splits["train"]), ensemble.iter_member_logits(
            splits["train"], on_batch=advance, device=device, precision=precision))
        return cache.store(logits, replace=replace)


def _compute_and_store(ctx: RunContext, cache: TeacherCache, splits: dict) -> dict[str, CachedLogits] | None:
    """Run the teachers and store the entry; under torchrun every rank runs its shard of the transfer set first
    (:mod:`compressor.training.teacher_shards`). The entry on rank 0, None on the others."""
    config, ensemble, world = ctx.config, ctx.ensemble, ctx.world
    if world.size == 1:
        return store_teachers(cache, ensemble, splits, config.progress, world.device, config.refresh_teacher_cache,
                              config.teacher_precision)
    shard = {"train": range(*shard_bounds(len(splits["train"]), world.rank, world.size))}
    with _teachers_progress(ensemble, shard, config.progress and world.is_main) as advance:
        write_shard(cache, ensemble, splits["train"], world, config.teacher_precision, advance)
    barrier(world)
    if not world.is_main:
        return None
    try:
        train = assembled(cache, ensemble, splits["train"], world, config.teacher_precision)
        return store_teachers(cache, ensemble, splits, config.progress, world.device, config.refresh_teacher_cache,
                              config.teacher_precision, train)
    finally:
        remove_shards(cache)


def teacher_outputs(ctx: RunContext) -> TeacherOutputs:
    """The members' logits on every split, from the teacher cache when it holds them; else computed once (under
    torchrun each rank runs the transfer set's share it trains on) and stored there by rank 0 (the other ranks
    read what it stored). With --no-cache the teachers run on the held-out
    splits once and on every training batch, for inputs that change from epoch to epoch."""
    config, ensemble, tensors = ctx.config, ctx.ensemble, ctx.tensors
    splits = {"train": tensors.x_train, "val": tensors.x_val, "test": tensors.x_test}

    def online(xb: torch.Tensor) -> torch.Tensor:
        return ensemble.member_logits(xb.cpu(), batch_size=max(len(xb), 1),
                                      precision=config.teacher_precision)  # (K, B, C)

    if config.no_cache:
        held_out = run_teachers(ensemble, {"val": splits["val"], "test": splits["test"]}, config.progress,
                                ctx.world.device, config.teacher_precision)
        return TeacherOutputs(online, held_out["val"], held_out["test"], {"enabled": False}, online)
    if config.cache_top_k is not None:
        check_top_k(config.cache_top_k, ensemble.num_classes)
    preparation = {"preprocessing": ctx.dataset.preprocessing, "normalisation": ctx.normalisation}
    if config.teacher_precision != "fp32":  # fp32 entries keep the key they had before the option existed
        preparation["teacher_precision"] = config.teacher_precision
    key = cache_key(ensemble.fingerprint(), ctx.dataset.fingerprint(), preparation, top_k=config.cache_top_k)
    cache = TeacherCache(config.teacher_cache or default_cache_root(), key)
    entries, hit = None, False
    if ctx.world.is_main and not config.refresh_teacher_cache:
        entries = cache.load()
        hit = entries is not None
    if broadcast_from_main(ctx.world, hit):
        ctx.console.print(f"[bold]teacher cache[/] reusing {cache.path}")
    else:
        entries = _compute_and_store(ctx, cache, splits)
        ctx.console.print(f"[bold]teacher cache[/] stored {cache.path}")
    barrier(ctx.world)
    if not ctx.world.is_main:
        entries = cache.load()
        if entries is None:  # no filesystem shared with rank 0: this rank computes its own copy in memory
            computed = run_teachers(ensemble, splits, config.progress, ctx.world.device, config.teacher_precision)
            entries = {name: CachedLogits(logits.numpy()) for name, logits in computed.items()}
    summary = cache.describe(hit) if hit else {**cache.describe(hit), "computed_by_ranks": ctx.world.size}
    return TeacherOutputs(entries["train"], entries["val"].to_tensor(), entries["test"].to_tensor(), summary, online,
                          cache.root / "views")


def diagnose_teachers(ctx: RunContext) -> dict:
    """The ensemble on validation and on a sample of the transfer set (compressor.teachers.diagnostics)."""
    rows = transfer_sample(ctx.tensors.y_train, ctx.config.seed)  # (S,)
    transfer = ctx.teacher.take_train(rows, ctx.tensors.x_train)  # (K, S, C): only the sampled rows are read
    return diagnose(ctx.ensemble, ctx.teacher.val, ctx.tensors.y_val, transfer_logits=transfer,
                    transfer_labels=ctx.tensors.y_train[rows], test_logits=ctx.teacher.test,
                    test_labels=ctx.tensors.y_test, teachers_saw_val=ctx.config.teachers_saw_val)


def transfer_fit(model: torch.nn.Module, ctx: RunContext) -> dict:
    """How closely ``model`` imitates the ensemble on rows it trained on (a seeded sample of the transfer set, the
    plain images): top-1 agreement and mean KL(ensemble ‖ model) in nats at T = 1. A student that agrees little
    even there cannot represent the teachers' function, so no recipe or schedule will make it keep their gain."""
    x_train = ctx.tensors.x_train
    rows = transfer_sample(torch.zeros_like(ctx.tensors.y_train), ctx.config.seed)  # (S,) every row counts
    reference = ctx.ensemble.log_probs(ctx.teacher.take_train(rows, x_train)).numpy()  # (S, C)
    metrics = classification_metrics(predict_logits(model, x_train[rows]).numpy(), None, reference)
    return {"rows": len(rows), "agreement": metrics["agreement"], "kl_to_ensemble": metrics["kl_to_reference"]}
