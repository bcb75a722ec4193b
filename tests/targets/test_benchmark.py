"""targets/benchmark.py: the latency harness's bookkeeping (no wall-clock assertions) and the accuracy metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from targets.benchmark import LatencyStats, latency_stats, measure_latency, sweep
from targets.onnxruntime import load


class Recorder:
    """A stand-in workload that remembers every batch it was given."""

    def __init__(self):
        self.batches: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch)
        return batch.sum()


def test_stats_are_ordered_and_consistent(exported_mlp, make_inputs):
    runner = load(exported_mlp[1], threads=1)
    stats = measure_latency(runner.infer, make_inputs(20), batch_size=4, warmup_s=0.01, duration_s=0.05,
                            min_iterations=25)
    assert isinstance(stats, LatencyStats) and stats.batch_size == 4 and stats.iterations >= 25
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.min_ms <= stats.mean_ms <= stats.max_ms
    assert stats.throughput_per_s == pytest.approx(4 / (stats.mean_ms / 1e3))
    assert stats.cv == pytest.approx(stats.std_ms / stats.mean_ms)
    assert stats.noisy == (stats.cv > 0.025)
    assert stats.duration_s >= 0.05 and stats.warmup_s >= 0.01
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["median_ms"] == stats.median_ms and data["noisy"] == stats.noisy


def test_iterations_reach_the_minimum_even_when_the_duration_is_spent():
    fn = Recorder()
    stats = measure_latency(fn, np.zeros((8, 3), np.float32), batch_size=2, warmup_s=0.0, duration_s=0.0,
                            min_iterations=37)
    assert stats.iterations == 37
    assert len(fn.batches) == 37 + 1  # plus the one warm-up call a zero warm-up still makes


def test_batches_are_slices_of_the_pool_in_turn():
    pool = np.arange(10, dtype=np.float32).reshape(10, 1)
    fn = Recorder()
    measure_latency(fn, pool, batch_size=3, warmup_s=0.0, duration_s=0.0, min_iterations=6)
    firsts = [int(b[0, 0]) for b in fn.batches]
    assert firsts == [0] + [0, 3, 6, 0, 3, 6]  # the warm-up call, then three full slices of 3 from 10 rows, cycled
    assert all(b.shape == (3, 1) and b.flags.c_contiguous for b in fn.batches)


def test_a_batch_larger_than_the_pool_tiles_it():
    pool = np.arange(5, dtype=np.float32).reshape(5, 1)
    fn = Recorder()
    stats = measure_latency(fn, pool, batch_size=12, warmup_s=0.0, duration_s=0.0, min_iterations=3)
    assert stats.batch_size == 12
    assert fn.batches[0][:, 0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="batch_size >= 1"):
        measure_latency(Recorder(), np.zeros((4, 2)), batch_size=0)
    with pytest.raises(ValueError, match="non-empty pool"):
        measure_latency(Recorder(), np.zeros((0, 2)), batch_size=1)


def fake_measure(medians_by_round: list[float], calls: list):
    """A Measure whose k-th call returns ten samples at ``medians_by_round[k]`` ms; records its arguments."""
    def measure(batch_size: int, warmup_s: float, duration_s: float) -> LatencyStats:
        calls.append((batch_size, warmup_s, duration_s))
        value = medians_by_round[(len(calls) - 1) % len(medians_by_round)]
        return latency_stats(np.full(10, value), batch_size, warmup_s, duration_s)
    return measure


def test_sweep_interleaves_rounds_and_pools_their_samples():
    calls_a, calls_b, steps = [], [], []
    rows = sweep([fake_measure([1.0], calls_a), fake_measure([2.0], calls_b)], (1, 8), warmup_s=0.1,
                 duration_s=0.6, rounds=3, on_step=lambda *step: steps.append(step))
    # every round visits every row and batch before the next round starts
    assert steps == [(row, batch, r) for r in range(3) for row in (0, 1) for batch in (1, 8)]
    assert calls_a == [(1, 0.1, pytest.approx(0.2)), (8, 0.1, pytest.approx(0.2))] * 3
    figure = rows[1]["8"]
    assert figure["iterations"] == 30 and figure["median_ms"] == 2.0 and figure["batch_size"] == 8
    assert figure["round_medians"] == [2.0, 2.0, 2.0] and figure["round_spread"] == 0.0 and not figure["unstable"]
    assert figure["duration_s"] == pytest.approx(0.6) and "samples_ms" not in figure
    json.dumps(rows)  # JSON-safe as written into report.json


def test_rounds_that_disagree_by_more_than_ten_percent_are_flagged():
    calls = []
    # per (round, batch): round 0 gives 1.0 ms at batch 1 and 1.0 at batch 4; round 1 gives 1.2 and 1.05
    rows = sweep([fake_measure([1.0, 1.0, 1.2, 1.05], calls)], (1, 4), warmup_s=0.0, duration_s=0.0, rounds=2)
    assert rows[0]["1"]["round_medians"] == [1.0, 1.2]
    assert rows[0]["1"]["round_spread"] == pytest.approx(0.2) and rows[0]["1"]["unstable"]
    assert rows[0]["4"]["round_spread"] == pytest.approx(0.05) and not rows[0]["4"]["unstable"]
    with pytest.raises(ValueError, match="rounds"):
        sweep([fake_measure([1.0], [])], (1,), 0.0, 0.0, rounds=0)
