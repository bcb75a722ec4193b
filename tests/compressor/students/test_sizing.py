"""--student cnn / mlp (a bare family): the student sized to the teachers by multiply-adds, parameters or target
latency (--student auto measures instead: tests/compressor/training/test_selection.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from compressor import save_ensemble
from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.students.registry import create_student
from compressor.students.sizing import CNN_LADDER, MLP_LADDER, StudentBudget, multiply_adds, size_student
from compressor.teachers.formats import load_ensemble

QUICK = ["--epochs", "1", "--batch-size", "64", "--warmup", "0.02", "--duration", "0.05", "--rounds", "1",
         "--batch-sizes", "1", "--no-progress"]


def test_multiply_adds_are_counted_for_convolutions_and_linear_layers():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    assert multiply_adds(model, torch.zeros(1, 1, 8, 8)) == 8 * 9 * 36 + 288 * 10
    assert multiply_adds(torch.jit.script(model), torch.zeros(1, 1, 8, 8)) == 8 * 9 * 36 + 288 * 10
    assert multiply_adds(lambda x: torch.from_numpy(x.numpy()), torch.zeros(1, 3)) == 0  # nothing it can see


@pytest.mark.parametrize("shape, ladder", [((1, 28, 28), CNN_LADDER), ((64,), MLP_LADDER)])
def test_the_ladders_grow_in_cost_step_by_step(shape, ladder):
    costs = [multiply_adds(create_student(spec, shape, 10).eval(), torch.zeros(1, *shape)) for spec in ladder]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)


def _teachers(tmp_path, widths: tuple[int, ...], shape=(1, 28, 28)):
    """Three CNNs of the given widths (random weights: sizing does not read them), saved and loaded."""
    members = [create_student("cnn:" + "x".join(str(w * k) for w in widths), shape, 10).eval() for k in (1, 2, 3)]
    path = save_ensemble(members, tmp_path / "teachers.pt", torch.zeros(2, *shape))
    return load_ensemble(path)


def test_the_largest_candidate_within_a_share_of_the_median_member_is_chosen(tmp_path):
    ensemble = _teachers(tmp_path, (32, 64, 128))
    spec, record = size_student(StudentBudget(0.25), ensemble, (1, 28, 28), 10)
    median = record["member_cost"]["member"]
    assert record["member_cost"]["measure"] == "multiply_adds"
    assert median == sorted(record["member_cost"]["members"])[1]
    rows = {row["spec"]: row for row in record["candidates"]}
    assert rows[spec]["fits"] and rows[spec]["multiply_adds"] <= 0.25 * median
    larger = [row for row in record["candidates"] if row["multiply_adds"] > rows[spec]["multiply_adds"]]
    assert larger and all(row["multiply_adds"] > 0.25 * median for row in larger)
    assert record["chosen"] == spec and "largest of 9 candidates" in record["why"]
    bigger, _ = size_student(StudentBudget(1.0), ensemble, (1, 28, 28), 10)  # a larger share, a larger student
    assert CNN_LADDER.index(bigger) > CNN_LADDER.index(spec)


def test_parameter_and_latency_limits_narrow_the_choice(tmp_path):
    ensemble = _teachers(tmp_path, (32, 64, 128))
    spec, record = size_student(StudentBudget(1.0, max_params=20_000), ensemble, (1, 28, 28), 10)
    assert next(r for r in record["candidates"] if r["spec"] == spec)["parameters"] <= 20_000
    timed = []

    def latency(model):  # a stand-in yardstick: 1 ms per 10 k parameters
        timed.append(model)
        return sum(p.numel() for p in model.parameters()) / 10_000

    spec, record = size_student(StudentBudget(1.0, max_latency_ms=3.0), ensemble, (1, 28, 28), 10, latency)
    chosen = next(r for r in record["candidates"] if r["spec"] == spec)
    assert chosen["latency_ms"] <= 3.0 and "3 ms at batch 1" in record["why"]
    assert len(timed) == sum("latency_ms" in r for r in record["candidates"])  # only what the budget admitted


def test_when_nothing_fits_the_smallest_is_taken_and_the_record_says_so(tmp_path):
    ensemble = _teachers(tmp_path, (2, 2))
    spec, record = size_student(StudentBudget(0.01), ensemble, (1, 28, 28), 10)
    assert spec == CNN_LADDER[0] and record["why"].startswith("no candidate meets")


@pytest.mark.parametrize("budget, message", [(StudentBudget(0), "--student-budget 0"),
                                             (StudentBudget(max_params=0), "--max-params 0"),
                                             (StudentBudget(max_latency_ms=-1), "--max-latency-ms -1")])
def test_impossible_limits_are_refused(tmp_path, budget, message):
    with pytest.raises(CompressorError, match=message):
        size_student(budget, _teachers(tmp_path, (4, 8)), (1, 28, 28), 10)


@pytest.mark.slow
def test_compress_with_a_bare_family_sizes_one_and_reports_the_candidates(digits_ensemble, tmp_path):
    out = tmp_path / "out"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--student", "cnn", *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    selection = report["student"]["selection"]
    assert report["config"]["student"] == "cnn" and report["student"]["spec"] == selection["chosen"]
    assert selection["chosen"] in CNN_LADDER and len(selection["candidates"]) == len(CNN_LADDER)
    assert selection["member_cost"]["measure"] == "multiply_adds"
    explicit = tmp_path / "explicit"
    assert main(["--teacher", str(digits_ensemble), "--out", str(explicit), "--student", "mlp:32", *QUICK]) == 0
    assert json.loads((explicit / "report.json").read_text())["student"]["selection"] is None


@pytest.mark.slow
def test_max_latency_times_candidates_on_the_target(digits_ensemble, tmp_path):
    out = tmp_path / "out"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--student", "cnn", "--student-budget", "4",
                 "--max-latency-ms", "1000", *QUICK]) == 0
    selection = json.loads((out / "report.json").read_text())["student"]["selection"]
    timed = [row for row in selection["candidates"] if "latency_ms" in row]
    assert timed and all(0 < row["latency_ms"] < 1000 for row in timed)
