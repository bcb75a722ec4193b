"""benchmarks/int8_onnxruntime.py: the verdict against the issue's bar, and argument defaults (no training here)."""

from __future__ import annotations

from benchmarks import int8_onnxruntime as bench


def rows(int8_rows_per_s: float, int8_top1: float) -> list[dict]:
    return [{"precision": "fp32", "top1": 0.90, "throughput": {"64": 100_000.0}},
            {"precision": "fp16", "top1": 0.90, "throughput": {"64": 90_000.0}},
            {"precision": "int8", "top1": int8_top1, "throughput": {"64": int8_rows_per_s}}]


def test_the_bar_needs_both_the_speed_up_and_the_accuracy():
    met = bench.summarise(rows(160_000.0, 0.895), "64")
    assert met["int8"] == {"speedup": 1.6, "accuracy_drop_points": 0.5, "meets_bar": True}
    assert not met["fp16"]["meets_bar"]
    assert not bench.summarise(rows(140_000.0, 0.90), "64")["int8"]["meets_bar"]  # too slow
    assert not bench.summarise(rows(300_000.0, 0.885), "64")["int8"]["meets_bar"]  # 1.5 points lost


def test_quick_is_one_epoch_on_ten_thousand_images():
    args = bench.parse_args(["--quick"])
    assert (args.epochs, args.max_train, args.rounds) == (1, 10_000, 2) and args.duration <= 1.0
    assert bench.parse_args([]).batch_sizes == (1, 64, 256)
