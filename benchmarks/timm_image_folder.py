"""Issue 20's end-to-end check with library models: an ensemble of three timm ResNets trained here on an image
folder of Fashion-MNIST PNGs (RGB, 32 × 32), saved as TorchScript as a user would, then distilled by ``compress``
into a ``timm:`` and a ``torchvision:`` student and exported to ONNX Runtime, each with ``--baseline``. For each
student the bundle's own predictor (``Bundle.predict_images`` on the test folder's PNG files) must reproduce the
report's ONNX Runtime accuracy.

1. The folder: the first ``--train`` Fashion-MNIST training images and ``--test`` test images, converted to RGB
   and resized to 32 × 32 (bilinear), as DIR/{train,test}/<class>/<n>.png (``compress`` carves validation from
   train).
2. Teachers: ``timm.create_model(NAME, num_classes=10)`` for ``--teachers`` (default resnet10t, resnet18,
   resnet14t), seeded 0, 1, 2, trained 5 epochs (1 with --quick) with AdamW (lr 2e-3, cosine) and random
   horizontal flips on the training split as ``compress`` decodes it, normalised with the mean and std recorded in
   the file's metadata. The teachers' class order is their ``class_names``; the folder's sorted names are
   renumbered to it, as ``compress`` does.
3. Each student: ``compress --teacher ensemble.pt --data DIR --channels 3 --student SPEC --epochs 10 --baseline
   --target onnxruntime`` (2 epochs with --quick) in its own process (the CLI a user runs), sharing one teacher cache.

    python benchmarks/timm_image_folder.py             # about 20 minutes on 2 cores
    python benchmarks/timm_image_folder.py --quick     # 3,000 training images, 1 teacher epoch, 2 student epochs

Needs timm and torchvision built for the installed torch (``pip install -e '.[images]'``: on the CPU machines
this project is built on, torch 2.14.1 with torchvision 0.29.1; see docs/benchmarks.md). Prints a table and writes
``benchmarks/results/timm_image_folder[-quick].json``.
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

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.image_folder_rss import write_folder  # noqa: E402
from compressor import save_ensemble  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.core.preprocessing import ImageSpec  # noqa: E402
from compressor.data.datasets import FASHION_MNIST_CLASSES, ReadOptions, load_dataset  # noqa: E402
from compressor.data.lazy import LazyInputs  # noqa: E402
from compressor.data.loading import align_classes  # noqa: E402
from targets.bundle import load_bundle  # noqa: E402

RESULTS = Path(__file__).parent / "results"
NORMALISATION = {"mean": [0.286] * 3, "std": [0.353] * 3}  # Fashion-MNIST's pixel mean and std, per channel


def train_teachers(folder: Path, work: Path, names: list[str], epochs: int, console: Console) -> Path:
    """The timm ensemble, trained on the folder's training split and saved with compressor.save_ensemble."""
    import timm

    path = work / "ensemble.pt"
    if path.exists():
        return path
    data = load_dataset(str(folder), read=ReadOptions(ImageSpec(3), work / "cache"))
    align_classes(data, FASHION_MNIST_CLASSES)
    x = LazyInputs(data.train.x, NORMALISATION, data.train.scale)
    y = torch.from_numpy(data.train.y)
    x_test = LazyInputs(data.test.x, NORMALISATION, data.test.scale)[:]
    members = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        steps = epochs * ((len(y) + 127) // 128)
        optimiser = torch.optim.AdamW(model.parameters(), 2e-3)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
        start = time.perf_counter()
        for _ in range(epochs):
            model.train()
            for rows in torch.randperm(len(y)).split(128):
                xb = x[rows]
                flip = torch.rand(len(rows)) < 0.5
                xb[flip] = xb[flip].flip(-1)
                loss = torch.nn.functional.cross_entropy(model(xb), y[rows])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
        model.eval()
        with torch.inference_mode():
            top1 = float((model(x_test).argmax(1).numpy() == data.test.y).mean())
        console.print(f"teacher {name}: {top1:.2%} on the test folder after {epochs} epochs "
                      f"({time.perf_counter() - start:.0f} s)")
        members.append(model)
    save_ensemble(members, path, x[:2], {"class_names": FASHION_MNIST_CLASSES, "normalisation": NORMALISATION,
                                         "member_names": names})
    return path


def distil(student: str, ensemble: Path, folder: Path, work: Path, epochs: int) -> dict:
    """``compress`` into ``student`` in its own process; its report, bundle check and wall time."""
    out = work / f"run-{student.replace(':', '-')}"
    command = [sys.executable, "-m", "compressor", "--teacher", str(ensemble), "--data", str(folder), "--channels",
               "3", "--student", student, "--epochs", str(epochs), "--baseline", "--target", "onnxruntime",
               "--out", str(out), "--teacher-cache", str(work / "cache"), "--no-progress"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        return {"student": student, "exit": done.returncode, "error": done.stderr.strip().splitlines()[-1:],
                "command": shlex.join(command)}
    report = json.loads((out / "report.json").read_text())
    rows = {(row["kind"], row["backend"]): row for row in report["rows"] if row["kind"] != "member"}
    bundle = load_bundle(out / "bundle")
    files = sorted((folder / "test").rglob("*.png"))
    position = {name.replace("/", "-"): k for k, name in enumerate(bundle.class_names)}
    labels = np.array([position[f.parent.name] for f in files])
    predicted = np.concatenate([bundle.predict_images(files[i:i + 256]).argmax(1) for i in range(0, len(files), 256)])
    student_row = rows[("student", "onnxruntime")]
    return {"student": student, "exit": 0, "seconds": round(seconds, 1), "command": shlex.join(command),
            "parameters": report["student"].get("parameters"),
            "student_top1": student_row["accuracy"]["top1"],
            "bundle_top1": float((predicted == labels).mean()),
            "baseline_top1": rows[("baseline", "PyTorch eager")]["accuracy"]["top1"],
            "ensemble_top1": rows[("ensemble", "PyTorch eager")]["accuracy"]["top1"],
            "best_member": report.get("best_member_export"),
            "batch1_ms": student_row.get("latency", {}).get("1", {}).get("median_ms"),
            "headline": report.get("headline")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-timm-image-folder"))
    parser.add_argument("--teachers", default="resnet10t,resnet18,resnet14t")
    parser.add_argument("--students", default="timm:mobilenetv3_small_050,torchvision:mobilenet_v3_small")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=150)
    train, test, teacher_epochs, epochs = (3000, 600, 1, 2) if args.quick else (12000, 2000, 5, 10)
    work = args.work_dir / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    folder = write_folder(work / "fashion-png-rgb32", train, test, rgb_size=32)
    ensemble = train_teachers(folder, work, args.teachers.split(","), teacher_epochs, console)
    runs = [distil(student, ensemble, folder, work, epochs) for student in args.students.split(",")]
    import timm
    import torchvision
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__,
              "torchvision": torchvision.__version__, "images": {"train": train, "test": test},
              "teachers": args.teachers.split(","), "teacher_epochs": teacher_epochs, "student_epochs": epochs,
              "runs": runs}
    table = Table(title=f"timm ensemble ({args.teachers}) on {train:,} RGB 32×32 PNGs → ONNX Runtime")
    for column in ("student", "exit", "params", "student", "bundle", "baseline", "ensemble", "b1 ms", "s"):
        table.add_column(column, justify="right")
    for run in runs:
        if run["exit"] != 0:
            table.add_row(run["student"], str(run["exit"]), *[""] * 7)
            console.print(f"[red]{run['student']}[/]: {run['error']}")
            continue
        table.add_row(run["student"], "0", f"{run['parameters'] or 0:,}", f"{run['student_top1']:.2%}",
                      f"{run['bundle_top1']:.2%}", f"{run['baseline_top1']:.2%}", f"{run['ensemble_top1']:.2%}",
                      f"{run['batch1_ms']:.3f}" if run["batch1_ms"] else "", f"{run['seconds']:.0f}")
    console.print(table)
    for run in runs:
        if run["exit"] == 0:
            console.print(f"{run['student']}: {run['headline']}")
    out = args.out or RESULTS / f"timm_image_folder{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, result)
    console.print(f"wrote {out}")
    return 0 if all(run["exit"] == 0 and abs(run["bundle_top1"] - run["student_top1"]) < 1e-9 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
