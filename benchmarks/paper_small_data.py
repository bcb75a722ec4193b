"""Hinton, Vinyals & Dean (2015) §6, soft targets as a regulariser, rerun on Fashion-MNIST with compressor's parts.

The paper (speech, Table 5): a model trained on the hard targets of only 3% of the training data overfits badly,
to 67.3% train and 44.5% test frame accuracy, and needed early stopping to get even that (its accuracy "drops
sharply" afterwards); the same model trained on the soft targets that the model trained on *all* the data gives
those 3% reaches 65.4% train and 57.0% test with no early stopping, close to the 58.9% test of the baseline
trained on 100% of the data (63.4% train). The soft targets carry the full-data model's knowledge of how the
classes relate, which 3% of the labels alone cannot.

Here: the full-data model is the teacher ensemble of ``paper_table.py`` (3 × 2×1200 on all 55,000 training
images, reused from ``--work-dir`` when its settings are unchanged). ``--fraction`` (3%) of the training split, a
seeded random subset (``--subset-seed``), is the training set of two ``mlp:800x800`` students, each trained for a
fixed ``--epochs`` with paper_table's optimiser settings (AdamW lr 1e-3, batch 128, cosine schedule, no weight
decay) and no regulariser of its own:

- hard: cross-entropy on the subset's labels (``HardLabelLoss``);
- soft: ``DistillationLoss`` (``--temperature`` 4, ``--alpha`` 0.9: mostly soft targets, a little hard label) on
  the ensemble's logits for the subset's images.

Each is scored at its last epoch (the paper's protocol for the soft model: no early stopping) and at its best
validation epoch (the paper's protocol for the hard model), on train (its own subset) and on the 10,000 test
images. The 2×800 trained on the hard labels of all the data (``hard 2×800``, reused from paper_table's run) is the
100% baseline.

    python benchmarks/paper_small_data.py --work-dir /tmp/paper-work   # a few minutes when the teachers are reused
    python benchmarks/paper_small_data.py --quick                      # a few minutes from scratch

Prints the table and writes ``benchmarks/results/paper_small_data[-quick].json``. Needs
``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.paper_common import (
    STUDENT_EPOCHS,
    Runs,
    add_run_arguments,
    add_teacher_arguments,
    load_fashion,
    mlp_student,
    record,
    resolve_defaults,
    train_teacher_ensemble,
    write_result,
)
from compressor.core.inference import predict_logits
from compressor.training.losses import DistillationLoss, HardLabelLoss

# The paper's Table 5 (speech, frame accuracy): train and test, in percent.
PAPER = {
    "baseline, 100% of the training set": {"train": 63.4, "test": 58.9},
    "baseline, 3% of the training set": {"train": 67.3, "test": 44.5, "early_stopped": True},
    "soft targets, 3% of the training set": {"train": 65.4, "test": 57.0, "early_stopped": False},
}
PAPER_FOR = {"full": "baseline, 100% of the training set", "hard": "baseline, 3% of the training set",
             "soft": "soft targets, 3% of the training set"}


def subset(n: int, fraction: float, seed: int) -> Tensor:
    """Sorted indices (m,) of a seeded random ``fraction`` of ``n`` rows, at least one."""
    m = max(1, round(n * fraction))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((predict_logits(model, x).argmax(1) == y).double().mean())


def add_accuracies(row: dict, runs: Runs, model: nn.Module, x: Tensor, y: Tensor, role: str) -> dict:
    """Train (on ``x``, ``y``) and test accuracy at the last epoch and at the early-stopped one, and the validation
    curve: the evidence of overfitting."""
    data = runs.data
    n_test = len(data.yt)
    row.update(role=role, train_rows=len(y), train_accuracy=accuracy(model, x, y),
               test_accuracy=1 - row["test_errors"] / n_test,
               test_accuracy_early_stopped=1 - row["test_errors_early_stopped"] / n_test,
               val_accuracy_by_epoch=[round(e["val_accuracy"], 4) for e in runs.results[row["name"]].history])
    last = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(runs.early_states[row["name"]])
    row["train_accuracy_early_stopped"] = accuracy(model, x, y)
    model.load_state_dict(last)
    return row


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = load_fashion(args.max_train)
    runs = Runs(data, args, console, prefix="paper-small-data-")
    _, teacher_logits = train_teacher_ensemble(runs)  # (K, N, 10): the full-data model's view of every image

    full = mlp_student(800, args.seed)  # paper_table's run of the same name: reused from --work-dir
    add_accuracies(runs.train("hard 2×800", full, HardLabelLoss(), epochs=args.full_data_epochs), runs, full, data.x,
                   data.y, "full")
    idx = subset(len(data.y), args.fraction, args.subset_seed)  # (m,)
    xs, ys = data.x[idx], data.y[idx]
    # names carry what differs from the defaults, so a finished run is found again and never mistaken for another
    pct = f"{args.fraction * 100:g}%" + ("" if args.subset_seed == 0 else f" subset {args.subset_seed}")
    alpha = "" if args.alpha == 0.9 else f" α={args.alpha:g}"
    fingerprint = {"subset": pct, "subset_rows": len(idx), "subset_seed": args.subset_seed}
    hard = mlp_student(800, args.seed)
    add_accuracies(runs.train(f"hard 2×800 {pct}", hard, HardLabelLoss(), x=xs, y=ys, fingerprint=fingerprint),
                   runs, hard, xs, ys, "hard")
    soft = mlp_student(800, args.seed)
    loss = DistillationLoss(args.temperature, args.alpha)
    soft_fingerprint = {**fingerprint, "temperature": args.temperature, "alpha": args.alpha}
    add_accuracies(runs.train(f"soft 2×800 {pct} T={args.temperature:g}{alpha}", soft, loss, teacher_logits[:, idx],
                              x=xs, y=ys, fingerprint=soft_fingerprint), runs, soft, xs, ys, "soft")

    counts = torch.bincount(ys, minlength=10).tolist()
    result = {**record(args, data), "subset": {"rows": len(idx), "fraction": args.fraction,
                                               "seed": args.subset_seed, "class_counts": counts},
              "test_rows": len(data.yt), "rows": runs.rows, "summary": summarise(runs.rows), "paper_speech": PAPER,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    return write_result(result, args, "paper_small_data", print_table, console)


def summarise(rows: list[dict]) -> dict:
    """How much of the accuracy lost by training on the subset the soft targets win back, on test:
    ``(soft − hard) / (full − hard)``, under three protocols: the paper's (hard early-stopped, soft at its last
    epoch, the 100% baseline at its last epoch), and both nets at their last epoch or both early-stopped.
    None when the subset's hard net is not worse than the 100% baseline (no gap)."""
    by_role = {row["role"]: row for row in rows if "role" in row}
    if not {"full", "hard", "soft"} <= set(by_role):
        return {}
    full = by_role["full"]["test_accuracy"]

    def share(hard: float, soft: float) -> dict:
        gap = full - hard
        return {"full": full, "hard": hard, "soft": soft, "recovered": None if gap <= 0 else (soft - hard) / gap}

    hard, soft = by_role["hard"], by_role["soft"]
    p_full, p_hard, p_soft = (PAPER[PAPER_FOR[k]]["test"] for k in ("full", "hard", "soft"))
    return {
        "paper_protocol": share(hard["test_accuracy_early_stopped"], soft["test_accuracy"]),
        "last_epoch": share(hard["test_accuracy"], soft["test_accuracy"]),
        "early_stopped": share(hard["test_accuracy_early_stopped"], soft["test_accuracy_early_stopped"]),
        "paper_recovered": (p_soft - p_hard) / (p_full - p_hard),
    }


def print_table(result: dict) -> None:
    """Train and test accuracy of the three nets beside the paper's speech figures."""
    s = result["subset"]
    table = Table(title=f"Hinton et al. 2015 §6 on Fashion-MNIST: {s['rows']:,} training images "
                        f"({s['fraction']:.0%}) vs all (accuracy; paper: speech frame accuracy)")
    for column in ("net", "trained on", "train, last", "test, last", "train, early-stopped",
                   "test, early-stopped (epoch)", "paper train", "paper test"):
        table.add_column(column, justify="left" if column in ("net", "trained on") else "right")
    for row in result["rows"]:
        if "role" not in row:
            continue
        paper = PAPER[PAPER_FOR[row["role"]]]
        note = {"hard": " (early-stopped)", "soft": " (last epoch)"}.get(row["role"], "")
        table.add_row(row["name"], f"{row['train_rows']:,} images", f"{row['train_accuracy']:.1%}",
                      f"{row['test_accuracy']:.1%}", f"{row['train_accuracy_early_stopped']:.1%}",
                      f"{row['test_accuracy_early_stopped']:.1%} ({row['best_epoch']}/{row['epochs']})",
                      f"{paper['train']:.1f}%", f"{paper['test']:.1f}%{note}")
    teacher = next(row for row in result["rows"] if row["name"] == "teacher ensemble")
    Console(width=180).print(table)
    print(f"teacher ensemble (the full-data model whose soft targets the soft net learns): "
          f"{1 - teacher['test_errors'] / result['test_rows']:.1%} test")
    for label, part in result["summary"].items():
        if isinstance(part, dict):
            share = "no gap to win back (the subset's hard net is not worse)" if part["recovered"] is None \
                else f"the soft targets win back {part['recovered']:.0%} of the gap"
            print(f"{label}: hard {part['hard']:.1%}, soft {part['soft']:.1%}, all data {part['full']:.1%}: {share}")
    if "paper_recovered" in result["summary"]:
        print(f"paper: {result['summary']['paper_recovered']:.0%} (44.5% → 57.0% of 58.9%)")
    print(f"wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']['processor']}, "
          f"{result['machine']['threads']} threads")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 training images and fewer epochs")
    parser.add_argument("--fraction", type=float, default=0.03, help="share of the training split the students see")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per small-data student, no early stopping (full 200, quick 30)")
    parser.add_argument("--full-data-epochs", type=int, default=None,
                        help="epochs of the 2×800 trained on all the data (paper_table's: full 40, quick 6)")
    parser.add_argument("--temperature", type=float, default=4.0, help="soft-target temperature")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft-target term")
    add_teacher_arguments(parser)
    add_run_arguments(parser)
    args = resolve_defaults(parser.parse_args(argv))
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1], e.g. 0.03 for the paper's 3%")
    args.epochs = args.epochs or (30 if args.quick else 200)
    args.full_data_epochs = args.full_data_epochs or STUDENT_EPOCHS["quick" if args.quick else "full"]
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
