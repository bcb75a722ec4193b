"""One timing harness for every backend (PyTorch eager, ORT, TensorRT, ...); accuracy is ``compressor.core.metrics``.

Latency follows trtexec: warm up for a fixed time (caches, allocator pools, lazy initialisation, CPU frequency),
then run back-to-back iterations until both a duration and a minimum count are reached, timing each call with
``time.perf_counter_ns``. Batches are cut from a pool of real inputs before the clock starts, so only ``fn`` is
timed. A coefficient of variation (std / mean) above 2.5% flags the figure as noisy. ``sweep`` times many rows
over a batch-size sweep in interleaved rounds and flags a figure whose rounds disagree by more than 10%.

``fn`` must block until its result is ready (a CUDA backend synchronises inside ``fn``). No torch import here:
callers wrap their backend as a callable on numpy arrays.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from targets.feeds import Feed, as_feed, feed_rows, take_rows

NOISY_CV = 0.025  # std / mean above this and the figure is flagged
UNSTABLE_ROUNDS = 0.10  # back-to-back rounds whose medians differ by more than this are flagged


@dataclass
class LatencyStats:
    """Host latency of one call of ``fn`` on one batch, in milliseconds; throughput in examples per second."""

    batch_size: int
    iterations: int
    warmup_s: float  # seconds actually spent warming up
    duration_s: float  # seconds actually spent in the timed loop
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    std_ms: float
    cv: float  # std_ms / mean_ms
    throughput_per_s: float  # batch_size / mean latency
    # CUDA only: median device time of each stage from CUDA events, {"h2d_ms", "compute_ms", "d2h_ms"}
    stages: dict | None = None
    samples_ms: np.ndarray | None = field(default=None, repr=False, compare=False)  # every timed call, not saved

    @property
    def noisy(self) -> bool:
        """True when the spread is too large to trust small differences (cv > 2.5%)."""
        return self.cv > NOISY_CV

    def to_dict(self) -> dict:
        """JSON-safe figures (the raw samples are left out)."""
        values = {key: value for key, value in asdict(self).items() if key != "samples_ms"}
        return {**values, "noisy": self.noisy}


def measure_latency(fn: Callable[[Feed], object], pool: Feed, batch_size: int, warmup_s: float = 0.2,
                    duration_s: float = 1.0, min_iterations: int = 10) -> LatencyStats:
    """Time ``fn(batch)`` for (batch_size, ...) batches cut from ``pool`` (M, ...), trtexec-style; a pool of arrays by
    name (a text model's inputs) gives batches of arrays by name.

    Consecutive slices of the pool are used in turn; when ``batch_size > M`` the pool is tiled to one batch.
    The timed loop stops once ``duration_s`` has passed and at least ``min_iterations`` calls ran. The garbage
    collector is paused while timing (as ``timeit`` does) so its pauses are not charged to ``fn``.
    """
    pool = as_feed(pool)
    if batch_size < 1 or min_iterations < 1 or feed_rows(pool) == 0:
        raise ValueError(f"measure_latency needs batch_size >= 1 ({batch_size}), min_iterations >= 1 "
                         f"({min_iterations}) and a non-empty pool ({feed_rows(pool)} rows)")
    batches = batches_from_pool(pool, batch_size)
    warmed = warm_up(fn, batches, warmup_s)
    ms, duration = timed_calls(fn, batches, duration_s, min_iterations)
    return latency_stats(ms, batch_size, warmed, duration)


def warm_up(fn: Callable, inputs: list, warmup_s: float) -> float:
    """Call ``fn`` on ``inputs`` in turn until ``warmup_s`` has passed (at least once); return the seconds spent."""
    start = time.perf_counter_ns()
    warmup_ns, calls = int(warmup_s * 1e9), 0
    while calls == 0 or time.perf_counter_ns() - start < warmup_ns:
        fn(inputs[calls % len(inputs)])
        calls += 1
    return (time.perf_counter_ns() - start) / 1e9


def timed_calls(fn: Callable, inputs: list, duration_s: float, min_iterations: int,
                before: Callable[[int], None] | None = None) -> tuple[np.ndarray, float]:
    """Time each call ``fn(inputs[i % len(inputs)])`` until ``duration_s`` has passed and ``min_iterations`` ran.

    The garbage collector is paused (as ``timeit`` does) so its pauses are not charged to ``fn``; the input is
    picked, and ``before(i)`` (bookkeeping of the caller) runs, outside the clock. Returns (iterations,) latencies
    in milliseconds and the seconds the loop took. Every harness times through here.
    """
    times_ns, duration_ns = [], int(duration_s * 1e9)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        loop_start = time.perf_counter_ns()
        while True:
            i = len(times_ns)
            if before is not None:
                before(i)
            batch = inputs[i % len(inputs)]
            t0 = time.perf_counter_ns()
            fn(batch)
            t1 = time.perf_counter_ns()
            times_ns.append(t1 - t0)
            if t1 - loop_start >= duration_ns and len(times_ns) >= min_iterations:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return np.asarray(times_ns, dtype=np.float64) / 1e6, (t1 - loop_start) / 1e9


def latency_stats(ms: np.ndarray, batch_size: int, warmup_s: float, duration_s: float,
                  stages: dict | None = None) -> LatencyStats:
    """Summarise per-call latencies ``ms`` (iterations,) in milliseconds; every harness ends here."""
    ms = np.asarray(ms, dtype=np.float64)
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    mean = float(ms.mean())
    std = float(ms.std(ddof=1)) if len(ms) > 1 else 0.0
    return LatencyStats(batch_size=batch_size, iterations=len(ms), warmup_s=warmup_s, duration_s=duration_s,
                        min_ms=float(ms.min()), mean_ms=mean, median_ms=float(p50), p90_ms=float(p90),
                        p95_ms=float(p95), p99_ms=float(p99), max_ms=float(ms.max()), std_ms=std,
                        cv=std / mean if mean > 0 else 0.0,
                        throughput_per_s=batch_size / (mean / 1e3) if mean > 0 else float("inf"), stages=stages,
                        samples_ms=ms)


Measure = Callable[[int, float, float], LatencyStats]  # (batch_size, warmup_s, duration_s) -> stats


def runner_measure(runner, pool: Feed) -> tuple[Measure, str]:
    """How to time a Runner (``targets.base.Runner``) on batches cut from ``pool``, and what one timed call covers:
    the runner's own ``measure`` when it has one (PyTorch eager, with CUDA events on a GPU), else the host wall time
    of ``infer`` on a numpy batch."""
    if hasattr(runner, "measure"):
        def own(batch, warmup_s, duration_s):
            return runner.measure(pool, batch, warmup_s, duration_s)
        return own, runner.timed

    def measure(batch, warmup_s, duration_s):
        return measure_latency(runner.infer, pool, batch, warmup_s, duration_s)
    return measure, f"{runner.name}: host wall time of infer() on a numpy batch, the backend's own copies included"


def sweep(measures: list[Measure], batch_sizes: tuple[int, ...], warmup_s: float, duration_s: float,
          rounds: int = 2, on_step: Callable[[int, int, int], None] | None = None) -> list[dict[str, dict]]:
    """Time every row at every batch size in ``rounds`` interleaved rounds; return per row {batch: figures}.

    Each round runs every (row, batch) once for ``duration_s / rounds`` after its own warm-up, so a slow spell of
    the machine (another process, thermal throttling) lands in one round of every row instead of all of one row.
    The figures pool the rounds' samples; ``round_medians`` keeps each round's median and ``round_spread`` is
    max / min - 1 of them: above 10% the two halves of the run disagree and the figure should not be trusted.
    ``on_step(row, batch_size, round)`` is called before each measurement (for a progress bar).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    parts: list[dict[int, list[LatencyStats]]] = [{b: [] for b in batch_sizes} for _ in measures]
    for round_ in range(rounds):
        for row, measure in enumerate(measures):
            for batch in batch_sizes:
                if on_step is not None:
                    on_step(row, batch, round_)
                parts[row][batch].append(measure(batch, warmup_s, duration_s / rounds))
    return [{str(batch): _pool_rounds(stats) for batch, stats in row.items()} for row in parts]


def _pool_rounds(rounds: list[LatencyStats]) -> dict:
    """One figure from several rounds of the same measurement: pooled samples, plus each round's median."""
    first = rounds[0]
    stages = None
    if first.stages is not None:
        stages = {key: float(np.median([r.stages[key] for r in rounds])) for key in first.stages}
    pooled = latency_stats(np.concatenate([r.samples_ms for r in rounds]), first.batch_size,
                           sum(r.warmup_s for r in rounds), sum(r.duration_s for r in rounds), stages)
    medians = [r.median_ms for r in rounds]
    spread = max(medians) / min(medians) - 1 if min(medians) > 0 else 0.0
    return {**pooled.to_dict(), "round_medians": medians, "round_spread": spread,
            "unstable": spread > UNSTABLE_ROUNDS}


def batches_from_pool(pool: Feed, batch_size: int) -> list[Feed]:
    """Contiguous (batch_size, ...) batches: consecutive slices of the pool, or the pool tiled when it is too small
    (arrays by name are cut alike)."""
    rows = feed_rows(pool)
    if batch_size > rows:
        return [take_rows(pool, np.arange(batch_size) % rows)]
    return [take_rows(pool, slice(i, i + batch_size)) for i in range(0, rows - batch_size + 1, batch_size)]
