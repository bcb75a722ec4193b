"""compressor/core/metrics.py: top-1, NLL, ECE, per-class accuracy, agreement and KL against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from compressor.core.metrics import classification_metrics


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
    assert metrics["per_class"] == [1.0, 0.0]
    empty = classification_metrics(logits, None, reference_logits=logits)
    assert empty == {"top1": None, "nll": None, "ece": None, "per_class": None, "agreement": 1.0,
                     "kl_to_reference": pytest.approx(0.0, abs=1e-12)}


def test_per_class_accuracy_and_kl_match_hand_computed_values():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 1, 0])  # class 0: rows 0 (right), 3 (wrong); class 1: rows 1 (right), 2 (wrong)
    reference = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]])
    metrics = classification_metrics(np.log(probs), labels, reference_logits=np.log(reference))
    assert metrics["per_class"] == [0.5, 0.5, None]  # class 2 has no row
    expected_kl = np.mean([sum(r * np.log(r / q) for r, q in zip(ref, row)) for ref, row in zip(reference, probs)])
    assert metrics["kl_to_reference"] == pytest.approx(expected_kl, rel=1e-12)
    assert metrics["agreement"] == 0.75  # row 2: 0 vs 1
