"""targets/benchmark.py: the latency harness's bookkeeping (no wall-clock assertions) and the accuracy metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from targets.benchmark import LatencyStats, classification_metrics, measure_latency
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


def test_perfect_logits_score_perfectly():
    labels = np.array([0, 1, 2, 1])
    logits = np.full((4, 3), -50.0)
    logits[np.arange(4), labels] = 50.0
    metrics = classification_metrics(logits, labels, reference_logits=logits)
    assert metrics["top1"] == 1.0 and metrics["agreement"] == 1.0
    assert metrics["nll"] == pytest.approx(0.0, abs=1e-12) and metrics["ece"] == pytest.approx(0.0, abs=1e-12)


def test_metrics_match_hand_computed_values():
    # four rows of log-probabilities: confidences 0.9, 0.9, 0.6, 0.6; rows 0, 2, 3 are right
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = np.array([0, 1, 0, 1])
    metrics = classification_metrics(np.log(probs), labels)
    assert metrics["top1"] == pytest.approx(0.75)
    assert metrics["nll"] == pytest.approx(-(np.log(0.9) + np.log(0.1) + 2 * np.log(0.6)) / 4)
    # bin (0.867, 0.933]: accuracy 0.5, confidence 0.9; bin (0.533, 0.6]: accuracy 1.0, confidence 0.6
    assert metrics["ece"] == pytest.approx(0.5 * abs(0.5 - 0.9) + 0.5 * abs(1.0 - 0.6))
    assert metrics["agreement"] is None
    # the same numbers from logits shifted by a per-row constant (softmax is shift-invariant), at a huge scale
    shifted = np.log(probs) + np.array([[1e4], [-1e4], [3.0], [0.0]])
    again = classification_metrics(shifted, labels, reference_logits=np.log(probs)[:, ::-1])
    assert again["nll"] == pytest.approx(metrics["nll"]) and again["ece"] == pytest.approx(metrics["ece"])
    assert again["agreement"] == 0.0


def test_unlabelled_rows_are_skipped_and_no_labels_give_none():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    metrics = classification_metrics(logits, np.array([0, -1, 1]))
    assert metrics["top1"] == 0.5
    empty = classification_metrics(logits, None, reference_logits=logits)
    assert empty == {"top1": None, "nll": None, "ece": None, "agreement": 1.0}
