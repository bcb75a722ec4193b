"""Accuracy metrics and paired-bootstrap intervals, on numpy arrays: the one definition that the teachers'
diagnostics, the report's rows and the verdict all use.

Top-1, NLL, expected calibration error (Guo et al. 2017, 15 equal-width bins), per-class accuracy, and agreement
and KL divergence with a reference (the ensemble), all computed from (N, C) logits in float64. No torch here, so
the deployment side can score a runner's outputs without it.
"""

from __future__ import annotations

import numpy as np


ECE_BINS = 15


def classification_metrics(logits: np.ndarray, labels: np.ndarray | None,
                           reference_logits: np.ndarray | None = None) -> dict:
    """Top-1, NLL, ECE, per-class accuracy, and agreement and KL with a reference, from (N, C) logits.

    Log-probabilities work too as ``logits`` (log-softmax is idempotent). ``labels`` (N,) uses -1 for unlabelled
    rows, which the label metrics skip; they are None without labels. ``per_class`` lists, for each of the C
    classes, the accuracy on the rows of that label (None for a class with no row). ``agreement`` is the fraction
    of rows whose argmax equals ``reference_logits``' argmax; ``kl_to_reference`` is the mean KL(reference ‖ row)
    in nats at T = 1 (both None without a reference). Fractions are in [0, 1]; ``nll`` is in nats.
    """
    scores = np.asarray(logits, dtype=np.float64)  # (N, C)
    if scores.ndim != 2:
        raise ValueError(f"classification_metrics needs (N, C) logits, got shape {scores.shape}")
    log_probs = log_softmax(scores)  # (N, C)
    predicted = scores.argmax(1)  # (N,)
    metrics: dict = {"top1": None, "nll": None, "ece": None, "per_class": None, "agreement": None,
                     "kl_to_reference": None}
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(scores):
            raise ValueError(f"{len(labels)} labels for {len(scores)} rows of logits")
        keep = labels >= 0
        if keep.any():
            y = labels[keep].astype(np.int64)
            correct = predicted[keep] == y
            metrics["top1"] = float(correct.mean())
            metrics["nll"] = float(-log_probs[keep][np.arange(len(y)), y].mean())
            metrics["ece"] = expected_calibration_error(np.exp(log_probs[keep].max(1)), correct)
            counts = np.bincount(y, minlength=scores.shape[1])  # (C,)
            hits = np.bincount(y, correct.astype(np.float64), minlength=scores.shape[1])  # (C,)
            metrics["per_class"] = [float(h / c) if c else None for h, c in zip(hits, counts)]
    if reference_logits is not None:
        reference = np.asarray(reference_logits, dtype=np.float64)
        if reference.shape != scores.shape:
            raise ValueError(f"reference logits of shape {reference.shape} for logits of shape {scores.shape}")
        metrics["agreement"] = float((reference.argmax(1) == predicted).mean())
        reference_log_probs = log_softmax(reference)  # (N, C)
        kl = (np.exp(reference_log_probs) * (reference_log_probs - log_probs)).sum(1)  # (N,)
        metrics["kl_to_reference"] = float(kl.mean())
    return metrics


def log_softmax(scores: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, C) log-probabilities, stable: subtract the row max before exp."""
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """sum_b |accuracy_b - mean confidence_b| * n_b / n over equal-width confidence bins (lo, hi] on [0, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64)  # (n,) top-1 probability
    correct = np.asarray(correct, dtype=np.float64)  # (n,) 1.0 where the top-1 class is the label
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)  # (n,) bin index
    counts = np.bincount(which, minlength=bins)  # (bins,)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))  # (bins,) summed
    return float(gap[counts > 0].sum() / len(confidence))


BOOTSTRAP_RESAMPLES = 2000  # paired resamples of the test rows for the interval of the gain kept
BOOTSTRAP_CHUNK = 250       # resamples drawn at a time, so memory stays at CHUNK x N indices


def bootstrap_means(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Means of ``values`` (V, n) over BOOTSTRAP_RESAMPLES paired resamples of the n columns: (V, R). Paired: every
    row of ``values`` is resampled with the same column indices, so differences between rows keep their pairing."""
    rng = np.random.default_rng(seed)
    n = values.shape[1]
    means = []
    for start in range(0, BOOTSTRAP_RESAMPLES, BOOTSTRAP_CHUNK):
        idx = rng.integers(0, n, (min(BOOTSTRAP_CHUNK, BOOTSTRAP_RESAMPLES - start), n))  # (R, n)
        means.append(values[:, idx].mean(axis=2))  # (V, R)
    return np.concatenate(means, axis=1)  # (V, R)


def paired_bootstrap(differences: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean of per-row ``differences`` (n,), e.g. one model's correctness minus another's
    on the same test rows, from BOOTSTRAP_RESAMPLES resamples."""
    resampled = bootstrap_means(np.asarray(differences, dtype=np.float64)[None], seed)[0]  # (R,)
    return float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))

