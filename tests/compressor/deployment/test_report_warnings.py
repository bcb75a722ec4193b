"""The deployment steps' own logic (compressor/deployment.py); the steps end to end are in test_pipeline.py."""

from __future__ import annotations

from compressor.deployment.report import precision_warnings, timing_warnings


def test_a_reduced_precision_slower_than_fp32_is_called_out():
    def student(precision, b1, b64):
        return {"kind": "student", "backend": "onnxruntime", "precision": precision,
                "latency": {"1": {"median_ms": b1}, "64": {"median_ms": b64}}}

    rows = [student("fp32", 0.013, 0.083), student("int8", 0.020, 0.074)]
    (warning,) = precision_warnings(rows, "onnxruntime", "int8")
    assert "int8 export is SLOWER than the fp32 graph on onnxruntime at batch 1 (0.020 vs 0.013 ms)" in warning
    assert "batch 64" not in warning  # faster there
    assert precision_warnings([student("fp32", 0.013, 0.083), student("int8", 0.010, 0.07)], "onnxruntime",
                              "int8") == []
    assert precision_warnings(rows[:1], "onnxruntime", "fp32") == []


def test_unstable_and_noisy_timings_are_named_with_the_worst_figure():
    def row(model, spread, cv):
        stats = {"round_spread": spread, "unstable": spread > 0.10, "cv": cv, "noisy": cv > 0.025}
        return {"model": model, "backend": "onnxruntime", "latency": {"1": stats}}

    steady = [row("student", 0.02, 0.01), row("ensemble", 0.03, 0.02)]
    assert timing_warnings(steady, 3) == []
    rounds, spread = timing_warnings([*steady, row("baseline", 0.15, 0.01), row("member 1", 0.40, 0.09)], 3)
    assert "disagree by more than 10% for 2 of 4 figures (worst: member 1 on onnxruntime batch 1, 40%)" in rounds
    assert "1 of 4 figures have a coefficient of variation above 2.5% (worst: member 1 on onnxruntime batch 1, 9%)" \
        in spread
