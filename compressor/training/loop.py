"""The training loop that distils a teacher ensemble into a student (Hinton, Vinyals & Dean 2015,
"Distilling the Knowledge in a Neural Network").

One function, :func:`train_student`, runs AdamW with a per-step cosine schedule over a transfer set,
validates every epoch, keeps the best epoch's weights and checkpoints atomically so that
``--resume`` continues a killed run and ends with exactly the weights an uninterrupted run has.
The loss is any callable ``loss_fn(student_logits (B, C), teacher_logits (K, B, C) | None,
labels (B,) int64, -1 = unlabeled) -> scalar``; this module never imports ``compressor.training.losses``.

Teacher logits come from one of four sources: a tensor (K, N, C) in memory; an object with ``shape`` and
``take(idx) -> (K, B, C)`` such as :class:`compressor.training.teacher_cache.CachedLogits` (the on-disk cache, read one batch
at a time); a per-epoch source with ``shape`` and ``for_epoch(epoch) -> CachedLogits-like`` such as
:class:`compressor.training.view_cache.ViewLogits` (the teachers' logits on each epoch's augmented views, cached on disk); or a
callable ``teacher(xb) -> (K, B, C)`` that runs the teachers on each (possibly augmented) batch.

Distributed data parallel: when ``torch.distributed`` is initialised (``torchrun``), the student is wrapped in
``DistributedDataParallel`` and every global batch of ``batch_size`` rows is split across the ranks, so a run on N
processes takes the same optimisation steps over the same examples as a run on one; rank 0 alone writes
checkpoints.

Determinism: ``torch.manual_seed(seed)`` once at the start; epoch ``e``'s shuffle comes from its own
generator seeded with ``(seed, e)``; the global RNG state (dropout) is saved in every checkpoint and
restored on resume.

Checkpoints (``last.pt`` every epoch, ``best.pt`` at each new best) are :mod:`compressor.training.checkpoints`'.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from compressor.core.errors import CompressorError
from compressor.core.inference import device_of, evaluate_accuracy
from compressor.core.inputs import call
from compressor.core.progress import progress_bar
from compressor.training.checkpoints import (BEST_NAME, CHECKPOINT_FORMAT, LAST_NAME, check_compatible, cpu_state,
                                             json_safe, load_checkpoint, remove_partial_writes, save_checkpoint)
from compressor.training.distributed import process_rank
from compressor.training.precision import autocast_for, check_amp, memory_format_for

log = logging.getLogger(__name__)
# who else hears of each finished epoch: compressor.compress(on_epoch=...) sets it for the length of its run
EPOCH_CALLBACK: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("epoch_callback", default=None)

LossFn = Callable[[Tensor, "Tensor | None", Tensor], Tensor]

VAL_BATCH = 256  # validation batch size, at least (the training batch size when larger)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    amp: str = "none"      # "bf16": autocast the student's forward pass to bfloat16 (weights and loss stay fp32)
    progress: bool = True  # rich progress bar with live loss / accuracy


@dataclass
class TrainResult:
    best_epoch: int  # 1-based
    best_val_accuracy: float
    # per epoch: epoch, train_loss, train_accuracy, val_accuracy, lr, seconds, and view_seconds (of those seconds,
    # the ones spent running the teachers on views the view cache did not hold yet)
    history: list[dict] = field(default_factory=list)
    resumed_from_epoch: int = 0  # 0 when not resumed
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Progress:
    """Where a run stands: the last finished epoch, the best one so far and its weights, the history."""

    epoch: int = 0
    best_epoch: int = 0
    best_acc: float = -1.0
    best_state: dict | None = None
    history: list[dict] = field(default_factory=list)


def _check_inputs(config: TrainConfig, x_train: Tensor, y_train: Tensor, teacher_logits,
                  x_val: Tensor, y_val: Tensor, device: torch.device) -> None:
    if config.epochs < 0 or config.batch_size < 1 or not config.lr > 0:
        raise CompressorError(
            f"training settings epochs={config.epochs}, batch_size={config.batch_size}, lr={config.lr:g} are invalid; "
            "use epochs >= 0, batch size >= 1 and lr > 0"
        )
    check_amp(config.amp, device)
    n = len(x_train)
    if n == 0:
        raise CompressorError("the transfer set is empty; give train_student at least one example")
    if y_train.shape != (n,):
        raise CompressorError(f"labels have shape {tuple(y_train.shape)} but the transfer set has {n} rows; expected ({n},)")
    if hasattr(teacher_logits, "shape") and (len(teacher_logits.shape) != 3 or teacher_logits.shape[1] != n):
        raise CompressorError(
            f"teacher logits have shape {tuple(teacher_logits.shape)}; expected (K, {n}, C) for {n} transfer rows"
        )
    if y_val.shape != (len(x_val),):
        raise CompressorError(f"validation labels have shape {tuple(y_val.shape)}; expected ({len(x_val)},)")
    if int((y_val >= 0).sum()) == 0:
        raise CompressorError("the validation set has no labeled rows, so no epoch can be chosen as best; label it")


def _shard(batch: Tensor, rank: int, world: int) -> tuple[Tensor, float]:
    """This rank's rows of a global batch and their share of it.

    Written by hand rather than with ``torch.utils.data.DistributedSampler``: that sampler splits the epoch into one
    stream per rank (and pads it with repeated rows), so the examples that meet in a step depend on the world size.
    Striding each global batch keeps every step's examples those of a one-process run. A rank left without a row
    (a last batch smaller than the world) reuses the batch's first row with share 0, so it still joins the
    gradient all-reduce but adds nothing to it.
    """
    if world == 1:
        return batch, 1.0
    rows = batch[rank::world]
    if len(rows) == 0:
        return batch[:1], 0.0
    return rows, len(rows) / len(batch)


def _global_mean(value: Tensor, world: int) -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    if world == 1:
        return float(value)
    total = value.detach().float().reshape(1).clone()
    torch.distributed.all_reduce(total)
    return float(total) / world


def _global_sums(correct: int, labeled: int, world: int, device: torch.device) -> tuple[int, int]:
    """Training-accuracy counts summed over the ranks (on ``device``: NCCL reduces CUDA tensors only)."""
    if world == 1:
        return correct, labeled
    counts = torch.tensor([correct, labeled], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _teacher_batch(teacher, idx: Tensor, xb: Tensor, device: torch.device) -> Tensor | None:
    """The teachers' logits (K, B, C) for the batch rows ``idx`` whose inputs are ``xb``."""
    if teacher is None:
        return None
    if isinstance(teacher, Tensor):
        return teacher[:, idx.to(teacher.device)].to(device)
    if hasattr(teacher, "take"):
        return teacher.take(idx).to(device, non_blocking=True)
    with torch.no_grad():
        return teacher(xb).to(device)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def train_student(
    student: nn.Module,
    x_train: Tensor,  # (N, ...) float32
    y_train: Tensor,  # (N,) int64, -1 = unlabeled
    teacher_logits,  # (K, N, C) tensor, CachedLogits-like, per-epoch (for_epoch), callable(xb) -> (K, B, C), or None
    x_val: Tensor,  # (M, ...)
    y_val: Tensor,  # (M,) int64
    loss_fn: LossFn,
    config: TrainConfig,
    checkpoint_dir: Path,
    resume: bool = False,
    fingerprint: dict | None = None,
    view: Callable[[Tensor, Tensor, int], Tensor] | None = None,
    until: int | None = None,
) -> TrainResult:
    """Train ``student`` in place on the transfer set and return what happened.

    Each step: a batch of rows ``idx`` (shuffled per epoch), ``loss_fn(student(x[idx]) (B, C),
    teacher_logits[:, idx] (K, B, C) | None, y[idx] (B,))``, AdamW, one step of the cosine schedule.
    After every epoch: validation accuracy, ``best.pt`` when it is a new best, ``last.pt`` always.
    At the end the best epoch's weights are loaded into ``student``, which is left in eval mode.

    ``view(xb, rows, epoch) -> xb`` transforms each training batch (never validation), as a deterministic function
    of its training rows ``rows`` (indices into ``x_train``) and the 1-based epoch (``compressor.data.augment``), so a
    run, its resumption and every DDP rank see the same inputs. A callable teacher source runs on the viewed batch,
    so the teachers see exactly what the student sees; a per-epoch source (``for_epoch``) is a cache of the teachers
    on that same view, asked once per epoch for that epoch's logits, so it pairs with ``view`` too; a tensor or cached
    source is not recomputed for it, so pair those with a view only when training without teachers (a teacher or a
    baseline).

    ``until`` stops after that epoch of the ``config.epochs``-epoch schedule (the learning rate follows the whole
    schedule), leaving ``last.pt`` to be resumed later: a run paused at ``until`` and resumed ends with exactly the
    weights of an uninterrupted one (successive halving trains its trials rung by rung this way).

    ``resume=True`` continues from ``checkpoint_dir/last.pt`` when it exists (its config and
    ``fingerprint`` must match) and starts fresh when it does not; ``resume=False`` always starts
    fresh and overwrites. Raises :class:`CompressorError` for an unreadable or mismatched checkpoint
    and for a non-finite training loss. A convolutional student trains channels-last on the CPU and comes back in
    the default layout. Example: ``train_student(mlp, x, y, t, xv, yv, loss, TrainConfig(epochs=10), Path("ckpt"))``.
    """
    t_start = time.perf_counter()
    device = device_of(student)
    _check_inputs(config, x_train, y_train, teacher_logits, x_val, y_val, device)
    rank, world = process_rank()
    checkpoint_dir = Path(checkpoint_dir)
    if rank == 0:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(checkpoint_dir)
    fingerprint = json_safe(fingerprint)

    layout = memory_format_for(student, device)
    student.to(memory_format=layout)
    torch.manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    total_steps = max(1, config.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # Closed-form cosine per step (no recursion, so a resumed schedule is bit-identical).
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    state = _resume(checkpoint_dir / LAST_NAME, student, optimizer, scheduler, config, fingerprint) if resume \
        else _Progress()
    resumed_from = state.epoch
    model = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    _run_epochs(state, model, student, optimizer, scheduler, loss_fn, teacher_logits, x_train, y_train, x_val, y_val,
                view, until, config, fingerprint, checkpoint_dir, device, rank, steps_per_epoch, layout)

    if state.best_state is not None:
        student.load_state_dict(state.best_state)
    student.to(memory_format=torch.contiguous_format)  # what export, parity and the bundle expect
    student.eval()
    return TrainResult(best_epoch=state.best_epoch, best_val_accuracy=state.best_acc if state.best_epoch else 0.0,
                       history=state.history, resumed_from_epoch=resumed_from,
                       seconds=time.perf_counter() - t_start)


def _run_epochs(state: _Progress, model: nn.Module, student: nn.Module, optimizer, scheduler, loss_fn: LossFn,
                teacher_logits, x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, view, until: int | None,
                config: TrainConfig, fingerprint: dict, checkpoint_dir: Path, device: torch.device, rank: int,
                steps_per_epoch: int, layout: torch.memory_format) -> None:
    """Every epoch from the one after ``state.epoch`` to ``until`` (or the schedule's end), each validated and
    checkpointed, with the progress bar; ``state`` is updated in place."""
    with progress_bar(config.progress and rank == 0, "[bold]epoch {task.fields[epoch]}",
                      "loss {task.fields[loss]}  train acc {task.fields[train_acc]}  val acc {task.fields[val_acc]}"
                      ) as progress:
        task = progress.add_task("train", total=config.epochs * steps_per_epoch,
                                 completed=state.epoch * steps_per_epoch, epoch=f"{state.epoch}/{config.epochs}",
                                 loss="-", train_acc="-",
                                 val_acc=_fmt(state.best_acc if state.best_epoch else None, ".3f"))
        stop = config.epochs if until is None else min(until, config.epochs)
        for epoch in range(state.epoch + 1, stop + 1):  # 1-based
            t_epoch = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            # a per-epoch source gives the teachers on this epoch's views; the others serve every epoch
            source = teacher_logits.for_epoch(epoch) if hasattr(teacher_logits, "for_epoch") else teacher_logits
            view_seconds = time.perf_counter() - t_epoch  # the teachers on views the cache did not hold yet

            def advance(**fields):
                progress.update(task, advance=1, epoch=f"{epoch}/{config.epochs}", **fields)
            train_loss, train_acc = _train_epoch(model, optimizer, scheduler, loss_fn, source, x_train, y_train,
                                                 view, epoch, config, device, advance, layout)
            # every rank holds the same weights, so each scores validation itself and all agree on the best epoch;
            # batches of 256 keep a CNN's activations in cache (4.8x faster than 1024 on the CPU, RESULTS.md)
            val_acc = evaluate_accuracy(student, x_val, y_val, batch_size=max(config.batch_size, VAL_BATCH))
            state.epoch = epoch
            state.history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                                  "val_accuracy": val_acc, "lr": lr, "seconds": time.perf_counter() - t_epoch,
                                  "view_seconds": view_seconds})
            _checkpoint(state, val_acc, student, optimizer, scheduler, config, fingerprint, checkpoint_dir, rank)
            if rank == 0:
                _log_epoch(state, config, checkpoint_dir)
            progress.update(task, val_acc=f"{val_acc:.3f} (best {state.best_acc:.3f} @ {state.best_epoch})")


def _log_epoch(state: _Progress, config: TrainConfig, checkpoint_dir: Path) -> None:
    """The epoch just finished: one INFO line, and the epoch as a dict to :data:`EPOCH_CALLBACK` when one is set
    (``compressor.compress(on_epoch=...)``: a notebook's plot, a tracker's logger)."""
    record = {**state.history[-1], "epochs": config.epochs, "best_epoch": state.best_epoch,
              "best_val_accuracy": state.best_acc, "run": checkpoint_dir.name, "folder": str(checkpoint_dir)}
    log.info("%s: epoch %d/%d, train loss %.4f, val accuracy %.4f", checkpoint_dir.name, record["epoch"],
             config.epochs, record["train_loss"], record["val_accuracy"])
    if (callback := EPOCH_CALLBACK.get()) is not None:
        callback(record)


def _resume(last_path: Path, student: nn.Module, optimizer, scheduler, config: TrainConfig,
            fingerprint: dict) -> _Progress:
    """Load ``last.pt`` into the student, optimizer, scheduler and RNGs when it exists (its settings must match);
    a fresh start when it does not."""
    if not last_path.exists():
        log.info("no checkpoint at %s; starting fresh", last_path)
        return _Progress()
    ckpt = load_checkpoint(last_path)
    check_compatible(last_path, ckpt, asdict(config), fingerprint, asdict(TrainConfig()))
    try:
        student.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scheduler.load_state_dict(ckpt["scheduler_state"])
        state = _Progress(int(ckpt["epoch"]), int(ckpt["best_epoch"]), float(ckpt["best_val_accuracy"]),
                          ckpt["best_model_state"], list(ckpt["history"]))
        torch.set_rng_state(ckpt["rng_state"])
        if torch.cuda.is_available() and ckpt.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state_all(ckpt["cuda_rng_state"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise CompressorError(
            f"checkpoint {last_path} does not fit this student or is incomplete ({exc}); use a new --out or drop "
            f"--resume") from exc
    log.info("resuming from %s after epoch %d of %d", last_path, state.epoch, config.epochs)
    return state


def _train_epoch(model: nn.Module, optimizer, scheduler, loss_fn: LossFn, source, x_train: Tensor, y_train: Tensor,
                 view, epoch: int, config: TrainConfig, device: torch.device, advance: Callable[..., None],
                 layout: torch.memory_format = torch.contiguous_format) -> tuple[float, float | None]:
    """One epoch of steps over the shuffled transfer set; returns the mean training loss and the training accuracy
    on labelled rows (None without any), both over every rank."""
    rank, world = process_rank()
    n = len(x_train)
    model.train()
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)  # (N,)
    loss_sum, seen, correct, labeled = 0.0, 0, 0, 0
    for start in range(0, n, config.batch_size):
        batch = perm[start : start + config.batch_size]  # (B,) the global batch
        idx, share = _shard(batch, rank, world)  # this rank's rows, and their share of the global batch
        xb = x_train[idx.to(x_train.device)].to(device, non_blocking=True)  # (b, ...)
        yb = y_train[idx.to(y_train.device)].to(device, non_blocking=True)  # (b,)
        if view is not None:
            xb = view(xb, idx, epoch)
        tb = _teacher_batch(source, idx, xb, device)  # (K, b, C)
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=layout)
        with autocast_for(config.amp, device):
            logits = call(model, xb)  # (b, C)
        # DDP averages gradients over ranks; weighting each rank's mean loss by its share of the global
        # batch times the world size makes that average the gradient of the global batch's mean loss.
        loss = loss_fn(logits.float(), tb, yb) * (share * world)
        loss_value = _global_mean(loss.detach(), world)
        if not math.isfinite(loss_value):
            raise CompressorError(
                f"training loss became {loss_value} in epoch {epoch}; lower --lr (now {config.lr:g}) "
                f"and --resume or rerun (checkpoints up to epoch {epoch - 1} are kept)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        with torch.no_grad():
            mask = (yb >= 0) & (share > 0)
            correct += int((logits.argmax(dim=1)[mask] == yb[mask]).sum())
            labeled += int(mask.sum())
        loss_sum += loss_value * len(batch)
        seen += len(batch)
        advance(loss=f"{loss_sum / seen:.4f}", train_acc=_fmt(correct / labeled if labeled else None, ".3f"))
    correct, labeled = _global_sums(correct, labeled, world, device)
    return loss_sum / seen, (correct / labeled if labeled else None)  # None: no labeled rows


def _checkpoint(state: _Progress, val_acc: float, student: nn.Module, optimizer, scheduler, config: TrainConfig,
                fingerprint: dict, checkpoint_dir: Path, rank: int) -> None:
    """After an epoch: keep it as the best when it beats every earlier one (``best.pt``), then write ``last.pt``.
    Only rank 0 writes; every rank updates its own state alike."""
    if val_acc > state.best_acc:  # strict: the earliest of equal epochs wins
        state.best_epoch, state.best_acc, state.best_state = state.epoch, val_acc, cpu_state(student)
        # best.pt before last.pt: a crash in between re-runs this epoch and rewrites both.
        if rank == 0:
            save_checkpoint({"format": CHECKPOINT_FORMAT, "epoch": state.epoch, "val_accuracy": val_acc,
                             "model_state": state.best_state, "fingerprint": fingerprint},
                            checkpoint_dir / BEST_NAME)
    if rank == 0:
        save_checkpoint({
            "format": CHECKPOINT_FORMAT,
            "epoch": state.epoch,
            "model_state": student.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "scheduler_state": scheduler.state_dict(),
            "best_epoch": state.best_epoch,
            "best_val_accuracy": state.best_acc,
            "best_model_state": state.best_state,
            "history": state.history,
            "rng_state": torch.get_rng_state(),
            "cuda_rng_state": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "config": asdict(config),
            "fingerprint": fingerprint,
        }, checkpoint_dir / LAST_NAME)
