"""Which distillation recipe keeps a teacher ensemble's gain over a tuned hard-label baseline, for which student?

On Fashion-MNIST, with compressor's own main job (``compressor.pipeline.run``, the code behind ``compress``):

1. the teachers: ``--members`` BatchNorm CNNs (``--teacher-spec``, default ``cnn:32x64x128``, ~94k parameters),
   each seeded differently and trained on the hard labels with ±2-pixel shifts (``compressor.data.augment.Shift``),
   which makes them strong and robust to the shifted views the augmenting recipes show them; saved as one
   ensemble file. With ``--mlp-teachers``, also the paper's 2×1200 MLP ensemble, trained by
   ``benchmarks.paper_common.train_teacher_ensemble`` with paper_table's teacher settings;
2. for each ``--students`` spec and each ``--recipes`` entry (hinton, consistent, function-matching, auto), one
   main job with ``--baseline``: the run trains the student and the same architecture on the hard labels alone
   (the same budget and views; with ``auto`` the recipe and the baseline are tuned for ``--tune-minutes``);
3. every student and baseline (``student.pt``, ``baseline.pt``) is scored here on the run's own test split. The
   reference baseline is the tuned one (the auto run's), else the hinton run's: "gain kept" is
   (student − baseline) / (ensemble − baseline) in test top-1, with a paired bootstrap 95% interval
   (``compressor.deployment.rows.gain_kept``); each run's report also gives it against its own same-budget baseline.
   ``--reference-baseline`` scores against an earlier run's ``baseline.pt`` instead, so rows at another schedule
   (``--epochs 100``) are measured against the baseline tuned at the default one.
   The summary also scores the best recipe against the strongest labels-only model on validation among every
   baseline scored (tuned, each run's own, the reference), since a patient baseline with the views can beat the
   tuned one. "agreement (transfer)" is each model's top-1 agreement with the ensemble on the whole transfer set:
   a student that cannot imitate the teachers even where it was taught cannot keep their gain, whatever the recipe.

The teachers train on exactly the training split the main job makes (``--seed``, its default validation share), so
no teacher has seen a student's validation or test image. A finished teacher or run in ``--work-dir`` is reused, so
a killed full run resumes where it stopped.

    python benchmarks/distill_quality.py            # the full table (several hours on 2 CPU cores)
    python benchmarks/distill_quality.py --quick    # a few minutes: 5,000 images, 2 teachers, 2 epochs

Prints one table per teacher family and writes ``benchmarks/results/distill_quality[-quick].json``. Needs
``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/distill_quality.py` finds it
from benchmarks.paper_common import (
    FASHION,
    FashionData,
    Runs,
    add_run_arguments,
    add_teacher_arguments,
    load_fashion,
    record,
    train_teacher_ensemble,
    write_result,
)
from compressor.data.augment import Shift
from compressor.options import command_line
from compressor.deployment.rows import EAGER
from compressor.deployment.verdict import gain_kept
from compressor.config import RunConfig
from compressor.training.loop import TrainConfig, train_student
from compressor.core.inference import evaluate_accuracy, predict_logits
from compressor.training.distributed import training_device
from compressor.core.errors import CompressorError
from compressor.training.losses import HardLabelLoss
from compressor.pipeline import run
from compressor.data.loading import load_data, to_tensors
from compressor.students import create_student
from compressor.teachers.formats import load_ensemble, save_ensemble

DEFAULTS = {"full": {"members": 3, "teacher_epochs": 30, "epochs": 40, "tune_minutes": 20.0, "max_train": None},
            "quick": {"members": 2, "teacher_epochs": 2, "epochs": 2, "tune_minutes": 1.0, "max_train": 5000}}
BASELINE_ROWS = ("hinton", "consistent", "auto")  # function-matching's baseline sees consistent's views: a duplicate


def macs(model: nn.Module, input_shape: tuple[int, ...] = (1, 1, 28, 28)) -> int:
    """Multiply-adds of the conv and linear layers for one input, counted with forward hooks."""
    total = 0

    def count(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):  # every output value: in/groups × kh × kw products
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        else:
            total += output.numel() * module.in_features
    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(input_shape))
    for hook in hooks:
        hook.remove()
    return total


def cnn_teachers(args: argparse.Namespace, data: FashionData, work: Path, console: Console) -> tuple[Path, float]:
    """Train (or reuse) the shift-augmented CNN members; save them as ``cnn-ensemble.pt``; return it and the
    members' training seconds (from their histories, so a reused member still reports its time)."""
    members, seconds = [], 0.0
    for k in range(args.members):
        seed = args.seed + k
        torch.manual_seed(seed)
        net = create_student(args.teacher_spec, (1, 28, 28), 10).to(training_device(args.device))
        config = TrainConfig(epochs=args.teacher_epochs, batch_size=128, lr=args.teacher_lr, weight_decay=5e-4,
                             seed=seed, progress=not args.no_progress)
        result = train_student(net, data.x, data.y, None, data.xv, data.yv, HardLabelLoss(), config,
                               work / f"teacher-{k}", resume=True, view=Shift(2, seed),
                               fingerprint={"spec": args.teacher_spec, "max_train": args.max_train})
        seconds += sum(epoch["seconds"] for epoch in result.history)
        reused = " (reused)" if result.resumed_from_epoch == args.teacher_epochs else ""
        console.print(f"[bold]teacher {k + 1}/{args.members}[/] {args.teacher_spec}, {args.teacher_epochs} epochs, "
                      f"best validation accuracy {result.best_val_accuracy:.2%}{reused}")
        members.append(net.cpu().eval())  # at its best validation epoch
    return save_once(members, work / "cnn-ensemble.pt", data), seconds


def save_once(members: list[nn.Module], path: Path, data: FashionData) -> Path:
    """Write the ensemble file unless it exists: rewriting it would change its sha256, and with it the teacher
    cache entry and every run's checkpoints, which would then start over."""
    if not path.exists():
        save_ensemble(members, path, data.x[:2], {"class_names": data.class_names, "dataset": FASHION})
    elif len(load_ensemble(path).members) != len(members):
        raise CompressorError(f"{path} holds another number of teachers than --members {len(members)}; "
                              f"pass a new --work-dir")
    return path


def mlp_teachers(args: argparse.Namespace, data: FashionData, work: Path, console: Console) -> tuple[Path, float]:
    """The paper's 2×1200 ensemble through paper_common (its teacher settings and lr, our members, epochs, seed)."""
    parser = argparse.ArgumentParser()
    add_teacher_arguments(parser)
    add_run_arguments(parser)
    settings = parser.parse_args([])  # paper_common's defaults
    settings.__dict__.update(members=args.members, teacher_epochs=args.teacher_epochs, seed=args.seed,
                             max_train=args.max_train, no_progress=args.no_progress, epochs=args.teacher_epochs,
                             work_dir=str(work / "mlp-teachers"))
    runs = Runs(data, settings, console, prefix="distill-quality-")
    members, _ = train_teacher_ensemble(runs)  # at their last epoch, paper_table's protocol
    return save_once(members, work / "mlp-ensemble.pt", data), runs.rows[-1]["seconds"]


def run_config(args: argparse.Namespace, teacher: Path, work: Path, student: str, recipe: str) -> RunConfig:
    """The main job for one (student, recipe) in ``work/<student>-<recipe>``: --baseline, ONNX Runtime, a token
    benchmark (quality is the point here, not latency), the teacher cache shared by the family's runs."""
    tuning = {"recipe": "auto", "tune": args.tune_minutes} if recipe == "auto" else {"recipe": recipe}
    config = RunConfig(teacher=teacher, data=FASHION, student=student,
                       out=work / f"{student}-{recipe}".replace(":", "_"), epochs=args.epochs,
                       batch_size=args.batch_size, temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                       baseline=True, target="onnxruntime", batch_sizes=(1,), warmup_s=0.05, duration_s=0.2, rounds=2,
                       teacher_cache=work / "teacher-cache", seed=args.seed, max_train=args.max_train,
                       progress=not args.no_progress, threads=args.threads, resume=True, device=args.device, **tuning)
    # the report's command (and tuning's rerun lines, built from it) is the compress line for this run, not the
    # benchmark's own line (that one is in the benchmark's JSON)
    return replace(config, command=command_line(config))


def finished_report(config: RunConfig, teacher_sha256: str) -> dict | None:
    """The report of a finished run with exactly this config (the command aside) and teacher file, else None."""
    path = config.output_dir() / "report.json"
    if not (path.exists() and (path.parent / "baseline.pt").exists()):
        return None
    report = json.loads(path.read_text())
    same = {**json.loads(json.dumps(config.to_dict())), "command": None} == {**report["config"], "command": None}
    return report if same and report["teacher_cache"].get("key", {}).get("teacher_sha256") == teacher_sha256 else None


def evaluate_family(family: str, teacher: Path, teacher_seconds: float, args, work: Path, console) -> dict:
    """Every (student, recipe) main job on ``teacher``, scored against the ensemble and the reference baseline."""
    ensemble = load_ensemble(teacher)
    first = run_config(args, teacher, work, args.students[0], args.recipes[0])
    dataset, normalisation = load_data(first, ensemble)
    tensors = to_tensors(dataset, normalisation)  # the runs' splits, normalised as the pipeline does it
    y = tensors.y_test.numpy()  # (n,), every row labelled
    started = time.perf_counter()
    logits = {name: ensemble.member_logits(x) for name, x in  # (K, N, 10) per split: what filling the cache costs
              (("train", tensors.x_train), ("val", tensors.x_val), ("test", tensors.x_test))}
    inference_seconds = time.perf_counter() - started
    ensemble_right = ensemble.log_probs(logits["test"]).argmax(1).numpy() == y  # (n,)
    ensemble_train = ensemble.log_probs(logits["train"]).argmax(1).numpy()  # (N,) its answers on the transfer set
    members = {m.name: float((logits["test"][k].argmax(1).numpy() == y).mean())
               for k, m in enumerate(ensemble.members)}
    result = {"family": family, "teacher": str(teacher), "members": members, "run_split": dataset.split_info,
              "test_examples": len(y), "ensemble_top1": float(ensemble_right.mean()),
              "teacher_training_seconds": round(teacher_seconds, 1),
              "teacher_inference_seconds": round(inference_seconds, 1), "rows": [], "summary": []}
    console.print(f"[bold]{family} teachers[/] ensemble {result['ensemble_top1']:.2%} on {len(y):,} test images; "
                  + ", ".join(f"{name} {top1:.2%}" for name, top1 in members.items()))
    for student in args.students:
        runs = {}  # recipe -> (report, {"student": (n,) bool, "baseline": (n,) bool}, {name: transfer agreement})
        baseline_val = {}  # recipe -> its baseline's validation accuracy
        for recipe in args.recipes:
            config = run_config(args, teacher, work, student, recipe)
            report = finished_report(config, ensemble.fingerprint())
            console.print(f"[bold]{family} · {student} · {recipe}[/]" + (" (finished run reused)" if report else ""))
            report = report or run(config, console).report
            models = {name: torch.jit.load(str(config.output_dir() / f"{name}.pt")) for name in ("student", "baseline")}
            runs[recipe] = (report, {name: predict_logits(m, tensors.x_test).argmax(1).numpy() == y
                                     for name, m in models.items()},
                            {name: float((predict_logits(m, tensors.x_train).argmax(1).numpy() == ensemble_train).mean())
                             for name, m in models.items()})  # how well each imitates the ensemble where taught
            baseline_val[recipe] = evaluate_accuracy(models["baseline"], tensors.x_val, tensors.y_val)
        reference = next(r for r in ("auto", "hinton", *args.recipes) if r in runs)  # the tuned baseline if any
        reference_right, reference_name = runs[reference][1]["baseline"], baseline_name(reference)
        # every labels-only model scored here: name -> (validation accuracy, (n,) bool on test)
        baselines = {baseline_name(r): (baseline_val[r], runs[r][1]["baseline"])
                     for r in runs if r in BASELINE_ROWS or r == reference}
        if args.reference_baseline:  # an earlier run's (tuned) baseline, for rows at another schedule
            given = torch.jit.load(args.reference_baseline)
            reference_right = predict_logits(given, tensors.x_test).argmax(1).numpy() == y
            reference_name = f"baseline ({Path(args.reference_baseline).parent.name})"
            baselines[reference_name] = (evaluate_accuracy(given, tensors.x_val, tensors.y_val), reference_right)
        rows = [score(report, right, kind, recipe, student, reference_right, ensemble_right, args.seed)
                | {"transfer_agreement": fit[kind]}
                for recipe, (report, right, fit) in runs.items()
                for kind in ("student", "baseline") if kind == "student" or recipe in BASELINE_ROWS]
        result["rows"] += rows
        line = summarise(student, rows, reference_name)
        # the strongest labels-only model, chosen on validation like everything else: a patient baseline with the
        # views can beat the tuned one (the search's short rungs stop slow-starting augmented trials), and a gain
        # measured only against a weaker baseline would flatter distillation
        strongest = max(baselines, key=lambda name: baselines[name][0])
        versus = np.stack([runs[line["best_recipe"]][1]["student"], baselines[strongest][1], ensemble_right])
        result["summary"].append(line | {"strongest_baseline": strongest,
                                         "strongest_baseline_val": baselines[strongest][0],
                                         "strongest_baseline_top1": float(baselines[strongest][1].mean()),
                                         "gain_kept_vs_strongest": gain_kept(versus, args.seed)})
    return result


def score(report: dict, right: dict, kind: str, recipe: str, student: str, reference_right: np.ndarray,
          ensemble_right: np.ndarray, seed: int) -> dict:
    """One table row: the run's student or baseline (``kind``), from our own test predictions (``right``, (n,)
    bool per model) and the run's report (agreement and KL with the ensemble, training, wall time)."""
    training = report[kind]["training"]
    accuracy = next(r["accuracy"] for r in report["rows"] if (r["kind"], r["backend"]) == (kind, EAGER))
    correct = np.stack([right[kind], reference_right, ensemble_right])  # (3, n): model, reference baseline, ensemble
    tuning = report.get("tuning")
    return {"student": student, "row": recipe if kind == "student" else baseline_name(recipe), "recipe": recipe,
            "kind": kind, "test_top1": float(right[kind].mean()), "gain_kept_vs_reference": gain_kept(correct, seed),
            "gain_kept_vs_own_baseline": report["verdict"] if kind == "student" else None,
            "agreement": accuracy["agreement"], "kl_to_ensemble": accuracy["kl_to_ensemble"],
            "val_accuracy": training["best_val_accuracy"],
            "best_epoch": training["best_epoch"], "epochs": len(training["history"]),
            "training_seconds": round(sum(epoch["seconds"] for epoch in training["history"]), 1),  # resumes too
            "run_seconds": report["seconds_total"],
            "report": str(Path(report["config"]["out"]) / "report.json"),
            "tuning": {key: tuning[key] for key in ("chosen", "seconds")} if tuning else None}


def baseline_name(recipe: str) -> str:
    """A run's hard-label baseline as the table names it: auto's is tuned, the others have the student's budget."""
    return f"baseline ({recipe}, tuned)" if recipe == "auto" else f"baseline ({recipe})"


def summarise(student: str, rows: list[dict], reference: str) -> dict:
    """The recipe a user would pick, the one with the best validation accuracy (not the best on test, which would
    flatter it), and its gain kept vs the reference baseline."""
    best = max((row for row in rows if row["kind"] == "student"), key=lambda row: row["val_accuracy"])
    gain = best["gain_kept_vs_reference"]
    interval = gain["interval_95"]
    return {"student": student, "best_recipe": best["recipe"], "reference": reference, "gain_kept": gain["gain_kept"],
            "interval_95": interval, "measurable": gain["measurable"],
            "excludes_zero": None if interval is None else bool(interval[0] > 0 or interval[1] < 0)}


def share(gain: dict | None) -> str:
    """'62% [40%, 85%]', or 'not measurable' when the baseline is within noise of the ensemble."""
    if gain is None:
        return ""
    if not gain["measurable"]:
        return "not measurable"
    low, high = gain["interval_95"]
    return f"{gain['gain_kept']:.0%} [{low:.0%}, {high:.0%}]"


def print_tables(result: dict) -> None:
    """One table per teacher family, then a summary line per student."""
    console = Console(width=170)  # read in logs and RESULTS.md, not only in a terminal
    teacher = result["macs"][result["settings"]["teacher_spec"]]
    console.print("multiply-adds per image: " + ", ".join(f"{spec} {count:,} ({count / teacher:.2f}× a CNN teacher "
                                                          f"member)" for spec, count in result["macs"].items()))
    for family in result["families"]:
        console.print(f"\n{family['family']} teachers: ensemble {family['ensemble_top1']:.2%}; members "
                      + ", ".join(f"{name} {top1:.2%}" for name, top1 in family["members"].items())
                      + f"; teacher training {family['teacher_training_seconds']:.0f} s, teacher inference over "
                        f"train+val+test {family['teacher_inference_seconds']:.0f} s")
        reference = family["summary"][0]["reference"] if family["summary"] else ""
        table = Table(title=f"Fashion-MNIST, {family['family']} teachers: gain kept over the hard-label baseline "
                            f"({family['test_examples']:,} test images)")
        for column in ("student", "row", "test top-1", f"gain kept vs {reference} [95%]", "vs own baseline",
                       "agreement", "KL", "agreement (transfer)", "best epoch", "train s", "run s"):
            table.add_column(column, justify="left" if column in ("student", "row") else "right")
        for row in family["rows"]:
            kept = "reference" if row["row"] == reference else share(row["gain_kept_vs_reference"])
            table.add_row(row["student"], row["row"], f"{row['test_top1']:.2%}", kept,
                          share(row["gain_kept_vs_own_baseline"]), f"{row['agreement']:.2%}",
                          f"{row['kl_to_ensemble']:.3f}", f"{row['transfer_agreement']:.2%}",
                          f"{row['best_epoch']}/{row['epochs']}",
                          f"{row['training_seconds']:.0f}", f"{row['run_seconds']:.0f}")
        console.print(table)
        for row in family["rows"]:
            if row["tuning"] and row["kind"] == "student":
                console.print(f"{row['student']} {row['row']}: tuned for {row['tuning']['seconds']:.0f} s, chose "
                              f"{row['tuning']['chosen']['name']}")
        for line in family["summary"]:
            verdict = (f"{share(line)} kept, the interval {'excludes' if line['excludes_zero'] else 'includes'} 0"
                       if line["measurable"] else f"not measurable ({line['reference']} is within noise of the "
                                                  f"ensemble)")
            console.print(f"{line['student']}: the recipe best on validation, {line['best_recipe']}, vs "
                          f"{line['reference']}: {verdict}")
            strongest = line["gain_kept_vs_strongest"]
            console.print(f"{line['student']}: the strongest labels-only model on validation is "
                          f"{line['strongest_baseline']} ({line['strongest_baseline_val']:.2%} validation, "
                          f"{line['strongest_baseline_top1']:.2%} test); {line['best_recipe']} vs it: "
                          + (f"{share(strongest)} kept" if strongest["measurable"] else
                             "not measurable (it is within noise of the ensemble)"))
    console.print(f"wall time {result['wall_seconds'] / 60:.1f} min on {result['machine']['processor']}, "
                  f"{result['machine']['threads']} threads")


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="distill-quality-"))
    console.print(f"work dir {work}")
    data = load_fashion(args.max_train, main_job_seed=args.seed)  # the main job's own split: no leak
    head = record(args, data)
    specs = [args.teacher_spec, *args.students]
    counts = {spec: macs(create_student(spec, (1, 28, 28), 10)) for spec in dict.fromkeys(specs)
              if spec != "auto"}  # auto is sized by each run: its report's student.selection has the counts
    try:  # a CompressorError is one sentence for a person (a stale --work-dir, a missing dataset): no traceback
        families = [("cnn", work, *cnn_teachers(args, data, work, console))]
        if args.mlp_teachers:
            families.append(("mlp 2×1200", work / "mlp-family", *mlp_teachers(args, data, work, console)))
        results = [evaluate_family(name, path, seconds, args, folder, console)
                   for name, folder, path, seconds in families]
    except CompressorError as error:
        console.print(f"[red]error:[/] {error}")
        return 1
    result = {**head, "macs": counts, "families": results,
              "wall_seconds": round(time.perf_counter() - started, 1)}
    return write_result(result, args, "distill_quality", print_tables, console)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 images, 2 teachers, 2 epochs, 1-minute tuning")
    parser.add_argument("--members", type=int, default=None, help="teachers per ensemble (full 3, quick 2)")
    parser.add_argument("--teacher-spec", default="cnn:32x64x128", help="each CNN teacher, from the student registry")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="full 30, quick 2")
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--mlp-teachers", action="store_true", help="also the paper's 2×1200 MLP ensemble")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the CNN teachers and every student train (auto: CUDA when present)")
    parser.add_argument("--students", default="cnn:16x32x32x64,mlp:256x256",
                        help="comma-separated student specs (the CNN: 0.22x a teacher's multiply-adds, 33k parameters; "
                             "cnn:16x32x32, 0.20x and 14k, is too small to follow the teachers: benchmarks/RESULTS.md)")
    parser.add_argument("--recipes", default="hinton,consistent,function-matching,auto", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per student (full 40, quick 2)")
    parser.add_argument("--tune-minutes", type=float, default=None, help="the auto recipe's budget (full 20, quick 1)")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft-target term")
    parser.add_argument("--reference-baseline", default=None,
                        help="score every row against this baseline.pt (an earlier run's on the same teachers and "
                             "split, e.g. <work-dir>/cnn_16x32x32x64-auto/baseline.pt) instead of this run's own")
    add_run_arguments(parser)  # --lr (the students'), --batch-size, --max-train (quick 5,000), --seed, --threads,
    parser.set_defaults(lr=3e-3)  # --no-progress, --out, --work-dir (finished teachers and runs there are reused)
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.students, args.recipes = args.students.split(","), args.recipes.split(",")
    if args.reference_baseline and not Path(args.reference_baseline).is_file():
        parser.error(f"--reference-baseline {args.reference_baseline}: no such file; pass the baseline.pt an "
                     f"earlier run wrote in its folder of --work-dir")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
