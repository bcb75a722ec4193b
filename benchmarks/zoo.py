"""Issue 29's zoo: small teacher ensembles nobody tuned a default on, each compressed by ``compress`` with its
defaults only (no ``--student``, no ``--alpha``) plus ``--baseline`` into ONNX Runtime, in its own process, and one
table of what the defaults bought.

The ensembles (``ZOO``), each built once under ``--work-dir``/<scale>/<name>/ and rebuilt when ``VERSION`` or the
scale's settings it depends on change:

- ``cnn-homogeneous``: three CNNs of one shape (``fashion_main_job.teacher(32)``), seeds 0-2, on Fashion-MNIST;
- ``mixed-cnn-mlp``: a 32-wide and an 8-wide CNN and a 2×1200 MLP (``paper_common.teacher_net``) on Fashion-MNIST;
- ``mlp-digits``: three MLPs of different depths and widths on scikit-learn's digits as 64-vectors in an ``.npz``;
- ``timm-rgb``: three timm models on an RGB 32 × 32 PNG folder of Fashion-MNIST (``timm_image_folder``'s set-up);
- ``bert-text``: three 2-layer BERTs (``text_ensemble``'s) on its generated task, written as pseudo-word sentences
  and tokenised by a WordPiece tokenizer trained here with ``tokenizers``, saved with ``save_to_disk``;
- ``weak-cnn``: three 16-wide CNNs trained one epoch on a tenth of the Fashion-MNIST training split;
- ``pairs-100``: two Fashion-MNIST images side by side (1 × 28 × 56, each image used once), label 10·a + b, 100
  classes, in an ``.npz``; three CNNs;
- ``rich-teachers``: three 32-wide CNNs trained on the whole 54,000-row training split, compressed with
  ``--max-train 3000`` at every scale: a small transfer set beside well-trained teachers.

Every member trains on the training split that ``compress --data SPEC --seed 0`` makes (rich-teachers: all of it),
so none saw its validation or test rows. Each run is ``compress --teacher T --data D --baseline --target onnxruntime --out ... --teacher-cache
... --no-progress`` plus, with ``--quick``, ``--budget 3`` (not on the digits, which train at the default budget) and
``--max-train`` on the Fashion-MNIST IDX folder: sizes, never choices. Then the previous default's student
(``PREVIOUS_DEFAULT``: what the defaults at 21da582 chose, which a bare ``--student cnn`` / ``mlp`` still sizes the
same way) runs with the same budget, for the table's "previous default" column. The columns are labelled
"defaults at <git short hash>", so a later change of the defaults can be set beside them.

    python benchmarks/zoo.py --quick                   # small data, a 3-minute budget per run
    python benchmarks/zoo.py                           # full data, the default 10-minute budget per run
    python benchmarks/zoo.py --quick --only mlp-digits,pairs-100

Prints a table and writes ``benchmarks/results/zoo[-quick].json``. Needs Fashion-MNIST
(``apt-get install -y dataset-fashion-mnist``), timm and torchvision, transformers, datasets and tokenizers.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.fashion_main_job import teacher as fashion_cnn, train  # noqa: E402
from benchmarks.paper_common import teacher_net  # noqa: E402
from compressor import save_ensemble  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.data.datasets import FASHION_MNIST_CLASSES, load_dataset, read_idx  # noqa: E402

VERSION = "zoo-1"  # bump to rebuild every ensemble
FASHION = Path("/usr/share/datasets/fashion-mnist")
RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Scale:
    """Row counts and epochs of one zoo scale; ``run_args`` are added to every ``compress`` line (sizes only)."""

    name: str
    fashion_rows: int | None  # --max-train on the Fashion-MNIST IDX folder (None: all of it)
    teacher_epochs: int
    pair_images: int  # Fashion-MNIST images paired side by side (two per row)
    png_train: int
    png_test: int
    timm_teachers: str
    timm_epochs: int
    text_rows: tuple[int, int]  # train, test
    text_epochs: int
    run_args: tuple[str, ...] = field(default=())


SCALES = {
    "quick": Scale("quick", 3000, 2, 10_000, 3000, 600, "resnet10t,regnetx_002,mobilenetv3_small_100", 3,
                   (2000, 500), 3, ("--budget", "3")),
    "full": Scale("full", None, 5, 70_000, 12_000, 2000, "resnet18,convnext_atto,regnety_002", 5, (8000, 2000), 30),
}


@dataclass
class Built:
    """One ensemble on disk: its teacher file, its ``--data`` spec and what the builder measured."""

    teacher: Path
    data: str
    run_args: tuple[str, ...] = ()  # extra ``compress`` flags this data needs at this scale (sizes only)
    note: str = ""
    default_epochs: bool = False  # small enough to train the student at the default budget at every scale


def fashion(scale: Scale):
    """Fashion-MNIST as ``compress --data FASHION [--max-train N] --seed 0`` splits it (arrays in memory)."""
    data = load_dataset(str(FASHION), seed=0, max_train=scale.fashion_rows)
    return data, torch.from_numpy(np.asarray(data.train.x)), torch.from_numpy(np.asarray(data.train.y))


def fashion_args(scale: Scale) -> tuple[str, ...]:
    return () if scale.fashion_rows is None else ("--max-train", str(scale.fashion_rows))


def save(members: list[nn.Module], folder: Path, x: torch.Tensor, class_names: list[str], names: list[str]) -> Path:
    for member in members:
        member.eval()
    return save_ensemble(members, folder / "ensemble.pt", x[:2], {"class_names": class_names, "member_names": names})


def build_cnn_homogeneous(folder: Path, scale: Scale, console: Console) -> Built:
    data, x, y = fashion(scale)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(train(fashion_cnn(32), x, y, scale.teacher_epochs, seed))
    return Built(save(members, folder, x, data.class_names, [f"cnn32-{k}" for k in range(3)]), str(FASHION),
                 fashion_args(scale))


def mlp(sizes: list[int]) -> nn.Sequential:
    """ReLU MLP over a flattened input: sizes[0] inputs ... sizes[-1] logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build_mixed_cnn_mlp(folder: Path, scale: Scale, console: Console) -> Built:
    data, x, y = fashion(scale)
    members = []
    for seed, net in enumerate((fashion_cnn(32), fashion_cnn(8), teacher_net(0.1, 0.3))):
        torch.manual_seed(seed)
        members.append(train(net, x, y, scale.teacher_epochs, seed))
    return Built(save(members, folder, x, data.class_names, ["cnn32", "cnn8", "mlp-2x1200"]), str(FASHION),
                 fashion_args(scale))


def build_weak_cnn(folder: Path, scale: Scale, console: Console) -> Built:
    """Undertrained on purpose: one epoch on a tenth of the training split."""
    data, x, y = fashion(scale)
    rows = len(y) // 10
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(train(fashion_cnn(16), x[:rows], y[:rows], 1, seed))
    return Built(save(members, folder, x, data.class_names, [f"cnn16-{k}" for k in range(3)]), str(FASHION),
                 fashion_args(scale), f"1 epoch on {rows:,} rows")


def build_rich_teachers(folder: Path, scale: Scale, console: Console) -> Built:
    """Teachers trained on all 54,000 training rows; compress gets the first 3,000 of each split (a small transfer
    set beside well-trained teachers: the case distillation was made for). Validation and test rows stay unseen."""
    data = load_dataset(str(FASHION), seed=0)
    x, y = torch.from_numpy(np.asarray(data.train.x)), torch.from_numpy(np.asarray(data.train.y))
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(train(fashion_cnn(32), x, y, scale.teacher_epochs, seed))
    return Built(save(members, folder, x, data.class_names, [f"cnn32-{k}" for k in range(3)]), str(FASHION),
                 ("--max-train", str(RICH_TRANSFER_ROWS)), f"teachers on {len(y):,} rows, compress on "
                                                           f"{RICH_TRANSFER_ROWS:,}")


RICH_TRANSFER_ROWS = 3000


def build_mlp_digits(folder: Path, scale: Scale, console: Console) -> Built:
    from sklearn.datasets import load_digits

    digits = load_digits()
    npz = folder / "digits64.npz"
    np.savez(npz, x=(digits.data / 16.0).astype(np.float32), y=digits.target.astype(np.int64))  # (1797, 64)
    data = load_dataset(str(npz), seed=0)
    x, y = torch.from_numpy(np.asarray(data.train.x)), torch.from_numpy(np.asarray(data.train.y))
    members = []
    for seed, sizes in enumerate(([64, 256, 256, 10], [64, 512, 10], [64, 128, 128, 128, 10])):
        torch.manual_seed(seed)
        members.append(train(mlp(sizes), x, y, 30, seed))
    return Built(save(members, folder, x, [str(k) for k in range(10)], ["mlp-256x256", "mlp-512", "mlp-128x3"]),
                 str(npz), default_epochs=True)


def pair_cnn(width: int, classes: int = 100) -> nn.Sequential:
    """A CNN over two images side by side (1, 28, 56)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),              # (w, 14, 28)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),  # (2w, 7, 14)
        nn.Flatten(), nn.Linear(2 * width * 98, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, classes))


def write_pairs(npz: Path, images: int) -> None:
    """The first ``images`` of Fashion-MNIST's 70,000 (train then test) in a seeded order, paired once each."""
    x = np.concatenate([read_idx(next(FASHION.glob(f"{p}-images*"))) for p in ("train", "t10k")])[:images]
    y = np.concatenate([read_idx(next(FASHION.glob(f"{p}-labels*"))) for p in ("train", "t10k")])[:images]
    order = np.random.default_rng(0).permutation(len(x) - len(x) % 2).reshape(-1, 2)  # (P, 2)
    pairs = np.concatenate([x[order[:, 0]], x[order[:, 1]]], axis=2)[:, None].astype(np.float32) / 255  # (P,1,28,56)
    np.savez(npz, x=pairs, y=(10 * y[order[:, 0]] + y[order[:, 1]]).astype(np.int64))


def build_pairs_100(folder: Path, scale: Scale, console: Console) -> Built:
    npz = folder / "fashion-pairs.npz"
    write_pairs(npz, scale.pair_images)
    data = load_dataset(str(npz), seed=0)
    x, y = torch.from_numpy(np.asarray(data.train.x)), torch.from_numpy(np.asarray(data.train.y))
    members = []
    for seed, width in enumerate((16, 24, 32)):
        torch.manual_seed(seed)
        members.append(train(pair_cnn(width), x, y, scale.teacher_epochs + 2, seed))
    names = [f"{a}+{b}".replace("/", "-") for a in FASHION_MNIST_CLASSES for b in FASHION_MNIST_CLASSES]
    return Built(save(members, folder, x, names, ["pair-cnn16", "pair-cnn24", "pair-cnn32"]), str(npz),
                 note=f"{len(y):,} training pairs")


def build_timm_rgb(folder: Path, scale: Scale, console: Console) -> Built:
    from benchmarks.image_folder_rss import write_folder
    from benchmarks.timm_image_folder import train_teachers

    images = write_folder(folder / "fashion-png-rgb32", scale.png_train, scale.png_test, rgb_size=32)
    teacher = train_teachers(images, folder, scale.timm_teachers.split(","), scale.timm_epochs, console)
    return Built(teacher, str(images), note=scale.timm_teachers)


def pseudo_words() -> list[str]:
    """One pseudo-word per token id of ``text_ensemble``'s task (two or three syllables, so WordPiece splits them);
    PAD and CLS have none, NOT is the word "not"."""
    from benchmarks.text_ensemble import NOT, VOCAB

    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70
    rng = np.random.default_rng(0)
    words: list[str] = ["", ""]
    while len(words) < VOCAB:
        word = "".join(rng.choice(syllables, int(rng.integers(2, 4))))
        if word not in words:
            words.append(word)
    words[NOT] = "not"
    return words


def build_bert_text(folder: Path, scale: Scale, console: Console) -> Built:
    """``text_ensemble``'s rows as sentences of pseudo-words, a WordPiece tokenizer trained on the training sentences
    (``VOCAB`` entries, so ``text_ensemble``'s BERT configs fit), and its ids saved as an ``hf:`` dataset."""
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    from benchmarks.text_ensemble import TOPICS, VOCAB, token_task, train_teachers

    words = pseudo_words()
    train_rows, test_rows = scale.text_rows
    generated = (("train", token_task(train_rows, 0, 0.05)), ("test", token_task(test_rows, 1, 0.0)))
    sentences = {split: (rows, [" ".join(words[t] for t in ids[1:]) for ids in rows["input_ids"]])
                 for split, rows in generated}
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(sentences["train"][1], trainers.WordPieceTrainer(
        vocab_size=VOCAB, special_tokens=["[PAD]", "[CLS]", "[UNK]"], show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 1)])
    tokenizer.enable_truncation(64)  # the BERTs' positions
    tokenizer.save(str(folder / "tokenizer.json"))
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "attention_mask": datasets.List(datasets.Value("int64")),
                                  "label": datasets.ClassLabel(names=TOPICS)})
    splits = {}
    for split, (rows, text) in sentences.items():
        encoded = tokenizer.encode_batch(text)
        splits[split] = datasets.Dataset.from_dict({"input_ids": [e.ids for e in encoded],
                                                    "attention_mask": [e.attention_mask for e in encoded],
                                                    "label": rows["label"]}, features=features)
    data = folder / "tokens"
    datasets.DatasetDict(splits).save_to_disk(str(data))
    teacher = folder / "bert-ensemble.pt"
    train_teachers(data, teacher, scale.text_epochs, console)
    lengths = [len(e) for e in splits["train"]["input_ids"]]
    return Built(teacher, f"hf:{data}", note=f"WordPiece {tokenizer.get_vocab_size()} pieces, "
                                             f"{np.mean(lengths):.1f} tokens a row")


FASHION_FIELDS = ("fashion_rows", "teacher_epochs")
# name -> (builder, the Scale fields its ensemble depends on: a change to one of them rebuilds it)
ZOO: dict[str, tuple[Callable[[Path, Scale, Console], Built], tuple[str, ...]]] = {
    "cnn-homogeneous": (build_cnn_homogeneous, FASHION_FIELDS),
    "mixed-cnn-mlp": (build_mixed_cnn_mlp, FASHION_FIELDS),
    "mlp-digits": (build_mlp_digits, ()),
    "timm-rgb": (build_timm_rgb, ("png_train", "png_test", "timm_teachers", "timm_epochs")),
    "bert-text": (build_bert_text, ("text_rows", "text_epochs")),
    "weak-cnn": (build_weak_cnn, ("fashion_rows",)),
    "pairs-100": (build_pairs_100, ("pair_images", "teacher_epochs")),
    "rich-teachers": (build_rich_teachers, ("teacher_epochs",)),
}


def build(name: str, root: Path, scale: Scale, console: Console) -> Built:
    """The ensemble ``name`` at ``scale``: reused from ``root/<scale>/<name>/built.json`` when its key (``VERSION``
    and the scale's fields it depends on) matches, else built from scratch (the folder emptied first)."""
    folder = root / scale.name / name
    builder, fields = ZOO[name]
    key = {"version": VERSION, "scale": scale.name, **{f: getattr(scale, f) for f in fields}}
    record = folder / "built.json"
    if record.exists():
        kept = json.loads(record.read_text())
        if kept["key"] == json.loads(json.dumps(key)):
            built = kept["built"]
            return Built(Path(built["teacher"]), built["data"], tuple(built["run_args"]), built["note"],
                         built["default_epochs"])
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    built = builder(folder, scale, console)
    seconds = time.perf_counter() - started
    console.print(f"built {name} in {seconds:.0f} s: {built.teacher}")
    write_json_atomic(record, {"key": key, "seconds": round(seconds, 1),
                               "built": {**asdict(built), "teacher": str(built.teacher)}})
    return built


# what the defaults at 21da582 (the zoo's first column) chose, as a --student that chooses it again: a bare cnn / mlp
# is still sized by that rule (the largest of its ladder within 0.25 × the median member's multiply-adds); text took
# the largest hf:teacher scale within it
PREVIOUS_DEFAULT = {"cnn-homogeneous": "cnn", "mixed-cnn-mlp": "cnn", "mlp-digits": "mlp", "timm-rgb": "cnn",
                    "bert-text": "hf:teacher/0.5", "weak-cnn": "cnn", "pairs-100": "cnn", "rich-teachers": "cnn"}


def compress_command(built: Built, out: Path, cache: Path, scale: Scale, student: str | None = None) -> list[str]:
    """The default job on this ensemble: no --student (unless ``student``: the previous default's), no --alpha;
    --baseline with the defaults, ONNX Runtime; sizes from the scale."""
    chosen = [] if student is None else ["--student", student]
    return [sys.executable, "-m", "compressor", "--teacher", str(built.teacher), "--data", built.data,
            *built.run_args, *(() if built.default_epochs else scale.run_args), *chosen,
            *(["--baseline"] if student is None else []), "--target", "onnxruntime", "--out", str(out),
            "--teacher-cache", str(cache), "--no-progress"]


def batch1_ms(row: dict | None) -> float | None:
    return None if row is None else row.get("latency", {}).get("1", {}).get("median_ms")


def ratio(slow: float | None, fast: float | None) -> float | None:
    return None if slow is None or not fast else round(slow / fast, 2)


def row_from_report(name: str, report: dict, seconds: float, command: str) -> dict:
    """One zoo row from a run's ``report.json``: members, ensemble and best member, the default student, the
    baseline, the gain kept and its interval, and the student's batch-1 speed-ups on ONNX Runtime."""
    rows = report["rows"]
    find = {(r["kind"], r["backend"]): r for r in rows if r["kind"] != "member"}
    members = [r for r in rows if r["kind"] == "member" and r["backend"] == "PyTorch eager"]
    best = max(members, key=lambda r: r["accuracy"]["top1"])  # the best member on test
    exported = report.get("best_member_export") or {}  # the best member on validation, the one exported
    member_ort = next((r for r in rows if r["kind"] == "member" and r["backend"] == "onnxruntime"), None)
    student = find[("student", "onnxruntime")]
    ensemble_ort = find.get(("ensemble", "onnxruntime"))
    verdict = report.get("verdict") or {}
    baseline = find.get(("baseline", "PyTorch eager"))
    return {
        "name": name,
        "members": {"count": len(members), "parameters": find[("ensemble", "PyTorch eager")]["parameters"],
                    "names": [r["model"].removeprefix("member ") for r in members]},
        "classes": report["teacher"].get("num_classes"),
        "test_examples": report["benchmark"]["examples"],
        "ensemble_top1": find[("ensemble", "PyTorch eager")]["accuracy"]["top1"],
        "best_member": {"name": best["model"].removeprefix("member "), "top1": best["accuracy"]["top1"],
                        "parameters": best["parameters"]},
        "exported_member": {"name": exported.get("member"), "top1": None if member_ort is None
                            else member_ort["accuracy"]["top1"], "batch1_ms": batch1_ms(member_ort)},
        "student": {"spec": report["student"]["spec"], "parameters": report["student"]["parameters"],
                    "selection": report["student"].get("selection")},
        "budget": report.get("budget"),
        "student_top1": student["accuracy"]["top1"],
        "student_eager_top1": find[("student", "PyTorch eager")]["accuracy"]["top1"],
        "baseline_top1": None if baseline is None else baseline["accuracy"]["top1"],
        "gain_kept": verdict.get("gain_kept"), "interval_95": verdict.get("interval_95"),
        "measurable": verdict.get("measurable"),
        "batch1_ms": {"student": batch1_ms(student), "ensemble": batch1_ms(ensemble_ort),
                      "best_member": batch1_ms(member_ort)},
        "speedup_over_ensemble": ratio(batch1_ms(ensemble_ort), batch1_ms(student)),
        "speedup_over_best_member": ratio(batch1_ms(member_ort), batch1_ms(student)),
        "seconds": round(seconds, 1), "seconds_in_report": report.get("seconds_total"),
        "headline": report.get("headline"), "warnings": report.get("warnings"),
        "command": command, "exit": 0,
    }


def run(name: str, built: Built, root: Path, scale: Scale, console: Console, extra: tuple[str, ...] = ()) -> dict:
    """``compress`` with its defaults on one ensemble, in its own process, then the previous default's student
    with the same budget; the zoo row, or the error. ``extra`` flags go at the end of both commands (tests shorten
    the benchmark with them)."""
    out = root / scale.name / name / "run"
    row = _compress(compress_command(built, out, root / scale.name / "teacher-cache", scale), out, extra, name,
                    console)
    if row["exit"] != 0:
        return row
    row = {**row_from_report(name, row.pop("report"), row["seconds"], row["command"]), "note": built.note}
    previous = root / scale.name / name / "previous-default"
    command = compress_command(built, previous, root / scale.name / "teacher-cache", scale, PREVIOUS_DEFAULT[name])
    earlier = _compress(command, previous, extra, f"{name} (previous default)", console)
    row["previous_default"] = earlier if earlier["exit"] != 0 else previous_row(earlier.pop("report"), earlier)
    return row


def _compress(command: list[str], out: Path, extra: tuple[str, ...], name: str, console: Console,
              fresh: bool = True) -> dict:
    """One ``compress`` process into ``out`` (emptied first when ``fresh``): ``{exit, seconds, command, report}`` or
    the error."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    command = [*command, *extra]
    shown = "compress " + shlex.join(command[3:])
    console.print(f"[bold]{name}[/]: {shown}")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = round(time.perf_counter() - started, 1)
    if done.returncode != 0:
        error = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        console.print(f"[red]{name} failed ({done.returncode})[/]: {error}")
        return {"name": name, "exit": done.returncode, "error": error, "seconds": seconds, "command": shown}
    return {"exit": 0, "seconds": seconds, "command": shown, "report": json.loads((out / "report.json").read_text())}


def previous_row(report: dict, run: dict) -> dict:
    """The previous default's student on the same ensemble: its spec, size, test accuracy on ONNX Runtime and
    epochs (the budget's)."""
    student = next(r for r in report["rows"] if (r["kind"], r["backend"]) == ("student", "onnxruntime"))
    return {"exit": 0, "spec": report["student"]["spec"], "parameters": report["student"]["parameters"],
            "top1": student["accuracy"]["top1"], "batch1_ms": batch1_ms(student),
            "epochs": (report.get("budget") or {}).get("bought", {}).get("epochs"), "seconds": run["seconds"],
            "command": run["command"]}


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.2%}"


def gain_text(row: dict) -> str:
    if row.get("gain_kept") is None:
        return "no gain"
    interval = row.get("interval_95")
    return f"{row['gain_kept']:.0%}" + (f" [{interval[0]:.0%}, {interval[1]:.0%}]" if interval else " (n.m.)")


def zoo_table(result: dict) -> Table:
    """The zoo's one table: a row per ensemble, the column set labelled with the defaults' git hash."""
    table = Table(title=f"zoo ({result['scale']}), {result['label']}: compress --baseline --target onnxruntime")
    for column in ("ensemble", "members", "params", "ens.", "best member", "student", "st. params", "student",
                   "baseline", "gain kept [95%]", "× ens. b1", "× best b1", "s", "previous default", "prev."):
        table.add_column(column, justify="left" if column in ("ensemble", "student", "previous default") else "right")
    for row in result["rows"]:
        if row["exit"] != 0:
            table.add_row(row["name"], *[""] * 11, f"exit {row['exit']}", "", "")
            continue
        times = lambda v: "" if v is None else f"{v:.1f}×"  # noqa: E731
        previous = row.get("previous_default") or {}
        table.add_row(row["name"], str(row["members"]["count"]), f"{row['members']['parameters']:,}",
                      percent(row["ensemble_top1"]), percent(row["best_member"]["top1"]), row["student"]["spec"],
                      f"{row['student']['parameters']:,}", percent(row["student_top1"]), percent(row["baseline_top1"]),
                      gain_text(row), times(row["speedup_over_ensemble"]), times(row["speedup_over_best_member"]),
                      f"{row['seconds']:.0f}",
                      f"{previous['spec']} ({previous['parameters']:,})" if previous.get("exit") == 0
                      else f"exit {previous.get('exit')}" if previous else "",
                      percent(previous.get("top1")))
    return table


def git_hash() -> str:
    """The short hash of HEAD, with "+dirty" when compressor/ or targets/ differ from it (the defaults measured)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "compressor", "targets") else "")


def environment() -> dict:
    import onnxruntime

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                "onnxruntime": onnxruntime.__version__}
    for module in ("timm", "torchvision", "transformers", "datasets", "tokenizers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": torch.get_num_threads(),
            "versions": versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and a 3-minute budget per run")
    parser.add_argument("--only", default=None, help=f"comma-separated names among {', '.join(ZOO)}")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-zoo"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = list(ZOO) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"--only: unknown ensemble(s) {', '.join(unknown)}; the zoo has {', '.join(ZOO)}")
    scale = SCALES["quick" if args.quick else "full"]
    console = Console(width=170)
    started = time.perf_counter()
    rows = []
    for name in names:
        built = build(name, args.work_dir, scale, console)
        rows.append(run(name, built, args.work_dir, scale, console))
    head = git_hash()
    result = {"label": f"defaults at {head}", "git": head, "scale": scale.name, "version": VERSION,
              "settings": asdict(scale), "environment": environment(),
              "command": shlex.join(["python", "benchmarks/zoo.py", *(argv if argv is not None else sys.argv[1:])]),
              "seconds_total": round(time.perf_counter() - started, 1), "rows": rows}
    console.print(zoo_table(result))
    for row in rows:
        if row["exit"] == 0:
            console.print(f"[bold]{row['name']}[/]: {row['headline']}")
    out = args.out or RESULTS / f"zoo{'-quick' if args.quick else ''}.json"
    write_json_atomic(out, result)
    console.print(f"wrote {out} ({result['seconds_total']:.0f} s in all)")
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
