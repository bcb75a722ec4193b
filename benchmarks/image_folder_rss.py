"""Issue 20's memory and speed checks for image folders: the main job over a folder of 60,000 Fashion-MNIST PNGs
and over a 6,000-image folder, same teachers and student, each in its own process, with its peak RSS; and the
teachers' inference throughput (images/s) on the streamed folder against the same images held in RAM.

The folders (28 × 28 grayscale PNGs written from the IDX files, read as 3 × 32 × 32 with ``--channels 3 --resize
32``) and a 3-member CNN ensemble trained here for one epoch are built once in ``--work-dir``.

    python benchmarks/image_folder_rss.py                 # 60k and 6k images (about 15 min on 2 cores)
    python benchmarks/image_folder_rss.py --quick         # 6k and 600 images
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compressor import save_ensemble  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.core.preprocessing import ImageSpec  # noqa: E402
from compressor.data.datasets import FASHION_MNIST_CLASSES, ReadOptions, load_dataset, read_idx  # noqa: E402
from compressor.data.lazy import LazyInputs  # noqa: E402
from compressor.teachers import load_ensemble  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results"
IMAGE = ["--channels", "3", "--resize", "32"]


def write_folder(root: Path, train: int, test: int, rgb_size: int | None = None) -> Path:
    """The first ``train`` and ``test`` Fashion-MNIST images as PNGs, DIR/<split>/<class>/<n>.png (written once):
    28 × 28 grayscale, or with ``rgb_size`` RGB resized to that many pixels a side."""
    if (root / "done").exists():
        return root
    for split, prefix, count in (("train", "train", train), ("test", "t10k", test)):
        images = read_idx(next(FASHION.glob(f"{prefix}-images*")))[:count]
        labels = read_idx(next(FASHION.glob(f"{prefix}-labels*")))[:count]
        for name in FASHION_MNIST_CLASSES:
            (root / split / name.replace("/", "-")).mkdir(parents=True, exist_ok=True)
        for n, (image, label) in enumerate(zip(images, labels)):
            picture = Image.fromarray(image, mode="L")
            if rgb_size is not None:
                picture = picture.convert("RGB").resize((rgb_size, rgb_size), Image.Resampling.BILINEAR)
            picture.save(root / split / FASHION_MNIST_CLASSES[label].replace("/", "-") / f"{n:05d}.png")
    (root / "done").write_text("")
    return root


def cnn(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))


def teachers(folder: Path, work: Path) -> Path:
    """Three CNNs (widths 16, 24, 32) trained one epoch on the small folder, saved as one ensemble file."""
    path = work / "teachers.pt"
    if path.exists():
        return path
    data = load_dataset(str(folder), read=ReadOptions(ImageSpec(3, 32), work / "cache"))
    x = LazyInputs(data.train.x, None, data.train.scale)
    y = torch.from_numpy(data.train.y)
    members = []
    for k, width in enumerate((16, 24, 32)):
        torch.manual_seed(k)
        model = cnn(width)
        optimiser = torch.optim.AdamW(model.parameters(), 3e-3)
        for start in range(0, len(x), 128):
            loss = nn.functional.cross_entropy(model(x[start:start + 128]), y[start:start + 128])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        members.append(model.eval())
    save_ensemble(members, path, x[:2], {"class_names": data.class_names})  # trained in the folder's class order
    return path


def peak_rss(command: list[str]) -> tuple[float, float, int]:
    """Run ``command`` in a child of a fresh interpreter; its peak RSS in MiB, its seconds and its exit code."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); code = subprocess.run(sys.argv[1:])"
             ".returncode; print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t,"
             " code)")
    out = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True)
    kib, seconds, code = out.stdout.strip().splitlines()[-1].split()
    return int(kib) / 1024, float(seconds), int(code)


def teacher_throughput(path: Path, folder: Path, work: Path, rows: int) -> dict:
    """Images per second of the whole ensemble on ``rows`` training images, streamed from the cache and in RAM."""
    ensemble = load_ensemble(path)
    data = load_dataset(str(folder), read=ReadOptions(ImageSpec(3, 32), work / "cache"))
    lazy = LazyInputs(data.train.x[:rows], None, data.train.scale)
    dense = lazy[:]
    figures = {}
    for name, x in (("streamed", lazy), ("in RAM", dense)):
        ensemble.member_logits(x[:256])  # warm-up
        start = time.perf_counter()
        ensemble.member_logits(x)
        figures[name] = rows / (time.perf_counter() - start)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-image-folder-rss"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console()
    big, small = ((6000, 1000), (600, 100)) if args.quick else ((60000, 10000), (6000, 1000))
    work = args.work_dir
    folders = {n: write_folder(work / f"fashion-png-{n[0]}", *n) for n in (small, big)}
    ensemble = teachers(folders[small], work)
    runs = {}
    for size in (small, big):
        command = ["compress", "--teacher", str(ensemble), "--data", str(folders[size]), *IMAGE, "--student",
                   "cnn:16x32", "--epochs", "1", "--out", str(work / f"run-{size[0]}"), "--teacher-cache",
                   str(work / "cache"), "--no-progress", "--warmup", "0.05", "--duration", "0.2"]
        mib, seconds, code = peak_rss(command)
        report = json.loads((work / f"run-{size[0]}" / "report.json").read_text()) if code == 0 else None
        runs[size[0] + size[1]] = {"images": size[0] + size[1], "peak_rss_mib": round(mib, 1),
                                   "seconds": round(seconds, 1), "exit": code, "command": shlex.join(command),
                                   "student_top1": None if report is None else next(
                                       r["accuracy"]["top1"] for r in report["rows"]
                                       if r["kind"] == "student" and r["backend"] == "onnxruntime")}
    sizes = sorted(runs)
    ratio = runs[sizes[1]]["peak_rss_mib"] / runs[sizes[0]]["peak_rss_mib"]
    throughput = teacher_throughput(ensemble, folders[big], work, 4096 if args.quick else 10000)
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "runs": runs,
              "rss_ratio": round(ratio, 3), "teacher_images_per_s": {k: round(v, 1) for k, v in throughput.items()}}
    table = Table(title="the main job over image folders (each run in its own process)")
    for column in ("images", "peak RSS MiB", "seconds", "exit"):
        table.add_column(column, justify="right")
    for size in sizes:
        run = runs[size]
        table.add_row(f"{run['images']:,}", f"{run['peak_rss_mib']:.0f}", f"{run['seconds']:.0f}", str(run["exit"]))
    console.print(table)
    console.print(f"peak RSS ratio {ratio:.2f}x for {sizes[1] / sizes[0]:.0f}x the images; teachers "
                  + ", ".join(f"{k} {v:,.0f} images/s" for k, v in throughput.items()))
    out = args.out or RESULTS / f"image_folder_rss{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, result)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
