"""A bundle served by a real ``tritonserver`` (nvidia-pytriton's binary, python backend, on loopback) against the
same bundle in process: latency of one example per request through the bundle's ``client.py`` over HTTP and gRPC,
and with 8 clients sending at once (Triton's dynamic batcher groups their requests), beside ``Bundle.predict`` at
batch 1; and the served model's test accuracy against the report's.

1. ``compress demo``'s teachers and a main job on them (``--batch-sizes 1,8,64``, so the Triton config batches up
   to 64 and prefers 8 and 64), in ``--work-dir``.
2. The bundle's ``student_python`` model served by ``targets.triton_local.local_tritonserver``.
3. Per mode, ``--seconds`` of back-to-back batch-1 requests after a warm-up of 50; the median and p90 per request,
   and requests per second. "8 concurrent" runs 8 threads, each with its own client, for the same time.

    python benchmarks/triton_serving.py               # about a minute on 2 cores
    python benchmarks/triton_serving.py --seconds 2
    python benchmarks/triton_serving.py --run RUN --model student --tritonserver /opt/tritonserver   # NVIDIA's
        # Triton container: the onnxruntime_onnx (or, for a --target tensorrt run, tensorrt_plan) model of RUN/bundle

Prints a table and writes ``benchmarks/results/triton_serving.json``. Needs ``pip install --no-deps
nvidia-pytriton`` (``make test`` installs it) and tritonclient.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds compressor
from compressor.cli import main as compress  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.data.datasets import load_dataset  # noqa: E402
from compressor.demo import build_demo_teachers  # noqa: E402
from targets.bundle import load_bundle  # noqa: E402
from targets.triton_local import local_tritonserver  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def timed(call, seconds: float, warmup: int = 50) -> list[float]:
    """Milliseconds of each back-to-back ``call()`` for ``seconds``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    samples, stop = [], time.perf_counter() + seconds
    while time.perf_counter() < stop:
        start = time.perf_counter()
        call()
        samples.append(1000 * (time.perf_counter() - start))
    return samples


def concurrent(make_call, clients: int, seconds: float) -> list[float]:
    """``clients`` threads, each timing its own ``make_call()`` back to back for ``seconds``; every sample."""
    results: list[list[float]] = [[] for _ in range(clients)]

    def worker(k: int) -> None:
        results[k] = timed(make_call(), seconds, warmup=10)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [sample for part in results for sample in part]


def summary(samples: list[float], seconds: float) -> dict:
    return {"requests": len(samples), "median_ms": round(float(np.median(samples)), 4),
            "p90_ms": round(float(np.percentile(samples, 90)), 4), "requests_per_s": round(len(samples) / seconds, 1)}


def bundle_client(bundle: Path):
    """The bundle's own ``client.py``, imported from the bundle as a service would use it."""
    spec = importlib.util.spec_from_file_location("bundle_client", bundle / "client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client


def serve_and_time(bundle: Path, model: str, work: Path, server: Path | None, x, y, one,
                   seconds: float) -> tuple[dict, dict]:
    """Serve ``model`` of ``bundle`` on loopback: its top-1 on (x, y) over HTTP and gRPC through ``client.py``, and
    timing rows for one example ``one`` per request (1 client per protocol, 8 concurrent gRPC clients)."""
    client = bundle_client(bundle)
    accuracy, rows = {}, {}
    with local_tritonserver(bundle / "triton", model, work / "server", server) as (http, grpc):
        for protocol, url in (("http", http), ("grpc", grpc)):
            served = client.ServedBundle(bundle, url, protocol, model)
            accuracy[protocol] = float((served.logits(x).argmax(1) == y).mean())
            rows[f"Triton {dict(http='HTTP', grpc='gRPC')[protocol]}, 1 client"] = summary(
                timed(lambda: served.logits(one), seconds), seconds)

        def a_client():
            served = client.ServedBundle(bundle, grpc, "grpc", model)
            return lambda: served.logits(one)

        rows["Triton gRPC, 8 concurrent clients"] = summary(concurrent(a_client, 8, seconds), seconds)
    return accuracy, rows


def serving_table(title: str, rows: dict) -> Table:
    """The timing rows as a rich table: requests, median and p90 ms, requests per second."""
    table = Table(title=title)
    for column in ("mode", "requests", "median ms", "p90 ms", "requests/s"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, row in rows.items():
        table.add_row(mode, f"{row['requests']:,}", f"{row['median_ms']:.3f}", f"{row['p90_ms']:.3f}",
                      f"{row['requests_per_s']:,.0f}")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/compressor-triton-serving"))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_serving.json")
    parser.add_argument("--run", type=Path, default=None, help="a finished compress run on digits (default: one "
                        "made here on compress demo's teachers)")
    parser.add_argument("--model", default="student_python", help="the bundle's model to serve")
    parser.add_argument("--tritonserver", type=Path, default=None, help="an installed Triton's folder (default: "
                        "nvidia-pytriton's binary)")
    args = parser.parse_args()
    console, work = Console(width=140), args.work_dir
    teachers = work / "teachers" / "digits-ensemble.pt"
    if args.run is None and not teachers.exists():
        build_demo_teachers(work / "teachers", progress=False)
    run = args.run or work / "run"
    if not (run / "report.json").exists():
        assert compress(["--teacher", str(teachers), "--data", "digits", "--out", str(run), "--batch-sizes",
                         "1,8,64", "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    student = next(r for r in report["rows"] if r["kind"] == "student" and r["backend"] == report["export"]["target"])
    data = load_dataset("digits", seed=0)
    x, y, one = data.test.x, data.test.y, data.test.x[:1]
    rows = {}
    if (run / "bundle" / "model.onnx").is_file():  # load_bundle serves ONNX files; a TensorRT plan only under Triton
        bundle = load_bundle(run / "bundle")
        rows["in process (Bundle.predict)"] = summary(timed(lambda: bundle.predict(one), args.seconds), args.seconds)
    accuracy, served = serve_and_time(run / "bundle", args.model, work, args.tritonserver, x, y, one, args.seconds)
    rows.update(served)
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "model": args.model, "tritonserver": str(args.tritonserver or "nvidia-pytriton"),
              "student": report["student"]["spec"], "report_top1": student["accuracy"]["top1"],
              "report_batch1_median_ms": student["latency"]["1"]["median_ms"], "served_top1": accuracy,
              "seconds_per_mode": args.seconds, "rows": rows}
    console.print(serving_table(f"{report['student']['spec']} on digits: one example per request", rows))
    console.print(f"test top-1: report {student['accuracy']['top1']:.4%}, served over HTTP {accuracy['http']:.4%}, "
                  f"gRPC {accuracy['grpc']:.4%}; the report's own batch-1 median "
                  f"{student['latency']['1']['median_ms']:.4f} ms")
    write_json_atomic(args.out, result)
    console.print(f"wrote {args.out}")
    return 0 if all(abs(a - student["accuracy"]["top1"]) < 1e-9 for a in accuracy.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
