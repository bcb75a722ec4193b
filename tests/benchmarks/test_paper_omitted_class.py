"""benchmarks/paper_omitted_class.py: its settings match paper_table's, the scoring and the bias fix row, and a tiny
end-to-end run on real Fashion-MNIST images."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import paper_table
from benchmarks.paper_common import load_fashion
from benchmarks.paper_omitted_class import (
    bias_fix_row,
    class_names,
    complement,
    main,
    parse_args,
    score,
)
from tests.conftest import FASHION_MNIST

SHARED = ("epochs", "teacher_epochs", "teacher_weight_decay", "members", "input_dropout", "hidden_dropout", "jitter",
          "alpha", "lr", "batch_size", "max_train", "seed")


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_the_defaults_are_paper_tables_so_its_finished_nets_are_reused(quick):
    ours, theirs = parse_args(quick), paper_table.parse_args(quick)
    assert {k: getattr(ours, k) for k in SHARED} == {k: getattr(theirs, k) for k in SHARED}
    assert ours.temperature == 4.0 and 4.0 in paper_table.BIG_TEMPERATURES  # the reference is one of its runs
    assert (ours.omitted, ours.kept) == ((3,), (7, 8))


def test_class_flags_take_names_and_refuse_unknown_ones(capsys):
    args = parse_args(["--omit", "Dress,coat", "--keep", "sneaker,bag"])
    assert args.omitted == (3, 4) and args.kept == (7, 8) and complement(args.kept) == (0, 1, 2, 3, 4, 5, 6, 9)
    assert class_names((3,)) == "dress" and class_names(complement((7, 8))) == "all but sneaker, bag"
    with pytest.raises(SystemExit):
        parse_args(["--omit", "dres"])
    assert "--omit" in capsys.readouterr().err


def test_score_counts_errors_overall_and_on_the_omitted_classes():
    y = torch.tensor([3, 3, 3, 0, 1, 2])
    logits = nn.functional.one_hot(torch.tensor([3, 0, 0, 0, 2, 2]), 4).float()  # wrong: two 3s and the 1
    assert score(logits, y, (3,)) == {"test_errors": 3, "errors_on_omitted": 2, "omitted_test_rows": 3,
                                      "test_rows": 6}


def test_the_bias_fix_row_fits_on_validation_scores_test_and_leaves_the_model_as_trained():
    torch.manual_seed(0)
    x = torch.randn(400, 6)
    model = nn.Sequential(nn.Linear(6, 4))
    y = model(x).argmax(1).detach()  # labels the model gets right
    with torch.no_grad():
        model[0].bias[2] -= 3.0  # as if class 2 had been omitted from the transfer set
    bias = model[0].bias.detach().clone()
    row = bias_fix_row("without 2", model, (2,), x[:200], y[:200], x[200:], y[200:], max_shift=10.0, step=0.05)
    assert row["bias_fix"]["shift"] == pytest.approx(3.0, abs=0.5) and not row["shift_at_search_limit"]
    assert row["errors_on_omitted"] > 10 and row["errors_on_omitted_after"] <= 3
    assert row["test_errors_after"] < row["test_errors"] and row["omitted_names"] == "pullover"
    assert row["test_errors_at_test_optimal_shift"] <= row["test_errors_after"]  # the bound is the best on test
    torch.testing.assert_close(model[0].bias.detach(), bias)
    json.dumps(row)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_a_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "omitted.json"
    argv = ["--max-train", "200", "--epochs", "1", "--teacher-epochs", "1", "--members", "1", "--no-progress",
            "--out", str(out), "--work-dir", str(tmp_path / "work")]
    assert main(parse_args(argv)) == 0
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["rows"]] == [
        "teacher member 1 2×1200", "teacher ensemble", "distilled 2×800 T=4", "distilled 2×800 T=4 omit 3",
        "distilled 2×800 T=4 keep 7,8"]
    assert [fix["transfer"] for fix in result["bias_fixes"]] == [
        "all classes (control, --omit)", "without dress", "all classes (control, --keep)", "only sneaker, bag"]
    assert not result["reference_reused"] and result["machine"]["torch"] and result["paper_mnist"]["omit"]
    y = load_fashion(200).y
    omit, keep = result["bias_fixes"][1::2]
    assert omit["transfer_rows"] == int((y != 3).sum()) and keep["transfer_rows"] == int(((y == 7) | (y == 8)).sum())
    assert "Hinton et al. 2015 §3, omitted classes" in capsys.readouterr().out
    # a second run reuses every net, the reference included
    assert main(parse_args(argv)) == 0
    assert json.loads(out.read_text())["reference_reused"]
