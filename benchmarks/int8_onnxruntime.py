"""What int8 and fp16 buy on ONNX Runtime (CPU) for a Fashion-MNIST student: throughput and accuracy side by side.

A ``--student`` (default ``mlp:800x800``, the paper's small net) is trained on Fashion-MNIST's hard labels for
``--epochs`` with ``compressor.training.loop.train_student`` (checkpoints in ``--work-dir``, so a rerun reuses the net),
then exported by ``targets.onnxruntime.export`` exactly as ``compress --target onnxruntime --precision P`` does:
fp32, fp16 (ONNX Runtime's float16 converter, float32 I/O) and int8 (static QDQ, symmetric, per-channel weights,
MinMax ranges calibrated on 512 training rows); beside them, ONNX Runtime's *dynamic* int8 quantization of the same
fp32 file (weights int8, activation ranges computed per call, no calibration), the baseline the static QDQ export
must beat. Each export is scored on the 10,000 test images and timed with the
report's own harness (``targets.benchmark.sweep``: warm-up, timed calls for ``--duration``, interleaved rounds) at
every ``--batch-sizes``. Throughput is rows per second at the median latency.

The int8 speed-up depends on the CPU: ONNX Runtime's int8 matrix kernels use VNNI / AMX instructions when the CPU
has them (the flags are recorded); without them int8 can be slower than fp32 (as on the demo's tiny MLP at batch 1,
see RESULTS.md). The issue's bar: int8 at batch 64 at least 1.5× the fp32 throughput with at most 1 point of test
accuracy lost.

    python benchmarks/int8_onnxruntime.py            # about 3 minutes on 2 idle cores (training included)
    python benchmarks/int8_onnxruntime.py --quick    # 1 epoch on 10,000 images

Prints a table and writes ``benchmarks/results/int8_onnxruntime[-quick].json``. Needs
``apt-get install -y dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import platform
import re
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/int8_onnxruntime.py` finds benchmarks/
from benchmarks.paper_common import FASHION, write_result
from compressor.data.datasets import load_dataset
from compressor.training.loop import TrainConfig, train_student
from compressor.training.losses import HardLabelLoss
from compressor.students import create_student
from targets.benchmark import measure_latency, sweep
from targets.onnxruntime import OrtRunner, export, load

CALIBRATION_ROWS = 512  # what the pipeline calibrates on (compressor.deployment.export.CALIBRATION_ROWS)
POOL = 512              # distinct test rows cycled through by the timing harness
BAR_SPEEDUP, BAR_DROP = 1.5, 1.0


def cpu_flags() -> list[str]:
    """The CPU's int8/bf16 matrix instruction sets that ONNX Runtime's kernels can use (Linux /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    found = set(re.findall(r"\b(avx512_vnni|avx_vnni|amx_int8|amx_bf16|avx512f|avx2)\b", text))
    return sorted(found)


def summarise(rows: list[dict], batch: str) -> dict:
    """Speed-up over fp32 at ``batch`` and the accuracy drop in points, per reduced precision, with the verdict."""
    by_precision = {row["precision"]: row for row in rows}
    fp32 = by_precision["fp32"]
    out = {}
    for precision, row in by_precision.items():
        if precision == "fp32":
            continue
        speedup = row["throughput"][batch] / fp32["throughput"][batch]
        drop = 100 * (fp32["top1"] - row["top1"])
        out[precision] = {"speedup": round(speedup, 3), "accuracy_drop_points": round(drop, 3),
                          "meets_bar": bool(speedup >= BAR_SPEEDUP and drop <= BAR_DROP)}
    return out


def main(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(FASHION, seed=0, max_train=args.max_train)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)
    xv, yv = torch.from_numpy(data.val.x), torch.from_numpy(data.val.y)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="int8-bench-"))
    torch.manual_seed(args.seed)
    student = create_student(args.student, data.input_shape, 10)
    console.print(f"[bold]training[/] {args.student} on hard labels, {args.epochs} epochs ({work})")
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=1e-3, seed=args.seed, progress=not args.no_progress)
    fingerprint = {"student": args.student, "data": data.fingerprint(), "benchmark": "int8_onnxruntime"}
    train_student(student, x, y, None, xv, yv, HardLabelLoss(), config, work / "student", resume=True,
                  fingerprint=fingerprint)

    example = torch.from_numpy(data.test.x[:2])
    calibration = data.train.x[:CALIBRATION_ROWS]
    runners, rows = [], []
    for precision in ("fp32", "fp16", "int8"):
        extra = {"calibration": calibration} if precision == "int8" else {}
        artifact = export(student, example, work / "export" / precision, precision, **extra)
        runners.append(load(artifact, threads=args.threads))
        rows.append(_score(runners[-1], precision, data))
    runners.append(dynamic_int8(work / "export", args.threads))
    rows.append(_score(runners[-1], "int8-dynamic", data))
    pool = data.test.x[:POOL]
    measures = [lambda b, w, d, r=r: measure_latency(r.infer, pool, b, w, d) for r in runners]
    latencies = sweep(measures, args.batch_sizes, args.warmup, args.duration, args.rounds)
    for row, latency in zip(rows, latencies):
        row["latency"] = latency
        row["throughput"] = {b: round(int(b) / (stats["median_ms"] / 1e3), 1) for b, stats in latency.items()}

    batch = str(args.bar_batch)
    result = {
        "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_flags": cpu_flags(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "torch_threads": torch.get_num_threads()},
        "settings": vars(args), "rows": rows, "summary": summarise(rows, batch) if batch in rows[0]["throughput"]
        else None, "bar": {"batch": args.bar_batch, "speedup": BAR_SPEEDUP, "max_drop_points": BAR_DROP},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    return write_result(result, args, "int8_onnxruntime", print_table, console)


def dynamic_int8(export_dir: Path, threads: int | None) -> OrtRunner:
    """ONNX Runtime's dynamic int8 quantization of the fp32 export (``export_dir/fp32/model.onnx``), as a runner."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = export_dir / "int8-dynamic" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(export_dir / "fp32" / "model.onnx", path, weight_type=QuantType.QInt8)
    return OrtRunner.from_path(path, threads=threads, precision="int8-dynamic")


def _score(runner: OrtRunner, precision: str, data) -> dict:
    top1 = float((runner.infer(data.test.x).argmax(1) == data.test.y).mean())
    return {"precision": precision, "top1": top1, "file_bytes": runner.path.stat().st_size, "runner": runner.name}


def print_table(result: dict) -> None:
    """Accuracy, size, median latency and throughput per precision; then the verdict against the bar."""
    rows = result["rows"]
    batches = list(rows[0]["latency"])
    table = Table(title=f"{result['settings']['student']} on Fashion-MNIST, ONNX Runtime CPU "
                        f"({', '.join(result['machine']['cpu_flags']) or 'no SIMD flags read'})")
    for column in ["precision", "test top-1", "file KB"] + [f"b{b} p50 ms" for b in batches] + \
            [f"b{b} rows/s" for b in batches]:
        table.add_column(column, justify="left" if column == "precision" else "right")
    for row in rows:
        table.add_row(row["precision"], f"{row['top1']:.2%}", f"{row['file_bytes'] / 1024:.0f}",
                      *[f"{row['latency'][b]['median_ms']:.3f}" for b in batches],
                      *[f"{row['throughput'][b]:,.0f}" for b in batches])
    Console(width=160).print(table)
    for precision, verdict in (result["summary"] or {}).items():
        print(f"{precision} at batch {result['bar']['batch']}: {verdict['speedup']:.2f}× the fp32 throughput, "
              f"{verdict['accuracy_drop_points']:+.2f} points of accuracy lost; bar (≥ {BAR_SPEEDUP}×, ≤ {BAR_DROP} "
              f"point): {'met' if verdict['meets_bar'] else 'NOT met'}")
    unstable = [f"{row['precision']} b{b}" for row in rows for b, stats in row["latency"].items()
                if stats.get("unstable")]
    if unstable:
        print(f"warning: the timing rounds disagree by more than 10% for {', '.join(unstable)}: the machine was busy")
    print(f"wall time {result['wall_seconds'] / 60:.1f} min")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch on 10,000 training images")
    parser.add_argument("--student", default="mlp:800x800")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (full 5, quick 1)")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--batch-sizes", type=lambda v: tuple(int(b) for b in v.split(",")), default=(1, 64, 256))
    parser.add_argument("--bar-batch", type=int, default=64, help="the batch size the 1.5× bar is judged at")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--duration", type=float, default=3.0, help="timed seconds per row and batch size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="checkpoints and exports (a finished student is reused)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.max_train = args.max_train or (10_000 if args.quick else None)
    if args.quick:
        args.duration, args.rounds = min(args.duration, 1.0), min(args.rounds, 2)
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))
