"""Time a PyTorch forward on CUDA the way trtexec reports it: host latency, and device time of each stage.

Each timed iteration is one H2D copy -> forward -> D2H copy -> ``torch.cuda.synchronize()`` on the current stream:

    h2d_ms      pinned host batch -> device (``non_blocking``): the PCIe transfer of the input
    compute_ms  ``forward(x)`` under ``torch.no_grad``: every kernel the forward enqueues (not inference_mode:
                a TorchScript module that already ran outside it fails on inference tensors)
    d2h_ms      result -> a preallocated pinned host buffer (``non_blocking``): the transfer of the output

Host latency (the ``LatencyStats`` percentiles) is ``time.perf_counter_ns`` around the whole iteration, so it is
what a caller waiting for the answer sees. The stage times come from ``torch.cuda.Event(enable_timing=True)``
events recorded on the stream between the stages; they are timestamps on the GPU's timeline, not the host's, so
the two figures differ:

* host latency also pays the CPU side: Python, the dispatcher and the kernel launches (a few microseconds per
  kernel), allocation, and the synchronize round trip. For a small model that overhead dominates.
* a stage's device time is the GPU time from the event before it to the event after it. When the host launches
  work more slowly than the GPU runs it, the GPU idles inside a stage waiting for the next launch and that idle
  gap is counted too, so for launch-bound models ``compute_ms`` is nearer the host's launch time than the sum of
  the kernels' run times (as it is in trtexec's "GPU Compute Time").
* event timestamps have a resolution of about half a microsecond.

The three stages lie inside the host window of the same iteration (the first event is recorded after the host
clock starts and the last has completed before ``synchronize`` returns), so per iteration
``h2d + compute + d2h <= host`` up to that resolution.

Batches are cut from the pool with ``targets.benchmark.batches_from_pool`` and pinned before any clock starts; the
events (a ring of them, created up front) are read only once the iteration that recorded them has synchronised,
outside the host-timed window, so reading them never stalls the stream or lands in a measurement.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compressor.core.errors import MissingCapabilityError
from targets.benchmark import LatencyStats, batches_from_pool, latency_stats, timed_calls, warm_up
from targets.feeds import Feed, as_feed, feed_arrays, feed_rows

EVENT_RING = 64  # sets of four events reused in turn; each set is read before its slot is recorded again


def cuda_device_name() -> str | None:
    """The name of the current CUDA device (e.g. "NVIDIA H100 80GB HBM3"), or None when CUDA is not available."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name()


def measure_cuda_latency(forward: Callable[..., torch.Tensor], pool: Feed, batch_size: int,
                         warmup_s: float = 0.2, duration_s: float = 1.0, min_iterations: int = 10,
                         device: str = "cuda") -> LatencyStats:
    """Time H2D copy -> ``forward`` -> D2H copy on ``device`` for (batch_size, ...) batches cut from ``pool``.

    ``forward`` takes the batch as a tensor on ``device`` (arrays by name: one tensor each, positionally) and
    returns one tensor (on the device). Batches are
    consecutive slices of the pool (tiled to one batch when ``batch_size > len(pool)``), pinned before timing.
    Warm-up runs for ``warmup_s`` (at least one call); the timed loop stops once ``duration_s`` has passed and at
    least ``min_iterations`` ran, with the garbage collector paused. Host latency per iteration is the
    ``LatencyStats`` percentiles; ``stages`` holds the median device time of each stage from CUDA events,
    ``{"h2d_ms", "compute_ms", "d2h_ms"}``, plus ``"compute_p90_ms"`` and ``"compute_p99_ms"``.

    Raises MissingCapabilityError when CUDA is not available, ValueError for an empty pool, a batch size or
    minimum count below 1, or a device that is not a CUDA device, and TypeError when ``forward`` does not
    return a tensor.
    """
    pool = as_feed(pool)
    if batch_size < 1 or min_iterations < 1 or feed_rows(pool) == 0:
        raise ValueError(f"measure_cuda_latency needs batch_size >= 1 ({batch_size}), min_iterations >= 1 "
                         f"({min_iterations}) and a non-empty pool ({feed_rows(pool)} rows)")
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"measure_cuda_latency times a CUDA device, got device={device!r}; "
                         "time the CPU with targets.benchmark.measure_latency")
    if not torch.cuda.is_available():
        raise MissingCapabilityError(
            f"CUDA timing needs an NVIDIA GPU with a CUDA build of PyTorch; none is visible here "
            f"(torch {torch.__version__}, cuda {torch.version.cuda}); time on the CPU with "
            "targets.benchmark.measure_latency instead")

    with torch.cuda.device(dev), torch.no_grad():
        return _measure(forward, pool, batch_size, warmup_s, duration_s, min_iterations, dev)


def _measure(forward: Callable[..., torch.Tensor], pool: Feed, batch_size: int, warmup_s: float,
             duration_s: float, min_iterations: int, dev: torch.device) -> LatencyStats:
    """The timing itself; runs with ``dev`` current and inference mode on."""
    # (batch_size, ...) pinned host copies, a tuple per batch (one per named input); np.require copies a read-only
    # slice, which from_numpy would warn about
    batches = [tuple(torch.from_numpy(np.require(a, requirements=["C", "W"])).pin_memory() for a in feed_arrays(b))
               for b in batches_from_pool(pool, batch_size)]
    stream = torch.cuda.current_stream(dev)
    # ring[k] = (before H2D, after H2D, after forward, after D2H); recording each once creates the CUDA events
    # now (torch creates them lazily on first record) rather than inside a timed iteration
    ring = [tuple(torch.cuda.Event(enable_timing=True) for _ in range(4)) for _ in range(EVENT_RING)]
    for events in ring:
        for event in events:
            event.record(stream)
    torch.cuda.synchronize(dev)
    host_out: torch.Tensor | None = None  # pinned buffer for the result, (re)allocated to the result's shape
    events = ring[0]  # the events of the current iteration; set by before() outside the clock
    stage_ms: list[tuple[float, float, float]] = []  # (h2d, compute, d2h) of each timed iteration, in order

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        nonlocal host_out
        events[0].record(stream)
        xs = [part.to(dev, non_blocking=True) for part in batch]
        events[1].record(stream)
        out = forward(*xs)
        events[2].record(stream)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"forward must return a torch.Tensor, got {type(out).__name__}")
        if host_out is None or host_out.shape != out.shape or host_out.dtype != out.dtype:
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host_out.copy_(out, non_blocking=True)
        events[3].record(stream)
        torch.cuda.synchronize(dev)

    def read(recorded: tuple) -> None:  # only for events whose iteration has synchronised: no stall, no error
        stage_ms.append((recorded[0].elapsed_time(recorded[1]), recorded[1].elapsed_time(recorded[2]),
                         recorded[2].elapsed_time(recorded[3])))

    def before(i: int) -> None:
        nonlocal events
        events = ring[i % EVENT_RING]
        if i >= EVENT_RING:
            read(events)  # iteration i - EVENT_RING, before its events are recorded again

    warmed = warm_up(step, batches, warmup_s)
    host_ms, duration = timed_calls(step, batches, duration_s, min_iterations, before)
    for i in range(max(0, len(host_ms) - EVENT_RING), len(host_ms)):  # the last lap of the ring
        read(ring[i % EVENT_RING])

    h2d, compute, d2h = np.asarray(stage_ms, dtype=np.float64).T  # (iterations,) each
    compute_p90, compute_p99 = np.percentile(compute, [90, 99])
    stages = {"h2d_ms": float(np.median(h2d)), "compute_ms": float(np.median(compute)),
              "d2h_ms": float(np.median(d2h)), "compute_p90_ms": float(compute_p90),
              "compute_p99_ms": float(compute_p99)}
    return latency_stats(host_ms, batch_size, warmed, duration, stages=stages)
