"""Issue 22's question 3: is compressor's training loop at least as fast as what a user writes by hand? The same
student, batch size, epochs and cached teacher logits go through ``compressor.training.loop.train_student`` (with
its fused loss, validation every epoch and atomic checkpoints) and through two plain PyTorch loops (softmax of the
tempered members averaged, ``kl_div`` against ``log_softmax``, cross-entropy, AdamW, cosine, validation every
epoch), interleaved round by round in one process; it prints seconds per epoch and the ratios:

- **hand-written, DataLoader**: the idiomatic loop, batches from ``DataLoader(TensorDataset(x, y, row), batch_size,
  shuffle=True)`` (what the PyTorch tutorials write, and what the issue timed at 11.5-14.6 s an epoch);
- **hand-written, tensor indexing**: a tighter loop that indexes the tensors with each shuffled batch of rows
  (what compressor does itself).

    python benchmarks/train_throughput.py                 # Fashion-MNIST's 54,000 training rows, cnn, 2 epochs, 3 rounds
    python benchmarks/train_throughput.py --quick         # 8,000 rows, 1 epoch, 2 rounds
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.data.datasets import load_dataset  # noqa: E402
from compressor.students import create_student  # noqa: E402
from compressor.training.loop import TrainConfig, train_student  # noqa: E402
from compressor.training.losses import DistillationLoss  # noqa: E402
from compressor.training.cached_logits import CachedLogits  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"
RESULTS = Path(__file__).parent / "results"
K, T, ALPHA = 3, 4.0, 0.9


def hand_written(student, x, y, teacher: np.ndarray, x_val, y_val, epochs: int, batch: int, lr: float,
                 data_loader: bool = False) -> None:
    """What a user writes: shuffle, read the batch's cached logits, the textbook loss, AdamW, cosine, validate;
    batches from a DataLoader over a TensorDataset, or by indexing the tensors with shuffled rows."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loader = DataLoader(TensorDataset(x, y, torch.arange(len(x))), batch_size=batch, shuffle=True)
    for epoch in range(epochs):
        student.train()
        batches = ((xb, yb, idx) for xb, yb, idx in loader) if data_loader else (
            (x[idx], y[idx], idx) for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
            .split(batch))
        for xb, yb, idx in batches:
            t = torch.from_numpy(np.asarray(teacher[:, idx.numpy()], dtype=np.float32))  # (K, B, C)
            logits = student(xb)  # (B, C)
            p = F.softmax(t / T, dim=-1).mean(0)  # (B, C)
            kl = F.kl_div(F.log_softmax(logits / T, dim=-1), p, reduction="batchmean") * T * T
            loss = ALPHA * kl + (1 - ALPHA) * F.cross_entropy(logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        student.eval()
        with torch.no_grad():
            float((torch.cat([student(v) for v in x_val.split(1024)]).argmax(1) == y_val).float().mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--student", default="cnn")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    epochs, rounds = args.epochs or (1 if args.quick else 2), args.rounds or (2 if args.quick else 3)
    data = load_dataset(FASHION if Path(FASHION).exists() else "digits", seed=0,
                        max_train=8000 if args.quick else None)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    x_val, y_val = torch.from_numpy(data.val.x), torch.from_numpy(data.val.y)
    classes = int(y.max()) + 1
    teacher = np.random.default_rng(0).normal(0, 3, (K, len(x), classes)).astype(np.float16)  # cached, as stored
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, progress=False)
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # the first optimizer imports torch._dynamo (~2 s): not timed
    seconds = {"compressor": [], "hand-written, DataLoader": [], "hand-written, tensor indexing": []}
    for _ in range(rounds):
        for name in seconds:
            torch.manual_seed(0)
            student = create_student(args.student, tuple(x.shape[1:]), classes)
            start = time.perf_counter()
            if name == "compressor":
                with tempfile.TemporaryDirectory() as folder:
                    train_student(student, x, y, CachedLogits(teacher), x_val, y_val,
                                  DistillationLoss(temperature=T, alpha=ALPHA), config, Path(folder))
            else:
                hand_written(student, x, y, teacher, x_val, y_val, epochs, args.batch_size, config.lr,
                             data_loader="DataLoader" in name)
            seconds[name].append((time.perf_counter() - start) / epochs)
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    hands = [name for name in seconds if name != "compressor"]
    ratios = {name: [h / c for c, h in zip(seconds["compressor"], seconds[name])] for name in hands}
    table = Table(title=f"seconds per epoch: --student {args.student}, {len(x):,} rows, batch {args.batch_size}")
    for column in ("loop", "median s/epoch", "rounds"):
        table.add_column(column, justify="left" if column == "loop" else "right")
    for name, values in seconds.items():
        table.add_row(name, f"{medians[name]:.2f}", ", ".join(f"{v:.2f}" for v in values))
    console = Console()
    console.print(table)
    for name in hands:
        console.print(f"compressor's loop is {medians[name] / medians['compressor']:.2f}x the {name} loop "
                      f"(per-round ratios {', '.join(f'{r:.2f}' for r in ratios[name])})")
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "student": args.student,
              "rows": len(x), "batch_size": args.batch_size, "epochs": epochs, "seconds_per_epoch": seconds,
              "median_seconds_per_epoch": medians,
              "ratios": {name: medians[name] / medians["compressor"] for name in hands},
              "round_ratios": ratios, "command": " ".join(sys.argv)}
    out = args.out or RESULTS / f"train_throughput{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, result)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
