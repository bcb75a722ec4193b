"""Parity: does the exported model compute what the PyTorch student computes? Gates by precision.

A single ``atol=1e-5`` is wrong for every precision at once (too loose for large fp32 logits, hopeless for int8),
so each precision gets the gate its arithmetic can meet (DESIGN.md, Parity):

    fp32  max |candidate - reference| <= 1e-4 * max |reference|   and  top-1 agreement >= 99.9%
    fp16  mean row cosine(candidate, reference) >= 0.999          and  top-1 agreement >= 99.5%
    int8  accuracy(reference) - accuracy(candidate) <= max_accuracy_drop percentage points (needs labels)

NaN or Inf in the candidate always fails. Every metric is recorded whatever the precision, so a report shows
how close an fp32 export was to failing. numpy only: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from compressor.core.errors import CompressorError, ParityError

FP32_RELATIVE_TOLERANCE = 1e-4  # of the largest reference logit (the failure message spells it "1e-4")
FP32_MIN_AGREEMENT = 0.999
FP16_MIN_COSINE = 0.999
FP16_MIN_AGREEMENT = 0.995
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass
class ParityResult:
    """The verdict for one precision: ``failures`` holds one sentence per failed gate (empty when ``passed``)."""

    precision: str
    passed: bool
    metrics: dict
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "metrics": dict(self.metrics),
                "failures": list(self.failures)}


def check_parity(reference: np.ndarray, candidate: np.ndarray, precision: str = "fp32",
                 labels: np.ndarray | None = None, max_accuracy_drop: float = 1.0) -> ParityResult:
    """Compare (N, C) candidate logits (the export) with (N, C) reference logits (PyTorch) on the same inputs.

    ``labels`` (N,) with -1 for unlabelled rows adds accuracies and is required by the int8 gate;
    ``max_accuracy_drop`` is in percentage points.
    """
    if precision not in PRECISIONS:
        raise CompressorError(f"--precision {precision}: unknown; choose one of {', '.join(PRECISIONS)}")
    ref = np.asarray(reference, dtype=np.float64)  # (N, C)
    cand = np.asarray(candidate, dtype=np.float64)  # (N, C)
    if ref.ndim != 2 or ref.shape != cand.shape or len(ref) == 0:
        raise CompressorError(f"parity check: the export returns logits of shape {cand.shape} where PyTorch returns "
                              f"{ref.shape}; both must be the same non-empty (N, C)")

    finite = np.isfinite(cand).all() and np.isfinite(ref).all()
    max_abs_reference = float(np.abs(ref).max())
    tolerance = FP32_RELATIVE_TOLERANCE * max_abs_reference
    ref_top1, cand_top1 = ref.argmax(1), cand.argmax(1)  # (N,)
    metrics = {
        "rows": int(len(ref)),
        "max_abs_diff": float(np.abs(cand - ref).max()),  # NaN when the candidate has NaN
        "tolerance": tolerance,
        "max_abs_reference": max_abs_reference,
        "top1_agreement": float((ref_top1 == cand_top1).mean()),
        "mean_cosine": _mean_cosine(ref, cand),
    }
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(ref):
            raise CompressorError(f"parity check: {len(labels)} labels for {len(ref)} rows of logits")
        labelled = labels >= 0
        if labelled.any():
            metrics["reference_accuracy"] = float((ref_top1 == labels)[labelled].mean())
            metrics["candidate_accuracy"] = float((cand_top1 == labels)[labelled].mean())
            metrics["accuracy_drop_points"] = 100.0 * (metrics["reference_accuracy"] - metrics["candidate_accuracy"])

    failures = []
    if not finite:
        bad = int((~np.isfinite(cand)).sum())
        failures.append(f"{precision} candidate logits contain {bad} NaN/Inf values" if bad else
                        f"{precision} reference logits contain NaN/Inf values")
    if precision == "fp32":
        if not metrics["max_abs_diff"] <= tolerance:  # written so that NaN fails
            failures.append(f"fp32 max |diff| {metrics['max_abs_diff']:.1e} exceeds "
                            f"1e-4 x max|logit| = {tolerance:.1e}")
        _agreement_gate(failures, "fp32", metrics["top1_agreement"], FP32_MIN_AGREEMENT)
    elif precision == "fp16":
        if not metrics["mean_cosine"] >= FP16_MIN_COSINE:
            failures.append(f"fp16 mean cosine similarity {metrics['mean_cosine']:.5f} is below {FP16_MIN_COSINE}")
        _agreement_gate(failures, "fp16", metrics["top1_agreement"], FP16_MIN_AGREEMENT)
    elif "accuracy_drop_points" not in metrics:
        failures.append("int8 gate needs labelled inputs to measure the accuracy drop, and none were given")
    elif not metrics["accuracy_drop_points"] <= max_accuracy_drop:
        failures.append(f"int8 accuracy drop {metrics['accuracy_drop_points']:.2f} points exceeds "
                        f"--max-accuracy-drop {max_accuracy_drop:g} ({metrics['reference_accuracy']:.2%} -> "
                        f"{metrics['candidate_accuracy']:.2%})")
    return ParityResult(precision, not failures, metrics, failures)


def enforce_parity(result: ParityResult, what: str) -> None:
    """Raise CompressorError (exit code 1) naming every failed gate when ``result`` did not pass."""
    if not result.passed:
        raise ParityError(f"parity check failed for {what}: {'; '.join(result.failures)}; "
                              "the export does not match PyTorch")


def _agreement_gate(failures: list[str], precision: str, agreement: float, minimum: float) -> None:
    if not agreement >= minimum:
        failures.append(f"{precision} top-1 agreement {agreement:.2%} is below {minimum:.1%}")


def _mean_cosine(ref: np.ndarray, cand: np.ndarray) -> float:
    """Mean over rows of cos(ref_i, cand_i); two all-zero rows count as identical (1.0)."""
    dot = (ref * cand).sum(1)  # (N,)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)  # (N,)
    both_zero = (np.abs(ref).max(1) == 0) & (np.abs(cand).max(1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(both_zero, 1.0, dot / np.where(norms == 0, np.inf, norms))
    return float(cosine.mean())
