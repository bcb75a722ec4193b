"""Issue 30's yardstick: the zoo's gain kept under each soft-target loss (``--loss``), the rest held fixed.

For every ensemble of a finished zoo run (``benchmarks/zoo.py``, its JSON and its run folders under ``--work-dir``),
``compress`` runs again with what that default run settled (the student it chose, α, T and the epochs its budget
bought, from its report) and ``--loss X`` for each X, so the losses differ in nothing else: same student, same
epochs, same seed. The hard-label baseline does not depend on the loss, so the default run's finished baseline
checkpoint is copied in and resumed rather than trained again (``--resume`` refuses a student checkpoint written
under another loss, and there is none). The default run is the ``kd`` column.

    python benchmarks/zoo_losses.py --zoo benchmarks/results/zoo-quick.json --losses dkd,ls,dist

Prints one table (gain kept [95% interval] and test accuracy per loss) and writes
``benchmarks/results/zoo-losses[-quick].json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.zoo import RESULTS, _compress, environment, gain_text, git_hash, percent  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402

QUICK_BENCHMARK = ("--batch-sizes", "1", "--warmup", "0.05", "--duration", "0.2", "--rounds", "1")  # accuracy only


def settled_command(report: dict, out: Path, loss: str) -> list[str]:
    """The default run's command with its settled student, α, T and epochs, ``--loss``, a new ``--out``, --resume."""
    student = report["student"]
    mix = student.get("loss") or student.get("selection") or report["config"]  # the settled α and T
    epochs = ((report.get("budget") or {}).get("bought") or {}).get("epochs") or len(student["training"]["history"])
    args = shlex.split(report["command"])[1:]  # "compress ..." → its arguments
    return [sys.executable, "-m", "compressor", *args, "--student", student["spec"], "--alpha", str(mix["alpha"]),
            "--temperature", str(mix["temperature"]), "--epochs", str(epochs), "--loss", loss, "--resume",
            "--out", str(out), *QUICK_BENCHMARK]


def run_loss(name: str, folder: Path, loss: str, console: Console) -> dict:
    """One ensemble under one loss: its student's test accuracy, baseline, gain kept and interval, or the error."""
    report = json.loads((folder / "run" / "report.json").read_text())
    out = folder / f"loss-{loss}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder / "run" / "checkpoints-baseline", out / "checkpoints-baseline")
    command = settled_command(report, out, loss)
    done = _compress(command, out, (), f"{name} --loss {loss}", console, fresh=False)
    if done["exit"] != 0:
        return done
    result = done.pop("report")
    student = next(r for r in result["rows"] if (r["kind"], r["backend"]) == ("student", "onnxruntime"))
    verdict = result.get("verdict") or {}
    return {"exit": 0, "loss": loss, "student_top1": student["accuracy"]["top1"],
            "baseline_top1": verdict.get("baseline_top1"), "gain_kept": verdict.get("gain_kept"),
            "interval_95": verdict.get("interval_95"), "measurable": verdict.get("measurable"),
            "seconds": done["seconds"], "command": done["command"]}


def table(result: dict) -> Table:
    losses = ["kd", *result["losses"]]
    out = Table(title=f"zoo ({result['scale']}) by soft-target loss, {result['label']}: same student, α, T, epochs")
    out.add_column("ensemble")
    out.add_column("student")
    for loss in losses:
        out.add_column(f"{loss}: gain kept [95%]", justify="right")
        out.add_column("top-1", justify="right")
    for row in result["rows"]:
        cells = []
        for loss in losses:
            entry = row["losses"].get(loss, {})
            cells += ([f"exit {entry.get('exit')}", ""] if entry.get("exit") not in (0, None)
                      else [gain_text(entry), percent(entry.get("student_top1"))])
        out.add_row(row["name"], row["student"], *cells)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, required=True, help="a zoo.py JSON whose run folders are still there")
    parser.add_argument("--losses", default="dkd,ls,dist")
    parser.add_argument("--only", default=None, help="comma-separated ensemble names")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-zoo"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    zoo = json.loads(args.zoo.read_text())
    losses = args.losses.split(",")
    console = Console(width=190)
    started = time.perf_counter()
    rows = []
    for row in zoo["rows"]:
        if row["exit"] != 0 or (args.only and row["name"] not in args.only.split(",")):
            continue
        folder = args.work_dir / zoo["scale"] / row["name"]
        entries = {"kd": {"exit": 0, "loss": "kd", **{k: row[k] for k in ("student_top1", "baseline_top1",
                                                                           "gain_kept", "interval_95",
                                                                           "measurable")}}}
        entries.update({loss: run_loss(row["name"], folder, loss, console) for loss in losses})
        rows.append({"name": row["name"], "student": row["student"]["spec"], "losses": entries})
    head = git_hash()
    result = {"label": f"at {head}", "git": head, "scale": zoo["scale"], "zoo": str(args.zoo),
              "zoo_label": zoo["label"], "losses": losses, "environment": environment(),
              "command": shlex.join(["python", "benchmarks/zoo_losses.py", *(argv or sys.argv[1:])]),
              "seconds_total": round(time.perf_counter() - started, 1), "rows": rows}
    console.print(table(result))
    out = args.out or RESULTS / f"zoo-losses{'-quick' if zoo['scale'] == 'quick' else ''}.json"
    write_json_atomic(out, result)
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
