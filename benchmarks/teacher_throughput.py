"""Teacher inference throughput (images/s) of the main job's teacher pass, ``Ensemble.iter_member_logits`` (what
``compress`` runs over every split before training), on each device here and at each ``--teacher-precision``.

The ensemble is three BN CNNs (widths 32, 48, 64; 3 × 32 × 32 inputs, 10 classes, randomly initialised: the
throughput does not depend on the weights) saved with ``compressor.save_ensemble`` as a user would, so the members
run as TorchScript, as in a real run. Per device and precision: one warm-up pass, then ``--repeats`` timed passes
over ``--rows`` random inputs held in RAM; the median is quoted. CUDA rows appear only where CUDA is available
(``benchmarks/gpu_suite.sh`` runs this on a lent GPU).

    python benchmarks/teacher_throughput.py            # 8,192 rows, 3 repeats (about a minute on 2 CPU cores)
    python benchmarks/teacher_throughput.py --rows 2048

Prints a table and writes ``benchmarks/results/teacher_throughput.json`` (or ``--json``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/...` finds benchmarks/
from benchmarks.image_folder_rss import cnn  # noqa: E402
from compressor import save_ensemble  # noqa: E402
from compressor.core.fileio import write_json_atomic  # noqa: E402
from compressor.teachers import load_ensemble  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def images_per_second(ensemble, x: torch.Tensor, device: str, precision: str, repeats: int) -> list[float]:
    """``repeats`` timed passes of every member over ``x`` on ``device``, after one warm-up pass."""
    def one_pass() -> float:
        start = time.perf_counter()
        for _ in ensemble.iter_member_logits(x, batch_size=1024, device=device, precision=precision):
            pass  # each batch's logits come back to the CPU, as the cache writer receives them
        return len(x) / (time.perf_counter() - start)

    one_pass()
    return [one_pass() for _ in range(repeats)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS / "teacher_throughput.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    members = [cnn(width).eval() for width in (32, 48, 64)]
    x = torch.randn(args.rows, 3, 32, 32)
    with tempfile.TemporaryDirectory() as folder:
        path = save_ensemble(members, Path(folder) / "ensemble.pt", x[:2])
        ensemble = load_ensemble(path)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for precision in ("fp32", "bf16"):
            runs = images_per_second(ensemble, x, device, precision, args.repeats)
            rows.append({"device": device, "precision": precision, "images_per_s": round(statistics.median(runs), 1),
                         "runs": [round(r, 1) for r in runs]})
    result = {"created": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": args.rows,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "results": rows}
    table = Table(title=f"teacher pass: 3 TorchScript CNNs over {args.rows:,} images of 3×32×32")
    for column in ("device", "precision", "images/s (median)", "runs"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["device"], row["precision"], f"{row['images_per_s']:,.0f}",
                      ", ".join(f"{r:,.0f}" for r in row["runs"]))
    Console().print(table)
    write_json_atomic(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
