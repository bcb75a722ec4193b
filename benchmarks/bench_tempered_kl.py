"""Benchmark of the distillation loss (Hinton et al. 2015) across implementations, forward and forward+backward.

Providers: the plain eager formula a user writes by hand (``eager_formula``: softmax, mean, kl_div,
cross_entropy, autograd), the eager reference, torch.compile of the reference (cold compile time reported
separately and excluded from the median), the chunked CPU path, the Triton kernel (CUDA only) and Liger's
KL-divergence kernel (CUDA, single teacher, soft term only; when ``liger_kernel`` is installed).

Timing: for each (N, C, K) and mode, every provider is warmed up once, then called in rounds, one call each in
turn (A, B, C, A, B, C, ...), so that a change in the machine's load hits all of them alike; the median of each
provider's calls is reported, with its speedup over ``eager_formula`` and over ``reference`` (ratio of medians;
the JSON also has the median of the per-round ratios). Also: peak extra memory (MiB) and the effective
bandwidth of the byte model ``(K + 1)·N·C reads + N·C writes`` next to the copy bandwidth measured in the same run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call; on the CPU the
rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after ``malloc_trim``) over the
RSS before the call — every page the call touches anew, the student's gradient included.

    python benchmarks/bench_tempered_kl.py                 # all shapes, default device
    python benchmarks/bench_tempered_kl.py --quick         # smoke run
    python benchmarks/bench_tempered_kl.py --device cpu --shapes '4096,1000,5;512,32000,3'
    python benchmarks/bench_tempered_kl.py --variant dkd   # a later soft term (benchmarks/loss_variants.py)

With ``--variant dkd|ls|dist`` the providers are that term's eager formula, the reference, the fused CPU path (or
the Triton kernels on CUDA) and ``floor``: one pass that reads what every provider must read (K + 1 logit arrays)
and writes one (N, C) array, the memory-bound floor measured in the same run; the table gives each provider's
fraction of it (floor ms / provider ms).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.loss_variants import variant_providers  # noqa: E402
from compressor.kernels.tempered_kl_cpu import tempered_kl_cpu  # noqa: E402
from compressor.kernels.tempered_kl_reference import tempered_kl_reference  # noqa: E402

SHAPES = [(4096, 1000, 5), (512, 32000, 3), (8192, 10, 5), (1024, 128256, 1)]  # (N, C, K)
QUICK_SHAPES = [(256, 1000, 3), (64, 32000, 1)]
CPU_COMPILE_MAX_ELEMENTS = 25_000_000  # K·N·C above which torch.compile is skipped on the CPU (cold compile + RAM)
TEMPERATURE, ALPHA = 4.0, 0.7
MODES = ("fwd", "fwd+bwd")
MIN_ROUNDS = 5  # interleaved rounds at least, whatever the time budget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", help="N,C,K triples separated by ';', e.g. '4096,1000,5;8192,10,5'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--rounds", type=int,
                        help=f"interleaved rounds at least (default {MIN_ROUNDS}, 3 with --quick)")
    parser.add_argument("--variant", default="kd", choices=["kd", "dkd", "ls", "dist"],
                        help="the soft term (default kd: Hinton's, with torch.compile and Liger beside it)")
    parser.add_argument("--json", help="output path (default benchmarks/results/bench_tempered_kl-<device>"
                                       "[-<variant>].json)")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = ([tuple(int(v) for v in item.split(",")) for item in args.shapes.split(";")] if args.shapes
              else QUICK_SHAPES if args.quick else SHAPES)
    budget_s = 0.3 if args.quick else 2.0  # timed seconds per (provider, shape, mode), spent in interleaved rounds
    min_rounds = args.rounds or (3 if args.quick else MIN_ROUNDS)

    load_before = os.getloadavg()  # 1, 5 and 15 minute load averages: other processes skew every provider
    copy_gbs = copy_bandwidth(device)
    rows, notes = [], []
    for n, c, k in shapes:
        s = torch.randn(n, c, device=device).to(dtype)  # (N, C)
        t = (torch.randn(k, n, c, device=device) * 2).to(dtype)  # (K, N, C)
        y = torch.randint(-1, c, (n,), device=device)  # (N,)
        model_bytes = ((k + 1) * n * c + n * c) * s.element_size()
        available = []
        listed = providers(device, k, n * c * k) if args.variant == "kd" else \
            variant_providers(args.variant, device, TEMPERATURE, ALPHA)
        for name, fn, why in listed:
            if fn is None:
                notes.append(f"{name} skipped at ({n}, {c}, {k}): {why}")
            else:
                available.append((name, fn))
        for mode in MODES:
            def failed(name, error):  # a provider failing must not hide the others' numbers
                notes.append(f"{name} {mode} failed at ({n}, {c}, {k}): {type(error).__name__}: {error}")

            times, cold = interleaved_times(available, s, t, y, mode, device, budget_s, min_rounds, failed)
            medians = {name: statistics.median(v) for name, v in times.items()}
            for name, fn in available:
                if name not in times:
                    continue
                floor = medians.get("floor")
                try:
                    peak = peak_mib(fn, s, t, y, mode, device)
                except Exception as error:
                    failed(name, error)
                    continue
                ms = medians[name]
                gbs = model_bytes / ms / 1e6
                rows.append(dict(N=n, C=c, K=k, provider=name, mode=mode, median_ms=ms, rounds=len(times[name]),
                                 times_ms=times[name], peak_mib=peak, cold_compile_s=cold.get(name),
                                 model_gb_s=gbs, copy_gb_s=copy_gbs, fraction_of_copy=gbs / copy_gbs,
                                 fraction_of_floor=None if floor is None else floor / ms,
                                 **speedups(name, times, medians)))
            torch._dynamo.reset()
        del s, t, y

    record = dict(command=" ".join([Path(sys.executable).name] + sys.argv), date=datetime.date.today().isoformat(),
                  device=device_name(device), threads=torch.get_num_threads(), dtype=args.dtype,
                  variant=args.variant, temperature=TEMPERATURE, alpha=ALPHA, copy_gb_s=copy_gbs,
                  load_average=dict(before=load_before, after=os.getloadavg()),
                  versions=dict(python=platform.python_version(), torch=torch.__version__, triton=version("triton"),
                                liger_kernel=version("liger_kernel")),
                  results=rows, notes=notes)
    suffix = "" if args.variant == "kd" else f"-{args.variant}"
    out = Path(args.json or Path(__file__).parent / "results" / f"bench_tempered_kl-{device.type}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print_table(record)
    print(f"wrote {out}")


def providers(device: torch.device, k: int, elements: int):
    """(name, fn(s, t, y) -> loss or None, reason when None) for every provider."""
    yield "eager_formula", eager_formula, ""
    ref = lambda s, t, y: tempered_kl_reference(s, t, y, TEMPERATURE, ALPHA)  # noqa: E731
    yield "reference", ref, ""
    if device.type == "cpu" and elements > CPU_COMPILE_MAX_ELEMENTS:
        yield "compile", None, f"K·N·C = {elements:,} > {CPU_COMPILE_MAX_ELEMENTS:,}: cold compile and RAM too costly on CPU"
    else:
        compiled = torch.compile(tempered_kl_reference, dynamic=False)
        yield "compile", lambda s, t, y: compiled(s, t, y, TEMPERATURE, ALPHA), ""
    if device.type == "cpu":
        yield "cpu", lambda s, t, y: tempered_kl_cpu(s, t, y, TEMPERATURE, ALPHA), ""
        yield "triton", None, "Triton kernels need CUDA (the interpreter is for tests, not timing)"
    else:
        from compressor.kernels.tempered_kl_triton import tempered_kl_triton
        yield "triton", lambda s, t, y: tempered_kl_triton(s, t, y, TEMPERATURE, ALPHA), ""
    yield ("liger",) + liger_provider(device, k)


def eager_formula(s, t, y):
    """The loss as a user writes it by hand in eager PyTorch: the baseline that the fused paths must beat.

    ``s`` (N, C), ``t`` (K, N, C), ``y`` (N,) with -1 for an unlabeled row. Same value as the reference: the
    hard term ignores y = -1 and, as there, divides by all N rows (a sum over N costs what the mean does).
    """
    p = torch.softmax(t / TEMPERATURE, dim=-1).mean(0)  # (N, C) arithmetic mixture of tempered member probs
    kl = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), p, reduction="batchmean") * TEMPERATURE * TEMPERATURE
    hard = F.cross_entropy(s, y, ignore_index=-1, reduction="sum") / s.shape[0]
    return ALPHA * kl + (1 - ALPHA) * hard


def speedups(name: str, times: dict, medians: dict) -> dict:
    """``name``'s speedup over eager_formula and over reference: ratio of medians, and median of per-round ratios."""
    out = {}
    for base in ("eager_formula", "reference"):
        if base in medians and name in medians:
            out[f"x_vs_{base}"] = medians[base] / medians[name]
            out[f"x_vs_{base}_paired"] = statistics.median(b / a for a, b in zip(times[name], times[base]))
        else:
            out[f"x_vs_{base}"] = out[f"x_vs_{base}_paired"] = None
    return out


def liger_provider(device: torch.device, k: int):
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return None, "liger_kernel is not installed"
    if device.type != "cuda" or k != 1:
        return None, "Liger needs CUDA and a single teacher"
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def fn(s, t, y):  # soft term only: α·T²·KL(p ‖ q); the log-softmaxes run in eager PyTorch
        log_q = torch.log_softmax(s.float() / TEMPERATURE, -1)
        log_p = torch.log_softmax(t[0].float() / TEMPERATURE, -1)
        return ALPHA * TEMPERATURE ** 2 * kl(log_q, log_p)
    return fn, ""


def run(fn, s, t, y, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(s, t, y)
    x = s.detach().requires_grad_()
    fn(x, t, y).backward()
    return x.grad


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn, s, t, y, mode, device) -> float:
    sync(device)
    start = time.perf_counter()
    run(fn, s, t, y, mode)
    sync(device)
    return time.perf_counter() - start


def interleaved_times(available, s, t, y, mode, device, budget_s: float, min_rounds: int, failed):
    """Per provider, the ms of each timed call, from rounds that call every provider once in turn.

    Each provider is warmed up once first (torch.compile's first call is its cold compile, returned in the
    second dict in seconds); the round count fits ``budget_s`` per provider, between ``min_rounds`` and 50.
    A provider that raises is reported through ``failed(name, error)`` and left out.
    """
    live, cold, warm = [], {}, 0.0
    for name, fn in available:
        try:
            if name == "compile":
                cold[name] = time_once(fn, s, t, y, mode, device)
            warm += time_once(fn, s, t, y, mode, device)  # warm-up (also sizes the rounds)
            live.append((name, fn))
        except Exception as error:
            failed(name, error)
    rounds = max(min_rounds, min(50, int(budget_s * len(live) / max(warm, 1e-6))))
    times = {name: [] for name, _ in live}
    for _ in range(rounds):
        for name, fn in list(live):
            try:
                times[name].append(1e3 * time_once(fn, s, t, y, mode, device))
            except Exception as error:
                failed(name, error)
                live.remove((name, fn))
                del times[name]
    return times, cold


def peak_mib(fn, s, t, y, mode, device) -> float:
    """Peak memory a call adds, in MiB (see the module docstring for how)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run(fn, s, t, y, mode)
        torch.cuda.synchronize(device)
        del result
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that reuse counts as new pages
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = proc_status("VmRSS")
    result = run(fn, s, t, y, mode)
    del result
    return (proc_status("VmHWM") - before) / 2**20


def proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 256 MiB tensor copy, counting bytes read plus bytes written (as the byte model does)."""
    src = torch.randn(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / sorted(times)[2] / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"tempered KL ({record['variant']}), {record['device']}, {record['dtype']}, "
                        f"copy {record['copy_gb_s']:.1f} GB/s")
    for column in ("N, C, K", "mode", "provider", "median ms", "vs eager formula", "vs reference", "peak MiB",
                   "GB/s", "of copy", "of floor", "cold compile s"):
        table.add_column(column, justify="right")
    ratio = lambda v: "" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in record["results"]:
        cold = "" if r["cold_compile_s"] is None else f"{r['cold_compile_s']:.1f}"
        table.add_row(f"{r['N']}, {r['C']}, {r['K']}", r["mode"], r["provider"], f"{r['median_ms']:.2f}",
                      ratio(r["x_vs_eager_formula"]), ratio(r["x_vs_reference"]), f"{r['peak_mib']:.1f}",
                      f"{r['model_gb_s']:.1f}", f"{100 * r['fraction_of_copy']:.0f}%",
                      "" if r.get("fraction_of_floor") is None else f"{100 * r['fraction_of_floor']:.0f}%", cold)
    Console(width=160).print(table)
    for r in record["results"]:
        if r["provider"] == "cpu" and r["x_vs_eager_formula"] is not None:
            print(f"cpu at ({r['N']}, {r['C']}, {r['K']}) {r['mode']}: "
                  f"{r['x_vs_eager_formula']:.2f}x the eager formula "
                  f"(per-round median {r['x_vs_eager_formula_paired']:.2f}x), {r['x_vs_reference']:.2f}x the reference "
                  f"({r['x_vs_reference_paired']:.2f}x), {r['rounds']} rounds")
    load = record["load_average"]
    print(f"load average (1, 5, 15 min) before {', '.join(f'{v:.2f}' for v in load['before'])}, "
          f"after {', '.join(f'{v:.2f}' for v in load['after'])}")
    for note in record["notes"]:
        print("note:", note)


if __name__ == "__main__":
    main()
