"""targets/parity.py: each precision's gates pass on what they should and fail, by name, on what they should not."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.core.errors import CompressorError
from targets.parity import check_parity, enforce_parity


@pytest.fixture
def logits() -> np.ndarray:
    """(2000, 10) logits with a clear winner per row (margin >= 1); max |logit| is 12."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, (2000, 10)).astype(np.float32)
    winners = rng.integers(0, 10, 2000)
    x[np.arange(2000), winners] = 4.0
    x[0, winners[0]] = 12.0
    return x


def test_identical_logits_pass_every_precision(logits):
    labels = logits.argmax(1)
    for precision in ("fp32", "fp16", "int8"):
        result = check_parity(logits, logits.copy(), precision, labels=labels)
        assert result.passed and result.failures == [], precision
        metrics = result.metrics
        assert metrics["max_abs_diff"] == 0 and metrics["top1_agreement"] == 1.0
        assert metrics["mean_cosine"] == pytest.approx(1.0)
        assert metrics["max_abs_reference"] == pytest.approx(12.0)
        assert metrics["tolerance"] == pytest.approx(1.2e-3)
        assert metrics["reference_accuracy"] == metrics["candidate_accuracy"] == 1.0
    enforce_parity(result, "identical logits")  # does not raise


def test_fp32_gate_is_relative_to_the_largest_logit(logits):
    just_inside = logits + np.float32(1.1e-3)  # tolerance is 1e-4 * 12 = 1.2e-3
    assert check_parity(logits, just_inside).passed
    candidate = logits.copy()
    candidate[5, 3] += 3.1e-3
    result = check_parity(logits, candidate)
    assert not result.passed
    assert result.failures == ["fp32 max |diff| 3.1e-03 exceeds 1e-4 x max|logit| = 1.2e-03"]
    assert result.metrics["max_abs_diff"] == pytest.approx(3.1e-3, rel=1e-3)
    with pytest.raises(CompressorError, match=r"parity check failed for the export: fp32 max \|diff\| 3.1e-03 "
                                              r"exceeds .*; the export does not match PyTorch") as info:
        enforce_parity(result, "the export")
    assert info.value.exit_code == 1


def test_flipped_argmaxes_fail_the_agreement_gate(logits):
    candidate = logits.copy()
    rows = np.arange(3)
    candidate[rows] = logits[rows, ::-1]  # 3 of 2000 rows now pick another class: 99.85% < 99.9%
    fp32 = check_parity(logits, candidate, "fp32")
    assert fp32.metrics["top1_agreement"] == pytest.approx(0.9985)
    assert any(f.startswith("fp32 top-1 agreement 99.85% is below 99.9%") for f in fp32.failures)
    # the same candidate, judged as fp16, fails only the cosine gate: 99.85% agreement clears 99.5%
    fp16 = check_parity(logits, candidate, "fp16")
    assert len(fp16.failures) == 1 and fp16.failures[0].startswith("fp16 mean cosine similarity")


def test_nan_in_the_candidate_fails(logits):
    candidate = logits.copy()
    candidate[7, 2] = np.nan
    for precision in ("fp32", "fp16"):
        result = check_parity(logits, candidate, precision)
        assert not result.passed
        assert result.failures[0] == f"{precision} candidate logits contain 1 NaN/Inf values"
    json.dumps(result.to_dict())  # NaN metrics still serialise (as NaN)


def test_fp16_gate_uses_cosine_and_agreement(logits):
    rng = np.random.default_rng(1)
    close = logits + rng.normal(0, 0.01, logits.shape).astype(np.float32)  # fp16-sized noise
    result = check_parity(logits, close, "fp16")
    assert result.passed, result.failures
    assert not check_parity(logits, close, "fp32").passed  # far outside the fp32 gate
    noisy = logits + rng.normal(0, 0.2, logits.shape).astype(np.float32)  # argmaxes survive, directions do not
    result = check_parity(logits, noisy, "fp16")
    assert result.metrics["top1_agreement"] >= 0.995 and not result.passed
    assert len(result.failures) == 1 and result.failures[0].startswith("fp16 mean cosine similarity 0.99")
    assert result.failures[0].endswith("is below 0.999")


def test_int8_gate_is_the_accuracy_drop_in_points(logits):
    labels = logits.argmax(1)
    labels[:10] = -1  # unlabelled rows are skipped
    candidate = logits.copy()
    wrong = np.arange(10, 40)  # 30 of 1990 labelled rows become wrong: 1.51 points
    candidate[wrong] = logits[wrong, ::-1]
    result = check_parity(logits, candidate, "int8", labels=labels)
    assert result.metrics["accuracy_drop_points"] == pytest.approx(100 * 30 / 1990)
    assert result.failures == ["int8 accuracy drop 1.51 points exceeds --max-accuracy-drop 1 (100.00% -> 98.49%)"]
    assert check_parity(logits, candidate, "int8", labels=labels, max_accuracy_drop=2.0).passed
    assert "needs labelled inputs" in check_parity(logits, candidate, "int8").failures[0]


def test_shape_mismatch_and_unknown_precision_are_errors(logits):
    with pytest.raises(CompressorError, match=r"shape \(2000, 9\) where PyTorch returns \(2000, 10\)"):
        check_parity(logits, logits[:, :9])
    with pytest.raises(CompressorError, match="--precision bf8: unknown"):
        check_parity(logits, logits, "bf8")
