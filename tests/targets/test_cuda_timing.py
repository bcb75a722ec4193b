"""targets/cuda_timing.py: CUDA host latency and per-stage device time (the ``gpu`` tests run with ``pytest -m gpu``).

No wall-clock thresholds: only orderings that hold by construction. The three stages' events are recorded inside
the host-timed window of the same iteration, so each stage's device time is at most that iteration's host time,
and hence each stage's median is at most the host median (up to the events' ~0.5 µs resolution).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compressor.core.errors import MissingCapabilityError
from targets.benchmark import LatencyStats
from targets.cuda_timing import cuda_device_name, measure_cuda_latency

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and a CUDA build of torch")
STAGE_TOLERANCE_MS = 0.05  # event resolution (~0.5 µs) and host/device clock granularity, with a wide margin


def mlp(device: str = "cuda") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).eval().to(device)


def pool(n: int, features: int = 256, seed: int = 0) -> np.ndarray:
    """(n, features) float32 inputs."""
    return np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)


class Recorder:
    """Wraps a forward and keeps a host copy of every input it was given, with the device it arrived on."""

    def __init__(self, forward):
        self.forward = forward
        self.inputs: list[np.ndarray] = []
        self.devices: list[torch.device] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.devices.append(x.device)
        self.inputs.append(x.cpu().numpy())  # synchronous copy: fine, only the values are checked here
        return self.forward(x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_without_cuda_it_raises_a_one_line_missing_capability_error():
    with pytest.raises(MissingCapabilityError) as caught:
        measure_cuda_latency(lambda x: x, pool(8), batch_size=4, warmup_s=0.0, duration_s=0.0)
    message = str(caught.value)
    assert "CUDA" in message and "measure_latency" in message and "\n" not in message
    assert caught.value.exit_code == 2
    assert cuda_device_name() is None


def test_bad_arguments_are_rejected_before_touching_a_device():
    with pytest.raises(ValueError, match="batch_size"):
        measure_cuda_latency(lambda x: x, pool(8), batch_size=0)
    with pytest.raises(ValueError, match="non-empty pool"):
        measure_cuda_latency(lambda x: x, pool(0), batch_size=4)
    with pytest.raises(ValueError, match="measure_latency"):
        measure_cuda_latency(lambda x: x, pool(8), batch_size=4, device="cpu")


@pytest.mark.gpu
@needs_cuda
def test_stats_are_ordered_and_stages_fit_inside_host_time():
    stats = measure_cuda_latency(mlp(), pool(64), batch_size=16, warmup_s=0.05, duration_s=0.2, min_iterations=50)
    assert isinstance(stats, LatencyStats) and stats.batch_size == 16 and stats.iterations >= 50
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.duration_s >= 0.2 and stats.warmup_s >= 0.05
    assert stats.throughput_per_s == pytest.approx(16 / (stats.mean_ms / 1e3))

    stages = stats.stages
    assert set(stages) == {"h2d_ms", "compute_ms", "d2h_ms", "compute_p90_ms", "compute_p99_ms"}
    assert all(stages[key] > 0 for key in ("h2d_ms", "compute_ms", "d2h_ms"))
    assert stages["compute_ms"] <= stages["compute_p90_ms"] <= stages["compute_p99_ms"]
    # per iteration every stage lies inside the host window, so the order statistics are ordered too
    for key in ("h2d_ms", "compute_ms", "d2h_ms"):
        assert stages[key] <= stats.median_ms + STAGE_TOLERANCE_MS, (key, stages, stats.median_ms)
    assert stages["compute_p99_ms"] <= stats.p99_ms + STAGE_TOLERANCE_MS
    assert stages["compute_ms"] <= stats.max_ms
    assert isinstance(cuda_device_name(), str)


@pytest.mark.gpu
@needs_cuda
def test_forward_sees_the_batch_on_the_device_with_exact_values():
    data = pool(12)
    model = mlp()
    recorder = Recorder(model)
    stats = measure_cuda_latency(recorder, data, batch_size=4, warmup_s=0.0, duration_s=0.0, min_iterations=5)
    assert stats.iterations >= 5
    assert len(recorder.inputs) == 1 + stats.iterations  # warmup_s=0: exactly one warm-up call, then the timed ones
    assert all(device.type == "cuda" for device in recorder.devices)
    np.testing.assert_array_equal(recorder.inputs[0], data[:4])  # warm-up starts at the first batch
    batches = [data[:4], data[4:8], data[8:12]]
    for k, seen in enumerate(recorder.inputs[1:]):  # the timed loop starts over and takes the batches in turn
        np.testing.assert_array_equal(seen, batches[k % 3])


@pytest.mark.gpu
@needs_cuda
def test_a_batch_larger_than_the_pool_tiles_it():
    data = pool(3)
    recorder = Recorder(mlp())
    stats = measure_cuda_latency(recorder, data, batch_size=8, warmup_s=0.0, duration_s=0.0, min_iterations=3)
    assert stats.batch_size == 8 and stats.iterations >= 3
    assert all(x.shape == (8, 256) for x in recorder.inputs)
    np.testing.assert_array_equal(recorder.inputs[0], data[np.arange(8) % 3])


@pytest.mark.gpu
@needs_cuda
def test_forward_must_return_a_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        measure_cuda_latency(lambda x: (x,), pool(8), batch_size=4, warmup_s=0.0, duration_s=0.0)
