"""The teacher-logit cache (compressor/teacher_cache.py): how much faster is a training epoch when the teachers'
logits are read from the cache than when the teachers run on every batch?

The issue's bar: with a 5-member ensemble of 2×1200 MLPs on Fashion-MNIST, epochs after the first run are at least
3× faster with the cache than without, measured by one script in one run. This is that script.

1. Teachers: ``--members`` 784-1200-1200-10 ReLU nets (no dropout), member k seeded with ``seed + k``, each trained
   for ``--teacher-epochs`` (default 1) with plain Adam on the training split, saved with
   ``compressor.save_ensemble`` as a user would. They are trained only so their logits look like a real teacher's:
   the timing does not depend on how well they are trained, only on their size (5 × 2.4 M parameters).
2. The same student (``--student``, default ``mlp:256x256``, batch 128, ``--epochs`` 3) is distilled three times,
   one after the other, in this process, with the same thread count:

   - **cold cache**: a fresh cache folder, so the teachers run once over every split and the entry is stored;
   - **warm cache**: a second run that reads the entry (the "epochs after the first run" of the issue);
   - **no cache** (``--no-cache``): the teachers run once on the held-out splits and again on every training batch.

Why ``compressor.pipeline.run`` and not its steps one by one: ``run(config)`` with a ``RunConfig`` built as the CLI
builds it is exactly what ``compress`` runs, so the figures are a user's, and the script does not depend on the
pipeline's internal step signatures. It runs in this process rather than in a ``compress`` subprocess so every mode
shares one interpreter and thread setting. The steps after training (export, parity, the latency benchmark) do not
depend on the cache; they are made cheap (0.05 s warm-up, 0.1 s timing, one round, batch 1) and cost the same in
every mode. What is measured, per mode:

- each training epoch's seconds, from the training loop itself (``report["student"]["training"]["history"]``, the
  report.json field student.training.history[].seconds), and their median;
- the whole run (wall time of ``run``) and the part of it outside training (loading, the teacher step, export,
  parity, latency benchmark). The teacher step is not timed on its own by the pipeline, so the one-off cost the
  first run pays is quoted as cold whole run − warm whole run: the same work but for running the teachers over
  every split and storing the entry, against reading it.

The warm run reads an entry written seconds before, so it is in the page cache: a later ``compress`` run on a
machine that has since evicted it reads the entry (a few MB) from disk once.

    python benchmarks/teacher_cache.py --no-progress          # about 1.5 minutes on 2 idle CPU cores
    python benchmarks/teacher_cache.py --quick --no-progress  # 5,000 training images, 2 epochs: about half a minute

Prints a table and the verdict, and writes ``benchmarks/results/teacher_cache[-quick].json``. Needs
``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/teacher_cache.py` finds compressor
from benchmarks.paper_common import FASHION, write_result
from compressor import save_ensemble
from compressor.config import RunConfig
from compressor.data.datasets import FASHION_MNIST_CLASSES, load_dataset
from compressor.core.fileio import write_json_atomic
from compressor.pipeline import run
from compressor.core.inference import parameter_count

MODES = ("cold cache", "warm cache", "no cache")
TARGET_SPEEDUP = 3.0  # the bar: per-epoch time without the cache / with a warm cache


def teacher_net() -> nn.Sequential:
    """784-1200-1200-10 ReLU: the size of Hinton et al.'s big MNIST net, without its dropout."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(),
                         nn.Linear(1200, 10))


def build_teachers(args: argparse.Namespace, folder: Path, console: Console) -> tuple[Path, dict]:
    """Train ``--members`` teachers briefly and save them as one ensemble file; reuse the file when ``folder`` holds
    one made with the same settings. Returns the file and a summary (seconds, test accuracy of each member)."""
    settings = {key: getattr(args, key) for key in ("members", "teacher_epochs", "max_train", "seed")}
    path, record = folder / "teachers.pt", folder / "teachers.json"
    if path.is_file() and record.is_file() and json.loads(record.read_text())["settings"] == settings:
        console.print(f"[bold]teachers[/] reusing {path}")
        return path, json.loads(record.read_text())
    data = load_dataset(FASHION, seed=args.seed, max_train=args.max_train)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)  # (N, 1, 28, 28), (N,)
    x_test, y_test = torch.from_numpy(data.test.x), torch.from_numpy(data.test.y)
    started, members, accuracy = time.perf_counter(), [], []
    for k in range(args.members):
        torch.manual_seed(args.seed + k)
        net = teacher_net()
        optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(args.seed + k)
        for _ in range(args.teacher_epochs):
            for idx in torch.randperm(len(x), generator=generator).split(128):
                optimiser.zero_grad()
                nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
                optimiser.step()
        net.eval()
        with torch.no_grad():
            accuracy.append(float((net(x_test).argmax(1) == y_test).double().mean()))
        console.print(f"  teacher {k + 1}/{args.members}: test accuracy {accuracy[-1]:.2%}")
        members.append(net)
    save_ensemble(members, path, x[:2], {"class_names": FASHION_MNIST_CLASSES, "dataset": FASHION,
                                         "member_names": [f"mlp-2x1200-{k + 1}" for k in range(args.members)]})
    summary = {"settings": settings, "seconds": round(time.perf_counter() - started, 1),
               "member_test_accuracy": accuracy, "parameters": sum(parameter_count(m) for m in members)}
    write_json_atomic(record, summary)
    return path, summary


def run_mode(mode: str, teacher: Path, cache_root: Path, out: Path, args: argparse.Namespace, threads: int,
             console: Console) -> dict:
    """Run the main job once in ``mode``; one row of timings."""
    config = RunConfig(teacher=teacher, student=args.student, out=out, epochs=args.epochs, batch_size=args.batch_size,
                       seed=args.seed, max_train=args.max_train, teacher_cache=cache_root,
                       no_cache=mode == "no cache", threads=threads, progress=not args.no_progress,
                       warmup_s=0.05, duration_s=0.1, rounds=1, batch_sizes=(1,),
                       command=f"benchmarks/teacher_cache.py ({mode})")
    console.rule(f"[bold]{mode}")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    report = run(config, console).report
    whole = time.perf_counter() - started
    training = report["student"]["training"]
    epochs = [epoch["seconds"] for epoch in training["history"]]
    cache = report["teacher_cache"]
    row = {"mode": mode, "cache_enabled": cache["enabled"], "cache_hit": cache.get("hit"),
           "epoch_seconds": [round(s, 2) for s in epochs], "epoch_median_seconds": round(statistics.median(epochs), 3),
           "training_seconds": round(training["seconds"], 2), "whole_seconds": round(whole, 2),
           "outside_training_seconds": round(whole - training["seconds"], 2),
           "best_val_accuracy": training["best_val_accuracy"], "last_train_loss": training["history"][-1]["train_loss"],
           "rows": report["data"]["sizes"]["train"], "load_average_1min": [round(load_before, 2),
                                                                          round(os.getloadavg()[0], 2)]}
    console.print(f"  epochs {row['epoch_seconds']} s, whole run {whole:.1f} s, best val "
                  f"{row['best_val_accuracy']:.2%}, 1-min load {row['load_average_1min']}")
    return row


def summarise(rows: list[dict]) -> dict:
    """The issue's ratio (median epoch without the cache / with a warm cache) and the others worth quoting."""
    by_mode = {row["mode"]: row for row in rows}
    cold, warm, none = (by_mode[mode] for mode in MODES)
    per_epoch = none["epoch_median_seconds"] / warm["epoch_median_seconds"]
    return {"per_epoch_speedup": round(per_epoch, 2),
            "per_epoch_speedup_cold": round(none["epoch_median_seconds"] / cold["epoch_median_seconds"], 2),
            "whole_run_speedup_warm": round(none["whole_seconds"] / warm["whole_seconds"], 2),
            "whole_run_speedup_cold": round(none["whole_seconds"] / cold["whole_seconds"], 2),
            "first_run_one_off_seconds": round(cold["whole_seconds"] - warm["whole_seconds"], 2),
            "target": TARGET_SPEEDUP, "meets_target": per_epoch >= TARGET_SPEEDUP}


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="teacher-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]teachers[/] {args.members} × 784-1200-1200-10 ReLU, {args.teacher_epochs} epoch(s) of Adam "
                  f"each (the timing does not depend on how well they are trained); work folder {work}")
    teacher, teachers = build_teachers(args, work, console)
    cache_root = work / "teacher-cache"
    shutil.rmtree(cache_root, ignore_errors=True)  # the cold run must find nothing
    rows = []
    for mode in MODES:
        out = work / mode.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        rows.append(run_mode(mode, teacher, cache_root, out, args, threads, console))
    entry = Path(next(cache_root.iterdir()))
    result = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": threads,
                    "device": "cuda" if torch.cuda.is_available() else "cpu"},
        "settings": vars(args), "teachers": teachers,
        "cache_entry_bytes": sum(file.stat().st_size for file in entry.iterdir()),
        "rows": rows, "summary": summarise(rows), "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return write_result(result, args, "teacher_cache", print_table, console)


def print_table(result: dict) -> None:
    """One row per mode, then the ratio and the verdict."""
    settings, summary = result["settings"], result["summary"]
    table = Table(title=f"teacher-logit cache: {settings['members']} × 2×1200 teachers, {settings['student']} "
                        f"student, {result['rows'][0]['rows']:,} Fashion-MNIST rows, batch {settings['batch_size']}")
    for column in ("mode", "epoch s (median)", "each epoch s", "training s", "outside training s", "whole run s",
                   "best val acc"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for row in result["rows"]:
        table.add_row(row["mode"], f"{row['epoch_median_seconds']:.2f}",
                      " / ".join(f"{s:.1f}" for s in row["epoch_seconds"]), f"{row['training_seconds']:.1f}",
                      f"{row['outside_training_seconds']:.1f}", f"{row['whole_seconds']:.1f}",
                      f"{row['best_val_accuracy']:.2%}")
    Console(width=140).print(table)
    print(f"per epoch, no cache / warm cache: {summary['per_epoch_speedup']:.1f}× (cold cache "
          f"{summary['per_epoch_speedup_cold']:.1f}×); whole run: {summary['whole_run_speedup_warm']:.1f}× warm, "
          f"{summary['whole_run_speedup_cold']:.1f}× cold; the first run's one-off (cold − warm whole run): "
          f"{summary['first_run_one_off_seconds']:.1f} s")
    print(f"≥ {summary['target']:g}× per epoch: {'yes' if summary['meets_target'] else 'no'}")
    print(f"teachers trained {settings['teacher_epochs']} epoch(s) only: the timing does not depend on how well they "
          f"are trained. Wall time {result['wall_seconds'] / 60:.1f} min, {result['machine']['threads']} threads, "
          f"cache entry {result['cache_entry_bytes'] / 1e6:.1f} MB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 training images and 2 student epochs")
    parser.add_argument("--members", type=int, default=5, help="2×1200 teachers in the ensemble")
    parser.add_argument("--teacher-epochs", type=int, default=1, help="Adam epochs per teacher")
    parser.add_argument("--student", default="mlp:256x256")
    parser.add_argument("--epochs", type=int, default=None, help="student epochs per mode (full 3, quick 2)")
    parser.add_argument("--batch-size", type=int, default=RunConfig.batch_size)
    parser.add_argument("--max-train", type=int, default=None, help="cap on each split (quick: 5,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every mode (default: torch's)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None,
                        help="result JSON (default benchmarks/results/teacher_cache[-quick].json)")
    parser.add_argument("--work-dir", default=None,
                        help="teachers, cache and checkpoints (default: a new temporary folder); teachers found there "
                             "with the same settings are reused, the cache is always rebuilt")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.max_train = args.max_train or (5000 if args.quick else None)
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
