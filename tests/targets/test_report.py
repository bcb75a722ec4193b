"""targets/report.py: report.md is written from report.json's content alone, and shows what a reader must see."""

from __future__ import annotations

import json

from targets.report import MAX_CLASS_ROWS, render_markdown, write_report


def latency(median: float, spread: float = 0.0, stages: dict | None = None) -> dict:
    return {"median_ms": median, "p90_ms": median * 1.1, "p99_ms": median * 1.5, "min_ms": median * 0.9,
            "max_ms": median * 2, "cv": 0.01, "noisy": False, "throughput_per_s": 1e3 / median,
            "round_medians": [median, median * (1 + spread)], "round_spread": spread, "unstable": spread > 0.1,
            "stages": stages}


def row(model: str, kind: str, backend: str, top1: float, per_class: list, median: float, **kw) -> dict:
    return {"model": model, "kind": kind, "backend": backend, "device": "cpu", "precision": "fp32",
            "parameters": 1000, "timed": f"{model} on {backend}: host wall time",
            "accuracy": {"top1": top1, "nll": 0.3, "ece": 0.02, "agreement": 0.97, "kl_to_ensemble": 0.01,
                         "per_class": per_class},
            "latency": {"1": latency(median, **kw)}}


def report(classes: int = 3, stages: dict | None = None) -> dict:
    ensemble = [0.9] * classes
    student = [0.9 - 0.01 * (c % 7) for c in range(classes)]  # class 6, 13, ... lose most
    return {
        "headline": "On onnxruntime the student is 10.0× faster.",
        "warnings": ["the ensemble does not beat its best member"],
        "pareto": "pareto.png",
        "benchmark": {"split": "test", "examples": 10_000, "rounds": 2, "warmup_s": 0.2, "duration_s": 1.0},
        "rows": [row("ensemble", "ensemble", "PyTorch eager", 0.91, ensemble, 1.0, stages=stages),
                 row("member a", "member", "PyTorch eager", 0.9, ensemble, 0.5),
                 row("student", "student", "onnxruntime", 0.9, student, 0.05, spread=0.25)],
        "parity": {"precision": "fp32", "passed": True, "failures": [],
                   "metrics": {"max_abs_diff": 1e-6, "tolerance": 1e-4, "top1_agreement": 1.0}},
        "diagnostics": {"members": [{"name": "a", "accuracy": 0.9, "nll": 0.3}],
                        "mixture": {"accuracy": 0.91, "nll": 0.28}},
        "student": {"spec": "mlp:64", "training": {"best_val_accuracy": 0.9, "best_epoch": 3, "history": [{}] * 4,
                                                   "seconds": 1.5}},
        "baseline": None,
        "environment": {"versions": {"torch": "2.13.0"}, "device": "cpu", "cpu_count": 2, "torch_threads": 2},
        "data": {"source": "digits", "preprocessing": "pixel / 16", "sizes": {"train": 1}, "normalisation": None,
                 "class_names": [f"class-{c}" for c in range(classes)]},
        "runner": {"name": "onnxruntime fp32"},
        "command": "compress demo", "seed": 0, "created": "2026-11-23T00:00:00+00:00", "schema_version": 2,
    }


def test_the_page_leads_with_the_headline_warnings_and_the_plot():
    text = render_markdown(report())
    lines = text.splitlines()
    assert lines[0] == "# compressor report" and lines[2] == "**On onnxruntime the student is 10.0× faster.**"
    assert "> ⚠ the ensemble does not beat its best member" in text
    assert "![test accuracy against batch-1 latency](pareto.png)" in text
    assert "## Accuracy (test split, 10,000 examples)" in text
    assert "| student | onnxruntime | fp32 | 1,000 | 90.00% | 0.3000 | 0.0200 | 97.00% | 0.0100 |" in text
    # the rounds column marks the figure whose two rounds disagree by more than 10%
    assert "| 0.050 / 0.062 ⚠ |" in text and "| 1.000 / 1.000 |" in text
    assert "- student on onnxruntime: student on onnxruntime: host wall time" in text
    assert "H2D ms" not in text  # no CUDA stage columns on a CPU run
    # members are left out of the per-class table; the ensemble in PyTorch and the student are in
    assert "| class | ensemble (PyTorch eager) | student (onnxruntime) |" in text
    assert "| 2 class-2 | 90.00% | 88.00% |" in text


def test_cuda_stage_columns_appear_when_a_row_has_them():
    text = render_markdown(report(stages={"h2d_ms": 0.011, "compute_ms": 0.2, "d2h_ms": 0.009}))
    assert "| H2D ms | compute ms | D2H ms |" in text
    assert "| 0.011 | 0.200 | 0.009 |" in text and "| n/a | n/a | n/a |" in text  # the CPU rows say n/a


def test_many_classes_show_only_those_the_student_loses_most_on():
    text = render_markdown(report(classes=100))
    table = text[text.index("## Per-class accuracy"):text.index("## Parity")]
    shown = [line for line in table.splitlines() if line.startswith("| ") and "class-" in line]
    assert len(shown) == MAX_CLASS_ROWS
    assert all(line.split("|")[1].split()[0] in {str(c) for c in range(100) if c % 7 >= 4} for line in shown)
    assert "all in report.json" in table


def test_write_report_writes_both_files_and_json_keeps_every_figure(tmp_path):
    data = report()
    json_path, md_path = write_report(data, tmp_path)
    assert json.loads(json_path.read_text()) == data
    assert md_path.read_text() == render_markdown(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]


def test_training_section_tells_the_transfer_set_the_bias_fix_the_cache_and_the_world():
    page = report()
    page["transfer_set"] = {"rows": 900, "unlabeled": False, "omitted_classes": [3], "rows_dropped": 100,
                            "alpha": 0.9, "best_epoch_by": "validation accuracy"}
    page["student"]["bias_fix"] = {"classes": [3], "shift": 3.5, "val_accuracy_before": 0.8,
                                   "val_accuracy_after": 0.9}
    page["teacher_cache"] = {"enabled": True, "hit": True, "path": "/cache/abc", "key": {}}
    page["environment"]["distributed"] = {"world_size": 2, "backend": "gloo", "device": "cpu"}
    text = render_markdown(page)
    assert "900 rows, α = 0.9; classes [3] left out (100 rows)" in text
    assert "raised by 3.5; validation accuracy 80.00% → 90.00%" in text
    assert "read from the cache (`/cache/abc`)" in text
    assert "Trained on 2 processes (gloo" in text
    page["teacher_cache"] = {"enabled": False}
    page["transfer_set"] = {"rows": 1000, "unlabeled": True, "alpha": 1.0, "best_epoch_by": "agreement"}
    page["student"]["bias_fix"] = None
    page["environment"]["distributed"] = {"world_size": 1, "backend": None, "device": "cpu"}
    text = render_markdown(page)
    assert "recomputed on every training batch" in text and "labels ignored" in text
    assert "Bias fix" not in text and "processes" not in text


def test_a_gpu_engine_build_is_named_with_its_time_version_and_profile():
    page = report()
    assert "Engine built" not in render_markdown(page)  # ONNX Runtime builds no engine
    page["export"] = {"metadata": {"build_seconds": 12.34, "gpu": "NVIDIA H100", "versions": {"tensorrt": "11.0.1"},
                                   "profile": {"min": 1, "opt": 64, "max": 256}}}
    assert "Engine built in 12.3 s with TensorRT 11.0.1 on NVIDIA H100, batch profile 1..256 (opt 64)." \
        in render_markdown(page)
