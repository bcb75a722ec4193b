"""What the reruns of Hinton, Vinyals & Dean (2015) on Fashion-MNIST share: the data, the teacher ensemble of
2×1200 nets, and one object that trains (or reuses) a net and scores it.

``paper_table.py`` (§3), ``paper_omitted_class.py`` (§3, transfer sets without some classes) and
``paper_small_data.py`` (§6, 3% of the data) all distil from the same teacher ensemble trained the same way, so
the teacher and student settings are defined once, here. A net finished by any of them in ``--work-dir`` serves
the others: ``train_student(resume=True)`` finds it by its folder name (the row's name, spaces → ``_``) and returns
at once when its ``TrainConfig`` and fingerprint match. That check cannot see the data or the loss, so two
different runs must never share a name; runs on a transfer set other than the training split pass a
``fingerprint`` that describes it, and runs capped by ``--max-train`` carry the cap in theirs.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor, nn

from compressor.data.augment import Shift
from compressor.data.datasets import load_dataset
from compressor.training.loop import TrainConfig, TrainResult, train_student
from compressor.core.inference import predict_logits
from compressor.core.fileio import write_json_atomic
from compressor.kernels import ensemble_log_probs
from compressor.training.losses import HardLabelLoss
from compressor.students import create_student

FASHION = "/usr/share/datasets/fashion-mnist"
RESULTS = Path(__file__).parent / "results"
VAL_FRACTION = 5000 / 60000  # 5,000 of the 60,000 training images held out for validation
STUDENT_EPOCHS = {"full": 40, "quick": 6}  # paper_table's students; the finished 2×800 runs are reused by name


def teacher_net(input_dropout: float, hidden_dropout: float) -> nn.Sequential:
    """The paper's big net: 784-1200-1200-10 ReLU with dropout on the inputs and on each hidden layer."""
    return nn.Sequential(nn.Flatten(), nn.Dropout(input_dropout),
                         nn.Linear(784, 1200), nn.ReLU(), nn.Dropout(hidden_dropout),
                         nn.Linear(1200, 1200), nn.ReLU(), nn.Dropout(hidden_dropout),
                         nn.Linear(1200, 10))


def mlp_student(width: int, seed: int) -> nn.Module:
    """``mlp:{width}x{width}`` from compressor's registry, initialised from ``seed``: the paper's 2×800 and 2×30."""
    torch.manual_seed(seed)
    return create_student(f"mlp:{width}x{width}", (1, 28, 28), 10)


def errors(model: nn.Module, x: Tensor, y: Tensor) -> int:
    """Misclassified test images."""
    return int((predict_logits(model, x).argmax(1) != y).sum())


@dataclass
class FashionData:
    """Fashion-MNIST as tensors: 55,000 training images (the transfer set), 5,000 validation, 10,000 test."""

    x: Tensor  # (N, 1, 28, 28) float32 in [0, 1]
    y: Tensor  # (N,) int64
    xv: Tensor
    yv: Tensor
    xt: Tensor
    yt: Tensor
    split: dict
    class_names: list[str] = field(default_factory=list)  # "t-shirt/top", ..., "ankle boot"


def load_fashion(max_train: int | None, main_job_seed: int | None = None) -> FashionData:
    """The split every rerun uses (seed 0, 5,000 validation images); ``max_train`` caps each split for quick runs.
    ``main_job_seed``: the split ``compress --data FASHION --seed S`` makes instead (its default validation share),
    for teachers whose students the main job trains, so no teacher-training image lands in their validation."""
    if main_job_seed is not None:
        data = load_dataset(FASHION, seed=main_job_seed, max_train=max_train)
    else:
        data = load_dataset(FASHION, seed=0, val_fraction=VAL_FRACTION, max_train=max_train)
    tensors = [torch.from_numpy(a) for part in (data.train, data.val, data.test) for a in (part.x, part.y)]
    return FashionData(*tensors, data.split_info, list(data.class_names or []))


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """The teacher ensemble's settings; change none of them to reuse paper_table's finished teachers."""
    parser.add_argument("--teacher-epochs", type=int, default=None, help="epochs per teacher (full 30, quick 5)")
    parser.add_argument("--teacher-weight-decay", type=float, default=1e-4)
    parser.add_argument("--members", type=int, default=None, help="2×1200 teachers in the ensemble (full 3, quick 2)")
    parser.add_argument("--input-dropout", type=float, default=0.1, help="teacher dropout on the inputs (paper: 0.2)")
    parser.add_argument("--hidden-dropout", type=float, default=0.3,
                        help="teacher dropout on the hidden units (paper: 0.5)")
    parser.add_argument("--jitter", type=int, default=0, help="teacher input jitter in pixels (paper: 2)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Optimiser, data cap, seed, threads and where things go: the same defaults in every rerun."""
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work-dir", default=None,
                        help="checkpoints of every net (default: a new temporary folder); a finished net found "
                             "there with the same settings is reused, an interrupted one resumed")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on ``--quick``: 10,000 training images, 2 teachers of 5 epochs."""
    args.teacher_epochs = args.teacher_epochs or (5 if args.quick else 30)
    args.members = args.members or (2 if args.quick else 3)
    args.max_train = args.max_train or (10_000 if args.quick else None)
    return args


def record(args: argparse.Namespace, data: FashionData) -> dict:
    """The head of a result file: command, date (UTC), machine, torch version, threads, settings and split."""
    return {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "settings": vars(args), "split": data.split,
    }


def write_result(result: dict, args: argparse.Namespace, name: str, show: Callable[[dict], None],
                 console: Console) -> int:
    """Write ``result`` atomically to ``--out`` or ``benchmarks/results/<name>[-quick].json``, print its table with
    ``show``, say where it went, and return the script's exit code 0."""
    out = Path(args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json")
    write_json_atomic(out, result)
    show(result)
    console.print(f"wrote {out}")
    return 0


class Runs:
    """Trains nets in ``work_dir`` (or reuses finished ones) and keeps one scored row per net in ``rows``.

    Every net is scored on test at its last epoch (the paper's protocol) and at its best validation epoch
    ("early-stopped"); after :meth:`train` the model holds its last epoch's weights, ``early_states[name]`` the
    best epoch's and ``results[name]`` the :class:`TrainResult`.
    """

    def __init__(self, data: FashionData, args: argparse.Namespace, console: Console, prefix: str):
        self.data, self.args, self.console = data, args, console
        self.work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix=prefix))
        self.rows: list[dict] = []
        self.early_states: dict[str, dict] = {}
        self.results: dict[str, TrainResult] = {}

    def train(self, name: str, model: nn.Module, loss, teacher_logits: Tensor | None = None, *,
              x: Tensor | None = None, y: Tensor | None = None, epochs: int | None = None, view=None,
              weight_decay: float = 0.0, seed: int | None = None, fingerprint: dict | None = None) -> dict:
        """Train ``model`` on ``x``, ``y`` (default: the whole training split) and ``teacher_logits`` (K, N, 10),
        append its row and return it. ``fingerprint`` must describe a transfer set other than the training split."""
        args, data = self.args, self.data
        self.console.print(f"[bold]{name}[/]")
        epochs = args.epochs if epochs is None else epochs
        config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=weight_decay,
                             seed=args.seed if seed is None else seed, progress=not args.no_progress)
        folder = self.work_dir / name.replace(" ", "_")
        # a capped run must not reuse a net trained on other data; an uncapped one keeps the empty fingerprint its
        # finished runs were written with
        capped = {"max_train": args.max_train} if args.max_train else {}
        result = train_student(model, data.x if x is None else x, data.y if y is None else y, teacher_logits,
                               data.xv, data.yv, loss, config, folder, resume=True,
                               fingerprint={**capped, **(fingerprint or {})}, view=view)
        self.early_states[name] = {k: v.clone() for k, v in model.state_dict().items()}  # best epoch on validation
        self.results[name] = result
        early_errors = errors(model, data.xt, data.yt)
        model.load_state_dict(torch.load(folder / "last.pt", weights_only=True)["model_state"])  # the last epoch
        model.eval()
        row = {"name": name, "test_errors": errors(model, data.xt, data.yt),
               "val_accuracy": result.history[-1]["val_accuracy"],
               "test_errors_early_stopped": early_errors, "val_accuracy_early_stopped": result.best_val_accuracy,
               "best_epoch": result.best_epoch, "epochs": epochs,
               "seconds": round(sum(epoch["seconds"] for epoch in result.history), 1),
               "resumed_from_epoch": result.resumed_from_epoch}
        reused = " (reused)" if result.resumed_from_epoch == epochs else ""
        self.console.print(f"  last epoch: {row['test_errors']} test errors (val {row['val_accuracy']:.4f}); "
                           f"early-stopped at epoch {row['best_epoch']}: {early_errors}; {row['seconds']} s{reused}")
        self.rows.append(row)
        return row


def train_teacher_ensemble(runs: Runs) -> tuple[list[nn.Module], Tensor]:
    """Train (or reuse) ``--members`` 2×1200 teachers on the training split, append a row per member and one for
    their ensemble, and return the members (at their last epoch) and their logits (K, N, 10) for the training split,
    un-jittered: the soft targets of every transfer set drawn from it."""
    args, data = runs.args, runs.data
    members, names, seconds = [], [], 0.0
    for k in range(args.members):
        torch.manual_seed(args.seed + k)
        net = teacher_net(args.input_dropout, args.hidden_dropout)
        names.append(f"teacher member {k + 1} 2×1200")
        view = Shift(args.jitter, args.seed + k) if args.jitter else None  # ±jitter px, per row and epoch
        seconds += runs.train(names[-1], net, HardLabelLoss(), epochs=args.teacher_epochs, view=view,
                              weight_decay=args.teacher_weight_decay, seed=args.seed + k)["seconds"]
        members.append(net)
    teacher_logits = torch.stack([predict_logits(m, data.x) for m in members])  # (K, N, 10)

    def ensemble_scores() -> tuple[int, float]:
        test = ensemble_log_probs(torch.stack([predict_logits(m, data.xt) for m in members]), 1.0)  # (10000, 10)
        val = ensemble_log_probs(torch.stack([predict_logits(m, data.xv) for m in members]), 1.0)
        return int((test.argmax(1) != data.yt).sum()), float((val.argmax(1) == data.yv).double().mean())

    test_errors, val_accuracy = ensemble_scores()
    last_states = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    for member, name in zip(members, names):
        member.load_state_dict(runs.early_states[name])
    early_errors, early_val = ensemble_scores()
    for member, state in zip(members, last_states):
        member.load_state_dict(state)
    runs.rows.append({"name": "teacher ensemble", "members": args.members, "test_errors": test_errors,
                      "val_accuracy": val_accuracy, "test_errors_early_stopped": early_errors,
                      "val_accuracy_early_stopped": early_val, "best_epoch": None, "epochs": args.teacher_epochs,
                      "seconds": round(seconds, 1)})
    runs.console.print(f"[bold]teacher ensemble[/] of {args.members}: {test_errors} test errors at the last epoch, "
                       f"{early_errors} early-stopped")
    return members, teacher_logits
