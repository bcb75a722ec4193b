"""``compress specialists`` end to end on digits: the ensemble it writes, its use as a teacher by the main job, the
dustbin correction on a trained specialist, a killed specialist process, and bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.core.fileio import sha256_file
from compressor.teachers.formats import load_ensemble
from tests.conftest import fit


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, digits_data) -> Path:
    """One small MLP trained briefly on digits: a generalist with room for specialists to help."""
    from compressor import save_ensemble

    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    torch.manual_seed(0)
    model = fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)), x, y, epochs=3, seed=0)
    path = tmp_path_factory.mktemp("generalist") / "generalist.pt"
    save_ensemble([model], path, x[:2], {"class_names": digits_data.class_names, "dataset": "digits"})
    return path


def _specialists(generalist: Path, out: Path, *extra: str) -> list[str]:
    return ["specialists", "--generalist", str(generalist), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def built(generalist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("specialists") / "run"
    assert main(_specialists(generalist, out, "--num-specialists", "2", "--subsets", "1,8;3,9", "--epochs", "15",
                             "--jobs", "2")) == 0
    return out


def test_the_job_writes_a_specialist_ensemble_with_its_subsets_and_corrections(built, capsys):
    ensemble = load_ensemble(built / "ensemble.pt")
    assert main(["inspect", str(built / "ensemble.pt")]) == 0
    assert "specialists (paper §5, top-1 of the generalist selects them): 1: 1, 8; 2: 3, 9" in " ".join(
        capsys.readouterr().out.split())
    assert ensemble.combine == "specialists" and len(ensemble.members) == 3
    assert ensemble.specialist_subsets == [(1, 8), (3, 9)]
    assert ensemble.metadata["specialists"]["found"] == {"method": "--subsets"}
    summary = json.loads((built / "summary.json").read_text())
    assert summary["trained_now"] == [1, 2]
    for record in summary["specialists"]:
        f = record["natural_fraction"]
        assert 0.1 < f < 0.3  # two of ten classes
        assert record["dustbin_shift"] == pytest.approx(math.log((1 - f) / f))  # half-and-half training
    test = summary["test"]
    assert test["all"]["examples"] == sum(entry["examples"] for entry in test["by_active"].values())
    low, high = test["all"]["change_interval_95"]
    assert low <= test["all"]["change"] <= high


def test_the_dustbin_correction_calibrates_a_trained_specialist_on_the_natural_class_mix(built, digits_data):
    """Trained on half its subset, a specialist overrates its classes on the natural mix, where they are a fifth of
    the rows; the shift makes it a better probability model there (lower NLL, a mean dustbin probability nearer the
    dustbin's frequency) on held-out rows it never saw."""
    specialist = torch.jit.load(str(built / "specialists" / "1" / "specialist.pt")).eval()
    x, y = torch.from_numpy(digits_data.test.x), torch.from_numpy(digits_data.test.y)
    outside = [c for c in range(10) if c not in (1, 8)]
    natural = float(torch.isin(y, torch.tensor(outside)).double().mean())
    shift = json.loads((built / "specialists" / "1" / "specialist.json").read_text())["dustbin_shift"]
    with torch.no_grad():
        expanded = specialist(x)  # (N, C): the dustbin's probability spread over the 8 other classes

    def scores(logits: torch.Tensor) -> tuple[float, float]:
        log_p = torch.log_softmax(logits, 1)
        dustbin = torch.logsumexp(log_p[:, outside], 1)  # (N,)
        picked = torch.where(y == 1, log_p[:, 1], torch.where(y == 8, log_p[:, 8], dustbin))
        return float(-picked.mean()), float(dustbin.exp().mean())

    undone = expanded.clone()
    undone[:, outside] -= shift  # the same specialist without its correction
    nll_before, dustbin_before = scores(undone)
    nll_after, dustbin_after = scores(expanded)
    assert dustbin_before < natural - 0.03  # uncorrected, it gives the dustbin too little
    assert nll_after < nll_before
    assert abs(dustbin_after - natural) < abs(dustbin_before - natural)


def test_the_main_job_distils_the_specialist_ensemble_and_reports_the_generalist_rows(built, tmp_path):
    out = tmp_path / "job"
    assert main(["--teacher", str(built / "ensemble.pt"), "--out", str(out), "--epochs", "2", "--no-progress",
                 "--batch-sizes", "1", "--warmup", "0.01", "--duration", "0.05", "--rounds", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [(row["model"], row["backend"]) for row in report["rows"]]
    assert ("member generalist", "PyTorch eager") in names and ("student from generalist", "PyTorch eager") in names
    assert not any("specialist-" in model for model, _ in names)  # a specialist alone is not a classifier row
    section = report["specialists"]
    assert section["subsets"] == [["1", "8"], ["3", "9"]]
    assert section["student_from_generalist_top1"] is not None and section["student_from_specialists_top1"] is not None
    assert report["diagnostics"]["fit"] is None and [m["name"] for m in report["diagnostics"]["members"]] == [
        "generalist"]
    markdown = " ".join((out / "report.md").read_text().split())
    assert "## Specialists" in markdown
    low, high = section["student_difference_interval_95"]
    assert low <= section["student_difference"] <= high
    assert "distilled from the generalist alone, with the same budget, reaches" in markdown
    assert (out / "checkpoints-generalist" / "last.pt").exists()


def _worker_pid(out: Path, m: int, timeout: float = 60.0) -> int:
    """The pid of the process training specialist ``m`` of ``out``, found by its command line."""
    wanted = ["-m", "compressor.training.specialist_training", str(out), str(m)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    args = (entry / "cmdline").read_bytes().decode().split("\0")
                except OSError:
                    continue
                if args[1:5] == wanted:
                    return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no process trains specialist {m}")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker process through /proc")
def test_killing_one_specialist_process_keeps_the_others_and_a_rerun_trains_only_it(generalist, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "compressor", *_specialists(generalist, out, "--num-specialists", "2", "--subsets",
                                                              "1,8;3,9", "--epochs", "60", "--jobs", "2")]
    parent = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "COLUMNS": "200"})
    victim = _worker_pid(out, 2)
    checkpoint = out / "specialists" / "2" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _, stderr = parent.communicate(timeout=300)
    assert parent.returncode == 1
    assert "1 of 2 specialists did not finish" in stderr and "specialist 2 exit -9" in stderr
    assert "rerun the same command" in stderr
    finished = out / "specialists" / "1" / "specialist.pt"
    assert finished.exists() and not (out / "specialists" / "2" / "specialist.pt").exists()
    assert not (out / "ensemble.pt").exists()
    kept = torch.load(checkpoint, weights_only=True)
    assert kept["epoch"] >= 1  # the killed specialist's finished epochs survive
    digest = sha256_file(finished)

    rerun = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert rerun.returncode == 0, rerun.stderr
    assert "reusing [1]" in rerun.stderr
    assert sha256_file(finished) == digest  # the finished specialist was not retrained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trained_now"] == [2]
    resumed = json.loads((out / "specialists" / "2" / "specialist.json").read_text())["resumed_from_epoch"]
    assert resumed >= kept["epoch"]
    assert len(load_ensemble(out / "ensemble.pt").members) == 3


@pytest.mark.parametrize("extra, message", [
    (["--num-specialists", "2", "--subsets", "1,8;3,cat"], "unknown class 'cat'"),
    (["--num-specialists", "2", "--subsets", "1,8;8,9"], "specialists' subsets must not overlap"),
    (["--num-specialists", "2", "--subsets", "1,8,1;3,9"], "named twice"),
    (["--num-specialists", "3", "--subsets", "1,8;3,9"], "names 2 subsets but --num-specialists is 3"),
    (["--num-specialists", "10"], "--num-specialists 10: give between 1 and 9"),
])
def test_bad_input_is_one_line_a_non_zero_exit_and_nothing_written(generalist, tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert main(_specialists(generalist, out, *extra)) == 1
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not out.exists()


def test_a_rerun_with_other_settings_is_refused(built, generalist, capsys):
    assert main(_specialists(generalist, built, "--num-specialists", "2", "--subsets", "1,8;3,9", "--epochs",
                             "5")) == 1
    assert "training differ" in " ".join(capsys.readouterr().err.split())
