"""Hinton, Vinyals & Dean (2015) §5, specialist ensembles, rerun on Fashion-MNIST with compressor's parts.

The paper (JFT, 100M images, 15,000 classes): one generalist plus 61 specialists, each trained from the generalist's
weights on its confusable subset (found by clustering the covariance of the generalist's predictions), raised
test top-1 from 25.0% to 26.1% (+4.4% relative), and the gain grew with the number of specialists covering a test
case (its Table 4). The specialists trained independently, in parallel, in days rather than weeks. The paper never
distilled the result into one model; compressor does.

Here, on Fashion-MNIST (54,000 / 6,000 / 10,000 images, the split ``--data`` gives the main job):

1. the generalist: ``cnn:32x64`` (a BatchNorm CNN of compressor's student registry) trained on hard labels with
   ``train_student`` for ``--generalist-epochs``, saved with ``save_ensemble``;
2. ``compress specialists`` with ``--num-specialists`` (default 2) and no ``--subsets``: the clustering picks the
   subsets (expected: the upper-body garments and the footwear). It runs twice, once with ``--jobs 1`` and once with
   ``--jobs M``, into separate folders, for the wall time of sequential against parallel training;
3. the main job on the parallel run's ensemble: the same student (``--student``, default ``mlp:256x256``)
   distilled from the specialist ensemble and from the generalist alone with the same budget.

Prints the table beside the paper's figures and writes ``benchmarks/results/paper_specialists[-quick].json``.

    python benchmarks/paper_specialists.py               # the full run (about 30 minutes on 2 cores)
    python benchmarks/paper_specialists.py --quick       # a few minutes: 6,000 training images, few epochs

Needs ``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from compressor.config import RunConfig, SpecialistsConfig
from compressor.data.datasets import load_dataset
from compressor.training.loop import TrainConfig, train_student
from compressor.core.inference import evaluate_accuracy
from compressor.training.losses import HardLabelLoss
from compressor.pipeline import run
from compressor.training.specialist_training import run_specialists
from compressor.students import create_student
from compressor.teachers.formats import save_ensemble
from compressor.core.inference import parameter_count
from targets.report import SPECIALIST_COLUMNS, specialist_rows

FASHION = "/usr/share/datasets/fashion-mnist"
RESULTS = Path(__file__).resolve().parent / "results"
PAPER = {"generalist_top1": 0.250, "specialists_top1": 0.261, "relative_gain": 0.044, "specialists": 61,
         "note": "JFT, 15,000 classes; the gain grew with the number of specialists covering a test case"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6,000 training images and few epochs")
    parser.add_argument("--num-specialists", type=int, default=2)
    parser.add_argument("--generalist-epochs", type=int, default=None, help="full 6, quick 2")
    parser.add_argument("--specialist-epochs", type=int, default=None, help="full 3, quick 1")
    parser.add_argument("--student", default="mlp:256x256")
    parser.add_argument("--student-epochs", type=int, default=None, help="full 20, quick 3")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="where every run goes (default: a new temporary folder)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.generalist_epochs = args.generalist_epochs or (2 if args.quick else 6)
    args.specialist_epochs = args.specialist_epochs or (1 if args.quick else 3)
    args.student_epochs = args.student_epochs or (3 if args.quick else 20)
    args.max_train = args.max_train or (6000 if args.quick else None)
    if not Path(FASHION).is_dir():
        sys.exit(f"{FASHION} is missing: apt-get install -y dataset-fashion-mnist")
    console = Console(stderr=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="paper-specialists-"))
    started = time.perf_counter()

    generalist, generalist_record = train_generalist(args, work, console)
    runs = {}
    for jobs in (1, args.num_specialists):
        config = SpecialistsConfig(teacher=generalist, out=work / f"specialists-jobs{jobs}",
                                   num_specialists=args.num_specialists, data=FASHION, jobs=jobs,
                                   epochs=args.specialist_epochs, seed=args.seed, max_train=args.max_train,
                                   progress=not args.no_progress)
        console.print(f"[bold]specialists with --jobs {jobs}[/]")
        runs[jobs] = run_specialists(config, console)
    parallel = runs[args.num_specialists]
    report = run(RunConfig(teacher=Path(parallel["ensemble"]), data=FASHION, student=args.student,
                           out=work / "main-job", epochs=args.student_epochs, seed=args.seed, max_train=args.max_train,
                           batch_sizes=(1,), warmup_s=0.05, duration_s=0.2, rounds=1, progress=not args.no_progress,
                           command="benchmarks/paper_specialists.py main job"), console).report
    result = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "settings": vars(args), "paper": PAPER, "generalist": generalist_record,
        "subsets": parallel["subsets"], "test": parallel["test"],
        "training_seconds": {"jobs 1": runs[1]["training_seconds"],
                             f"jobs {args.num_specialists}": parallel["training_seconds"]},
        "specialist_records": parallel["specialists"],
        "students": {key: report["specialists"][key] for key in
                     ("student_from_specialists_top1", "student_from_generalist_top1", "student_difference",
                      "student_difference_interval_95")},
        "main_job_report": str(work / "main-job" / "report.json"),
        "seconds_total": round(time.perf_counter() - started, 1),
    }
    print_table(result, args.num_specialists)
    out = Path(args.out) if args.out else RESULTS / f"paper_specialists{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {out}")
    return result


def train_generalist(args: argparse.Namespace, work: Path, console: Console) -> tuple[Path, dict]:
    """``cnn:32x64`` on the hard labels of the main job's own split, saved as a one-member teacher file."""
    data = load_dataset(FASHION, seed=args.seed, max_train=args.max_train)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    xv, yv = torch.from_numpy(data.val.x), torch.from_numpy(data.val.y)
    torch.manual_seed(args.seed)
    model = create_student("cnn:32x64", tuple(data.input_shape), 10)
    console.print(f"[bold]generalist[/] cnn:32x64, {args.generalist_epochs} epochs on {len(x):,} images")
    config = TrainConfig(epochs=args.generalist_epochs, seed=args.seed, progress=not args.no_progress)
    training = train_student(model, x, y, None, xv, yv, HardLabelLoss(), config, work / "generalist-checkpoints",
                             resume=True, fingerprint={"max_train": args.max_train})
    path = save_ensemble([model], work / "generalist.pt", x[:2], {"class_names": data.class_names,
                                                                  "dataset": FASHION, "member_names": ["generalist"]})
    test = evaluate_accuracy(model, torch.from_numpy(data.test.x), torch.from_numpy(data.test.y))
    return path, {"architecture": "cnn:32x64", "parameters": parameter_count(model),
                  "epochs": args.generalist_epochs, "best_epoch": training.best_epoch, "test_top1": test,
                  "seconds": round(training.seconds, 1)}


def print_table(result: dict, num_specialists: int) -> None:
    """The generalist against generalist + specialists, beside the paper's JFT figures, then time and students."""
    table = Table(title="Fashion-MNIST test split: generalist vs generalist + specialists (paper §5)")
    for column in (*SPECIALIST_COLUMNS, "paper (JFT)"):
        table.add_column(column, justify="left" if column in ("test rows", "paper (JFT)") else "right")
    paper = {"all": "25.0% → 26.1% (+4.4% relative)"}
    for cells in specialist_rows(result["test"]):
        active = cells[0].endswith("active") and not cells[0].startswith("0 ")
        table.add_row(*cells, paper.get(cells[0], "gain grows with specialists covering" if active else ""))
    console = Console(width=150)  # the table is read in logs and RESULTS.md, not only in a terminal
    console.print(table)
    console.print("subsets: " + "; ".join(", ".join(s) for s in result["subsets"]))
    seconds = result["training_seconds"]
    sequential, parallel = seconds["jobs 1"], seconds[f"jobs {num_specialists}"]
    console.print(f"specialist training wall time: {sequential:.0f} s with --jobs 1, {parallel:.0f} s with --jobs "
                  f"{num_specialists} ({sequential / parallel:.2f}× on {result['machine']['cpu_count']} cores)")
    students = result["students"]
    low, high = students["student_difference_interval_95"]
    console.print(f"students ({result['settings']['student']}, same budget): from the specialist ensemble "
                  f"{students['student_from_specialists_top1']:.2%}, from the generalist alone "
                  f"{students['student_from_generalist_top1']:.2%} (difference "
                  f"{100 * students['student_difference']:+.2f} pt, 95% interval {100 * low:+.2f} to "
                  f"{100 * high:+.2f})")


if __name__ == "__main__":
    main()
