"""Issue 31's end-to-end check of ``compressor.compress`` called from Python, as a team would from a notebook:
timm teachers held in memory and the team's own torch Dataset, nothing saved first.

1. ``FashionRows``: a map-style Dataset of Fashion-MNIST read from its IDX files with numpy (the script's own
   decoder), with a custom transform: pixels to float, bilinear resize to 32 × 32, normalised by the dataset's
   mean and std. The transform is the preprocessing: compressor stores what the Dataset yields.
2. Teachers: ``timm.create_model(NAME, num_classes=10, in_chans=1)`` for ``--teachers`` (default resnet10t,
   resnet14t), seeded 0, 1, ..., trained 3 epochs (2 with --quick) with AdamW (lr 2e-3, cosine) through a
   DataLoader over the same Dataset, and kept in memory.
3. ``compressor.compress(teachers, compressor.Data(train=..., test=..., classes=...), budget=..., baseline=True)``
   with the student chosen by measurement; ``on_epoch`` collects every epoch.
4. ``result.bundle.predict`` on the test Dataset's tensors must reproduce the report's ONNX Runtime accuracy.

    python benchmarks/api_example.py            # 12,000 training rows, 3 teacher epochs, a 4-minute budget
    python benchmarks/api_example.py --quick    # 3,000 rows, 2 teacher epochs, a 1-minute budget

Needs timm (``pip install -e '.[images]'``) and Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``).
Prints a table and writes ``benchmarks/results/api_example[-quick].json``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds compressor/
import compressor  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.data.datasets import FASHION_MNIST_CLASSES, read_idx  # noqa: E402
from compressor.deployment.report import environment  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results"


class FashionRows(torch.utils.data.Dataset):
    """The first ``rows`` images of one Fashion-MNIST IDX split, each transformed as it is read."""

    def __init__(self, split: str, rows: int):
        images = read_idx(next(FASHION.glob(f"{split}-images-idx3-ubyte*")))
        labels = read_idx(next(FASHION.glob(f"{split}-labels-idx1-ubyte*")))
        self.images, self.labels = images[:rows], labels[:rows].astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return transform(self.images[i]), int(self.labels[i])


def transform(image: np.ndarray) -> torch.Tensor:
    """(28, 28) uint8 → (1, 32, 32) float32: resized bilinearly, then normalised by Fashion-MNIST's mean and std."""
    x = torch.from_numpy(np.array(image)).float().div(255)[None, None]  # (1, 1, 28, 28)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)[0]
    return (x - 0.286) / 0.353


def train_teachers(names: list[str], data: torch.utils.data.Dataset, epochs: int, console: Console) -> list:
    """The timm teachers, trained here and kept in memory."""
    import timm

    members = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=10, in_chans=1)
        loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True, num_workers=2)
        optimiser = torch.optim.AdamW(model.parameters(), 2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs * len(loader))
        start = time.perf_counter()
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        console.print(f"teacher {name}: {epochs} epoch(s) in {time.perf_counter() - start:.0f} s")
        members.append(model.eval())
    return members


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--teachers", default="resnet10t,resnet14t")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-api-example"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not FASHION.is_dir():
        print(f"{FASHION} is missing: apt-get install -y dataset-fashion-mnist", file=sys.stderr)
        return 2
    console = Console(width=150)
    rows, test_rows, teacher_epochs, budget = (3000, 1000, 2, 1.0) if args.quick else (12000, 2000, 3, 4.0)
    started = time.perf_counter()
    train, test = FashionRows("train", rows), FashionRows("t10k", test_rows)
    teachers = train_teachers(args.teachers.split(","), train, teacher_epochs, console)
    epochs = []
    result = compressor.compress(teachers, compressor.Data(train=train, test=test, classes=FASHION_MNIST_CLASSES),
                                 budget=budget, baseline=True, out=args.work_dir / "run",
                                 teacher_cache=args.work_dir / "cache", on_epoch=epochs.append)
    x = np.stack([test[i][0].numpy() for i in range(len(test))])  # the Dataset's tensors, as a service gets them
    bundle_top1 = float((result.bundle.predict(x).argmax(1) == test.labels).mean())
    report = result.report
    table = Table(title=f"compressor.compress on {rows:,} Fashion-MNIST rows, timm teachers in memory")
    for column in ("model", "backend", "top-1", "b1 p50 ms"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for row in report["rows"]:
        table.add_row(row["model"], row["backend"], f"{row['accuracy']['top1']:.2%}",
                      f"{row['latency']['1']['median_ms']:.3f}")
    console.print(table)
    student = next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == "onnxruntime")
    same = bundle_top1 == student["accuracy"]["top1"]
    console.print(f"bundle.predict on the test Dataset: {bundle_top1:.2%}; the report's onnxruntime student: "
                  f"{student['accuracy']['top1']:.2%} ({'the same' if same else 'DIFFERENT'})")
    console.print(result.headline)
    out = args.out or RESULTS / f"api_example{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "environment": environment(),
        "teachers": args.teachers.split(","), "teacher_epochs": teacher_epochs, "train_rows": rows,
        "test_rows": test_rows, "budget_minutes": budget, "report_command": report["command"],
        "student": report["student"]["spec"], "student_top1": student["accuracy"]["top1"],
        "bundle_top1": bundle_top1, "bundle_reproduces_report": same, "epochs_heard": len(epochs),
        "data_keyed_by": report["data"]["split"]["keyed_by"], "headline": result.headline,
        "rows": [{k: row[k] for k in ("model", "backend", "parameters", "accuracy")} | {
            "b1_median_ms": row["latency"]["1"]["median_ms"]} for row in report["rows"]],
        "seconds": round(time.perf_counter() - started, 1)})
    console.print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
