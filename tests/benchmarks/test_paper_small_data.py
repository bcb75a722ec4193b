"""benchmarks/paper_small_data.py: its settings match paper_table's, the seeded subset, the share of the gap the
soft targets win back, and a tiny end-to-end run on real Fashion-MNIST images."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import paper_table
from benchmarks.paper_small_data import main, parse_args, subset, summarise
from tests.conftest import FASHION_MNIST

SHARED = ("teacher_epochs", "teacher_weight_decay", "members", "input_dropout", "hidden_dropout", "jitter", "alpha",
          "lr", "batch_size", "max_train", "seed")


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_the_teacher_and_optimiser_defaults_are_paper_tables(quick):
    ours, theirs = parse_args(quick), paper_table.parse_args(quick)
    assert {k: getattr(ours, k) for k in SHARED} == {k: getattr(theirs, k) for k in SHARED}
    assert ours.full_data_epochs == theirs.epochs  # the 100% baseline is paper_table's "hard 2×800", reused
    assert ours.fraction == 0.03 and ours.temperature == 4.0 and ours.epochs == (30 if quick else 200)


def test_a_bad_fraction_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--fraction", "0"])
    assert "--fraction" in capsys.readouterr().err


def test_the_subset_is_seeded_sorted_unique_and_the_requested_share():
    a = subset(55_000, 0.03, 0)
    assert len(a) == 1650 and torch.equal(a, subset(55_000, 0.03, 0)) and not torch.equal(a, subset(55_000, 0.03, 1))
    assert torch.equal(a, a.unique()) and int(a.max()) < 55_000  # unique() sorts
    assert len(subset(10, 0.01, 0)) == 1  # never empty


def test_the_share_won_back_uses_each_protocol_and_the_papers_own_figures():
    rows = [{"name": "teacher ensemble", "test_errors": 900},
            {"role": "full", "test_accuracy": 0.90, "test_accuracy_early_stopped": 0.90},
            {"role": "hard", "test_accuracy": 0.70, "test_accuracy_early_stopped": 0.80},
            {"role": "soft", "test_accuracy": 0.85, "test_accuracy_early_stopped": 0.86}]
    summary = summarise(rows)
    assert summary["paper_protocol"]["recovered"] == pytest.approx((0.85 - 0.80) / (0.90 - 0.80))  # hard early-stopped
    assert summary["last_epoch"]["recovered"] == pytest.approx(0.75)
    assert summary["early_stopped"]["recovered"] == pytest.approx(0.6)
    assert summary["paper_recovered"] == pytest.approx((57.0 - 44.5) / (58.9 - 44.5))
    rows[2]["test_accuracy"] = 0.95  # a subset net as good as the full one leaves nothing to win back
    assert summarise(rows)["last_epoch"]["recovered"] is None
    assert summarise(rows[:2]) == {}


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_a_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "small.json"
    argv = ["--max-train", "200", "--fraction", "0.1", "--epochs", "2", "--full-data-epochs", "1", "--teacher-epochs",
            "1", "--members", "1", "--no-progress", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    assert main(parse_args(argv)) == 0
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["rows"]] == ["teacher member 1 2×1200", "teacher ensemble", "hard 2×800",
                                                       "hard 2×800 10%", "soft 2×800 10% T=4"]
    small = result["rows"][3:]
    assert all(row["train_rows"] == 20 and len(row["val_accuracy_by_epoch"]) == 2 for row in small)
    assert result["subset"]["rows"] == 20 and sum(result["subset"]["class_counts"]) == 20
    assert set(result["summary"]) == {"paper_protocol", "last_epoch", "early_stopped", "paper_recovered"}
    assert "Hinton et al. 2015 §6" in capsys.readouterr().out
