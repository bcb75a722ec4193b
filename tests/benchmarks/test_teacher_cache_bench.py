"""benchmarks/teacher_cache.py: its defaults, and the ratio and verdict it prints, on synthetic timings."""

from __future__ import annotations

import pytest

from benchmarks.teacher_cache import MODES, parse_args, print_table, summarise


def rows(cold: list[float], warm: list[float], none: list[float]) -> list[dict]:
    """One row per mode with the given epoch seconds; whole run = epochs + a fixed 10 s (+30 s teachers when cold)."""
    out = []
    for mode, epochs in zip(MODES, (cold, warm, none)):
        extra = 40.0 if mode == "cold cache" else 10.0
        out.append({"mode": mode, "epoch_seconds": epochs, "epoch_median_seconds": sorted(epochs)[len(epochs) // 2],
                    "training_seconds": sum(epochs), "outside_training_seconds": extra,
                    "whole_seconds": sum(epochs) + extra, "best_val_accuracy": 0.8, "rows": 54000})
    return out


def test_defaults_are_the_issue_setting_and_quick_is_smaller():
    full = parse_args([])
    assert (full.members, full.student, full.batch_size, full.epochs, full.max_train) == (5, "mlp:256x256", 128, 3,
                                                                                          None)
    quick = parse_args(["--quick", "--threads", "2"])
    assert (quick.epochs, quick.max_train, quick.threads) == (2, 5000, 2)
    assert parse_args(["--quick", "--epochs", "4", "--max-train", "900"]).epochs == 4


def test_the_ratio_is_the_median_epoch_without_the_cache_over_the_warm_one():
    summary = summarise(rows(cold=[3.0, 2.0, 2.0], warm=[2.0, 2.5, 1.0], none=[30.0, 5.0, 31.0]))
    assert summary["per_epoch_speedup"] == 15.0  # medians 30 / 2: one slow or fast epoch does not move it
    assert summary["per_epoch_speedup_cold"] == 15.0
    assert summary["whole_run_speedup_warm"] == pytest.approx(76 / 15.5, abs=0.01)
    assert summary["first_run_one_off_seconds"] == 31.5  # (7 + 40) - (5.5 + 10)
    assert summary["meets_target"] is True


@pytest.mark.parametrize(("none_median", "verdict"), [(6.0, True), (5.99, False)])
def test_the_verdict_needs_three_times(none_median, verdict, capsys):
    table_rows = rows(cold=[2.0], warm=[2.0], none=[none_median])
    summary = summarise(table_rows)
    assert summary["meets_target"] is verdict
    settings = {"members": 5, "student": "mlp:256x256", "batch_size": 128, "teacher_epochs": 1}
    print_table({"settings": settings, "summary": summary, "rows": table_rows, "wall_seconds": 60.0,
                 "machine": {"threads": 2}, "cache_entry_bytes": 5_000_000})
    out = capsys.readouterr().out
    assert f"≥ 3× per epoch: {'yes' if verdict else 'no'}" in out
    assert "no cache" in out and "does not depend on how well they are trained" in out
