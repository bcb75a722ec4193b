"""The main job on Fashion-MNIST with an ensemble a user saved: train K small CNN teachers, save them with
``compressor.save_ensemble``, then run ``compress --teacher ... --data <fashion-mnist> --target onnxruntime``.

Prints the report's table and headline; the run's report.json lands in ``--out`` (default
compressed/fashion-main-job). Needs ``apt-get install -y dataset-fashion-mnist``.

    python benchmarks/fashion_main_job.py [--teacher-epochs 3] [--epochs 10] [--student cnn:16x32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from compressor import save_ensemble
from compressor.cli import main
from compressor.data.datasets import load_dataset

FASHION = "/usr/share/datasets/fashion-mnist"


def teacher(width: int) -> nn.Sequential:
    """A BN CNN member: two conv blocks, global features, a 128-unit head."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),          # (w, 14, 14)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # (2w, 7, 7)
        nn.Flatten(), nn.Linear(2 * width * 49, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    """Hard-label AdamW training, seeded."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(128):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    return model.eval()


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    data = load_dataset(FASHION, seed=0)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    started = time.perf_counter()
    members = []
    for k, width in enumerate(args.widths):
        torch.manual_seed(k)
        members.append(train(teacher(width), x, y, args.teacher_epochs, seed=k))
    teacher_seconds = time.perf_counter() - started
    path = save_ensemble(members, out / "teachers" / "fashion-cnn-ensemble.pt", x[:2],
                         {"class_names": data.class_names, "dataset": FASHION})
    code = main(["--teacher", str(path), "--data", FASHION, "--target", "onnxruntime", "--out", str(out),
                 "--student", args.student, "--epochs", str(args.epochs), "--no-progress"])
    if code == 0:
        report = json.loads((out / "report.json").read_text())
        report_summary = {"teacher_seconds": round(teacher_seconds, 1), "total_seconds": report["seconds_total"],
                          "rows": [(r["model"], r["backend"], r["parameters"], r["accuracy"]["top1"],
                                    r["latency"]["1"]["median_ms"], r["latency"]["64"]["median_ms"])
                                   for r in report["rows"]]}
        print(json.dumps(report_summary, indent=1))
    return code


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="compressed/fashion-main-job")
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 32, 48])
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student", default="cnn:16x32")
    sys.exit(run(parser.parse_args()))
