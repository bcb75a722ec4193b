"""benchmarks/paper_table.py: the gap arithmetic, and a tiny end-to-end run on real Fashion-MNIST images."""

from __future__ import annotations

import json

import pytest

from benchmarks.paper_table import main, parse_args, summarise
from tests.conftest import FASHION_MNIST


def test_gap_recovered_is_measured_on_test_for_the_temperature_chosen_on_validation():
    rows = [{"name": "teacher ensemble", "test_errors": 800, "val_accuracy": 0.92},
            {"name": "hard 2×800", "test_errors": 1000, "val_accuracy": 0.90},
            {"name": "distilled 2×800 T=2", "test_errors": 820, "val_accuracy": 0.915},  # best on test
            {"name": "distilled 2×800 T=4", "test_errors": 850, "val_accuracy": 0.918}]  # best on validation
    summary = summarise(rows)["2×800"]
    assert summary["chosen_on_validation"] == "distilled 2×800 T=4" and summary["chosen_test_errors"] == 850
    assert summary["gap_recovered"] == pytest.approx(0.75)
    assert summary["gap_recovered_by_temperature"]["distilled 2×800 T=2"] == pytest.approx(0.9)
    # a hard net as good as the teacher leaves no gap: the share is undefined, not a division by zero
    rows[1]["test_errors"] = 790
    assert summarise(rows)["2×800"]["gap_recovered"] is None


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_a_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "table.json"
    argv = ["--max-train", "600", "--epochs", "2", "--teacher-epochs", "1", "--members", "2", "--temperatures", "1",
            "20", "--no-progress", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    assert main(parse_args(argv)) == 0
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names[:3] == ["teacher member 1 2×1200", "teacher member 2 2×1200", "teacher ensemble"]
    assert names[3:] == ["hard 2×800", "distilled 2×800 T=1", "distilled 2×800 T=20", "hard 2×30",
                         *[f"distilled 2×30 T={t}" for t in ("1", "2", "2.5", "4", "8", "20")]]
    assert all(0 <= row["test_errors"] <= 600 for row in result["rows"])  # the test split is capped too
    assert set(result["summary"]) == {"2×800", "2×30"} and result["machine"]["torch"]
    assert "Hinton et al. 2015" in capsys.readouterr().out
    assert all({"test_errors_early_stopped", "val_accuracy_early_stopped"} <= set(row) for row in result["rows"])
    assert "early_stopped" in result["summary"]["2×800"]
    # a second run over the same --work-dir reuses every finished net: the same scores, nothing retrained
    assert main(parse_args(argv)) == 0
    again = json.loads(out.read_text())
    assert [row["test_errors"] for row in again["rows"]] == [row["test_errors"] for row in result["rows"]]
    assert [row["seconds"] for row in again["rows"]] == [row["seconds"] for row in result["rows"]]
