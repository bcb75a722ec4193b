"""The main job end to end on real data: teachers → student → ONNX Runtime → parity → report → bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import targets
from compressor.cli import main
from compressor.data.datasets import load_dataset
from compressor.teachers.formats import load_ensemble
from tests.compressor.test_cli import assert_one_clear_line, run_cli
from tests.conftest import FASHION_MNIST

pytestmark = pytest.mark.slow
QUICK = ["--warmup", "0.02", "--duration", "0.05", "--no-progress"]


def test_digits_main_job(tmp_path, digits_ensemble):
    out = tmp_path / "run"
    code = main(["--teacher", str(digits_ensemble), "--out", str(out), "--epochs", "4", "--student", "mlp:64",
                 *QUICK])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 2 and report["seed"] == 0
    assert report["command"].startswith("compress --teacher")
    assert report["parity"]["passed"] and report["parity"]["precision"] == "fp32"
    best = report["best_member_export"]["member"]  # the member with the best validation top-1, on the target
    assert [(r["model"], r["backend"]) for r in report["rows"]] == [
        ("ensemble", "PyTorch eager"), ("ensemble", "onnxruntime"), ("member mlp", "PyTorch eager"),
        ("member cnn", "PyTorch eager"), (f"member {best}", "onnxruntime"), ("student", "PyTorch eager"),
        ("student", "onnxruntime")]
    assert [r["kind"] for r in report["rows"]] == ["ensemble", "ensemble", "member", "member", "member", "student",
                                                   "student"]
    assert report["best_member_export"]["parity"]["passed"]
    rows = {(r["model"], r["backend"]): r for r in report["rows"]}
    assert rows[(f"member {best}", "onnxruntime")]["accuracy"]["top1"] == rows[(f"member {best}", "PyTorch eager")][
        "accuracy"]["top1"]
    assert f"best single member {best} on onnxruntime" in report["headline"]
    # each member's row scores what that member alone predicts on the test split
    members = load_ensemble(digits_ensemble).member_logits(torch.from_numpy(load_dataset("digits").test.x))
    for k, row in enumerate(report["rows"][2:4]):
        accuracy = float((members[k].argmax(1).numpy() == load_dataset("digits").test.y).mean())
        assert row["accuracy"]["top1"] == pytest.approx(accuracy, abs=1e-12)
        assert row["parameters"] == report["teacher"]["members"][k]["parameters"]
    # the ensemble exported to the same target predicts what it predicts in PyTorch
    assert report["ensemble_export"]["parity"]["passed"]
    assert report["rows"][1]["accuracy"]["top1"] == report["rows"][0]["accuracy"]["top1"]
    assert "than the ensemble on onnxruntime" in report["headline"]
    for row in report["rows"]:
        assert set(row["latency"]) == {"1", "64"} and row["timed"] and row["device"] == "cpu"
        assert 0 < row["latency"]["1"]["median_ms"] <= row["latency"]["1"]["p99_ms"]
        assert len(row["latency"]["1"]["round_medians"]) == 2  # the default: two interleaved rounds
        assert len(row["accuracy"]["per_class"]) == 10
    assert report["rows"][0]["accuracy"]["agreement"] == 1.0
    assert report["rows"][0]["accuracy"]["kl_to_ensemble"] == pytest.approx(0.0, abs=1e-9)
    assert report["rows"][-1]["accuracy"]["kl_to_ensemble"] > 0
    assert report["pareto"] == "pareto.png" and (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["benchmark"]["rounds"] == 2 and report["baseline"] is None
    assert report["data"]["sizes"] == {"train": 1294, "val": 144, "test": 359}
    assert report["student"]["training"]["history"][-1]["epoch"] == 4
    assert (out / "report.md").read_text().startswith("# compressor report")
    for name in ("student.pt", "checkpoints/last.pt", "checkpoints/best.pt", "bundle/model.onnx",
                 "bundle/metadata.json", "ensemble-export/model.onnx"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))

    # the bundle reproduces the student on raw inputs, and the exported student serves as a teacher again
    bundle = targets.load_bundle(out / "bundle")
    data = load_dataset("digits", seed=0)
    logits = bundle.predict(data.test.x)
    accuracy = float((logits.argmax(1) == data.test.y).mean())
    assert accuracy == pytest.approx(report["rows"][-1]["accuracy"]["top1"], abs=1e-9)
    assert load_ensemble(out / "student.pt").members[0].parameters == report["student"]["parameters"]


def test_resume_continues_from_the_checkpoint(tmp_path, digits_ensemble):
    args = ["--teacher", str(digits_ensemble), "--out", str(tmp_path / "run"), "--epochs", "2",
            "--student", "mlp:32", "--batch-sizes", "1", *QUICK]
    assert main(args) == 0
    first = json.loads((tmp_path / "run" / "report.json").read_text())
    assert main([*args, "--resume"]) == 0
    second = json.loads((tmp_path / "run" / "report.json").read_text())
    assert second["student"]["training"]["resumed_from_epoch"] == 2
    assert second["rows"][-1]["accuracy"] == first["rows"][-1]["accuracy"]


def test_normalisation_is_recorded_and_reproduced_by_the_bundle(tmp_path, digits_ensemble):
    out = tmp_path / "norm"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--epochs", "1", "--student", "mlp:16",
                 "--normalise", "0.3/0.4", "--batch-sizes", "1", *QUICK]) == 0
    metadata = json.loads((out / "bundle" / "metadata.json").read_text())
    assert metadata["normalisation"]["mean"] == [0.3] and metadata["normalisation"]["std"] == [0.4]
    raw = load_dataset("digits").test.x[:5]
    bundle = targets.load_bundle(out / "bundle")
    normalised = ((raw - np.float32(0.3)) / np.float32(0.4)).astype(np.float32)
    assert np.array_equal(bundle.predict(raw), bundle.predict(normalised, normalised=True))


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_main_job_with_a_users_ensemble(tmp_path, fashion_ensemble):
    out = tmp_path / "fashion"
    code = main(["--teacher", str(fashion_ensemble), "--data", str(FASHION_MNIST), "--target", "onnxruntime",
                 "--out", str(out), "--max-train", "2000", "--epochs", "2", "--student", "cnn:8x16",
                 "--batch-sizes", "1,8", *QUICK])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["name"] == "fashion-mnist" and report["data"]["input_shape"] == [1, 28, 28]
    assert report["parity"]["passed"]
    assert report["rows"][0]["accuracy"]["top1"] > 0.5  # real teachers trained on real images
    metadata = json.loads((out / "bundle" / "metadata.json").read_text())
    assert metadata["class_names"][0] == "t-shirt/top" and metadata["input"]["shape"] == [1, 28, 28]


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "3", "--batch-sizes", "1", *QUICK]) == 0
    assert (out / "teachers" / "digits-ensemble.pt").is_file()
    report = json.loads((out / "report.json").read_text())
    assert len(report["teacher"]["members"]) == 3 and report["parity"]["passed"]


def _row(kind, backend, top1, median_ms, parameters, model=None):
    return {"model": model or kind, "kind": kind, "backend": backend, "precision": "fp32", "parameters": parameters,
            "accuracy": {"top1": top1},
            "latency": {"1": {"median_ms": median_ms}}}


def test_headline_compares_like_with_like_and_says_plainly_when_the_student_loses():
    from compressor.training.loop import TrainResult
    from compressor.deployment.verdict import headline

    eager = _row("ensemble", "PyTorch eager", 0.91, 1.0, 1_500_000)
    on_target = _row("ensemble", "onnxruntime", 0.91, 0.3, 1_500_000)

    def student(top1, median_ms):
        return _row("student", "onnxruntime", top1, median_ms, 5_000)

    close = headline([eager, on_target, student(0.905, 0.05)], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "6.0× faster than the ensemble on onnxruntime (20.0× faster than the ensemble in PyTorch eager)" in close
    assert "loses" not in close
    eager_only = headline([eager, student(0.905, 0.05)], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "20.0× faster" in eager_only and "mixes what distillation buys" in eager_only
    rising = _trained(best=10, epochs=10, fit=0.95)
    still_rising = headline([eager, on_target, student(0.83, 0.05)], "onnxruntime", rising, 10,
                            evidence={"val_examples": 1000})
    assert "loses 8.0 points" in still_rising and "still rose from 65.00% at epoch 5 to 80.00%" in still_rising
    assert "more --epochs" in still_rising
    peaked = headline([eager, on_target, student(0.83, 0.05)], "onnxruntime", _trained(4, 10, fit=0.84), 10,
                      evidence={"val_examples": 1000})
    assert "fits only 84.00% of its own training rows" in peaked and "capacity limits it" in peaked
    unknown = headline([eager, on_target, student(0.83, 0.05)], "onnxruntime", _trained(4, 10, fit=0.99), 10,
                       evidence={"val_examples": 1000})
    assert "name no single cause" in unknown and "undertrained" not in unknown and "capacity" not in unknown
    slower = headline([eager, on_target, student(0.91, 0.6)], "onnxruntime", TrainResult(4, 0.8), 10)
    assert "2.0× SLOWER than the ensemble on onnxruntime" in slower
    member = _row("member", "onnxruntime", 0.90, 0.2, 500_000, model="member cnn")
    beats = headline([eager, on_target, member, student(0.905, 0.05)], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "best single member cnn on onnxruntime instead: the student is 4.0× faster than it" in beats
    assert "0.50 points more accurate" in beats and "worth weighing" not in beats
    loses = headline([eager, on_target, member, student(0.89, 0.05)], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "1.00 points LESS accurate" in loses and "shipping that member alone is worth weighing" in loses


def _trained(best: int, epochs: int, fit: float):
    """A TrainResult whose validation accuracy climbs 3 points an epoch up to ``best`` and then holds, fitting
    ``fit`` of its training rows."""
    from compressor.training.loop import TrainResult

    history = [{"epoch": e, "val_accuracy": 0.5 + 0.03 * min(e, best), "train_accuracy": fit}
               for e in range(1, epochs + 1)]
    return TrainResult(best, history[best - 1]["val_accuracy"], history)


def test_headline_of_teachers_that_get_every_test_row_wrong_says_so():
    from compressor.training.loop import TrainResult
    from compressor.deployment.verdict import headline

    eager, student = _row("ensemble", "PyTorch eager", 0.0, 1.0, 1_500_000), _row("student", "onnxruntime", 0.1, 0.1, 5)
    text = headline([eager, student], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "The ensemble gets no test row right" in text and "--data" in text and "10.00%" in text


def test_headline_states_the_share_of_the_ensembles_gain_kept_over_the_baseline():
    from compressor.deployment.verdict import headline
    from compressor.training.loop import TrainResult

    eager = _row("ensemble", "PyTorch eager", 0.92, 1.0, 1_500_000)
    student = _row("student", "onnxruntime", 0.91, 0.05, 5_000)

    def baseline(top1):
        return _row("baseline", "PyTorch eager", top1, 0.1, 5_000)

    kept = headline([eager, baseline(0.90), student], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "and 50% of its gain over the hard-label baseline (90.00%)" in kept and "NOT" not in kept
    lost = headline([eager, baseline(0.915), student], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "Distillation did NOT pay" in lost and "0.50 points better" in lost and "--tune" in lost
    undertrained = "the teachers fit the transfer set (91.00%) no better than unseen val data (90.80%)"
    named = headline([eager, baseline(0.915), student], "onnxruntime", TrainResult(3, 0.9), 10,
                     causes=[undertrained, "a later warning"])
    assert f"Likely cause, from the ensemble diagnostics: {undertrained}." in named and "later" not in named
    nothing = headline([eager, baseline(0.93), student], "onnxruntime", TrainResult(3, 0.9), 10)
    assert "no gain over it to pass on" in nothing


def test_a_student_whose_baseline_matches_the_ensemble_is_not_called_too_small():
    """Losing points to the ensemble when the same network does better on labels alone and the teachers disagree
    with the labels is the soft targets' doing; capacity is named only when the student cannot fit its own rows."""
    from compressor.deployment.verdict import headline

    eager = _row("ensemble", "PyTorch eager", 0.90, 1.0, 400_000)
    student = _row("student", "onnxruntime", 0.79, 0.05, 80_000)
    evidence = {"val_examples": 1000, "transfer_error": 0.12}
    strong = headline([eager, _row("baseline", "PyTorch eager", 0.97, 0.1, 80_000), student], "onnxruntime",
                      _trained(23, 30, fit=0.8), 30, evidence=evidence)
    assert "labels alone reaches 97.00%, and the teachers disagree with the labels on 12.0%" in strong
    assert "lower --alpha" in strong and "capacity" not in strong
    weak = headline([eager, _row("baseline", "PyTorch eager", 0.75, 0.1, 80_000), student], "onnxruntime",
                    _trained(23, 30, fit=0.8), 30, evidence=evidence)
    assert "fits only 80.00% of its own training rows" in weak and "larger --student" in weak


def _scored(kind: str, correct: np.ndarray, labels: np.ndarray):
    """A Row whose argmax is right exactly where ``correct`` says (scores one-hot on the label or the next class)."""
    from compressor.deployment.rows import EAGER, Row

    answers = np.where(correct, labels, (labels + 1) % 10)
    return Row(kind, kind, EAGER, "cpu", "fp32", 1, "-", np.eye(10)[answers], None)


def test_the_gain_kept_carries_a_bootstrap_interval_or_is_called_not_measurable():
    from compressor.deployment.verdict import headline, verdict
    from compressor.training.loop import TrainResult

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)

    def right(share):  # exactly `share` of the rows right, at random positions
        return rng.permutation(np.arange(2000) < round(share * 2000))

    rows = [_scored("ensemble", right(0.95), labels), _scored("baseline", right(0.85), labels),
            _scored("student", right(0.90), labels)]
    gain = verdict(rows, labels)
    assert gain["gain_kept"] == pytest.approx(0.5) and gain["measurable"]
    low, high = gain["interval_95"]
    assert 0 < low < 0.5 < high < 1  # excludes 0: the student keeps a real share
    text = headline([_row("ensemble", "PyTorch eager", 0.95, 1.0, 100), _row("baseline", "PyTorch eager", 0.85, 1, 1),
                     _row("student", "onnxruntime", 0.90, 0.1, 1)], "onnxruntime", TrainResult(3, 0.9), 10, gain=gain)
    assert f"and 50% (95% interval {low:.0%} to {high:.0%}) of its gain" in text

    small = labels[:300]
    close = [_scored("ensemble", right(0.86)[:300], small), _scored("baseline", right(0.855)[:300], small),
             _scored("student", right(0.86)[:300], small)]
    noisy = verdict(close, small)
    assert not noisy["measurable"] and noisy["interval_95"] is None
    text = headline([_row("ensemble", "PyTorch eager", 0.87, 1.0, 100), _row("baseline", "PyTorch eager", 0.86, 1, 1),
                     _row("student", "onnxruntime", 0.86, 0.1, 1)], "onnxruntime", TrainResult(3, 0.9), 10, gain=noisy)
    assert "within the noise of 300 test rows" in text and "not measurable" in text
    assert verdict(rows[::2], labels) is None  # no baseline row
    assert verdict(rows, np.full(2000, -1)) is None  # no labels


def test_baseline_is_trained_on_labels_with_the_same_budget_and_reported(tmp_path, digits_ensemble):
    out = tmp_path / "baseline"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--epochs", "3", "--student", "mlp:32",
                 "--baseline", "--batch-sizes", "1", "--rounds", "1", *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {(r["kind"], r["backend"]): r for r in report["rows"]}
    baseline = rows[("baseline", "PyTorch eager")]
    assert baseline["parameters"] == rows[("student", "PyTorch eager")]["parameters"]
    assert len(report["baseline"]["training"]["history"]) == 3 and (out / "checkpoints-baseline" / "best.pt").is_file()
    assert "of its gain over the hard-label baseline" in report["headline"] or "no gain over it" in report["headline"]
    verdict = report["verdict"]
    assert verdict["baseline_top1"] == baseline["accuracy"]["top1"] and verdict["resamples"] == 2000
    assert verdict["measurable"] == (verdict["interval_95"] is not None)
    assert verdict["measurable"] != any("within the noise of the ensemble" in w for w in report["warnings"])
    assert len(baseline["latency"]["1"]["round_medians"]) == 1
    # the baseline saw no teacher: retraining it by hand on the labels gives the same accuracy
    markdown = (out / "report.md").read_text()
    assert "| baseline | PyTorch eager |" in markdown and "Hard-label baseline" in markdown


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_reduced_precision_is_gated_reported_beside_fp32_and_bundled(tmp_path, digits_ensemble, precision):
    out = tmp_path / precision
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--epochs", "3", "--student", "mlp:64",
                 "--precision", precision, "--batch-sizes", "1", "--rounds", "1", *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["precision"] == precision and report["parity"]["passed"]
    on_target = [(r["precision"], r["accuracy"]["top1"]) for r in report["rows"]
                 if r["kind"] == "student" and r["backend"] == "onnxruntime"]
    assert [p for p, _ in on_target] == ["fp32", precision]  # what the precision buys, side by side
    assert f"On onnxruntime ({precision})" in report["headline"]
    assert report["export"]["metadata"]["conversion"]["bytes"] < report["export"]["metadata"]["conversion"]["fp32_bytes"]
    assert json.loads((out / "bundle" / "metadata.json").read_text())["precision"] == precision
    # the bundle serves the reduced-precision model, which predicts what its report row says
    data = load_dataset("digits", seed=0)
    accuracy = float((targets.load_bundle(out / "bundle").predict(data.test.x).argmax(1) == data.test.y).mean())
    assert accuracy == pytest.approx(on_target[1][1], abs=1e-9)


def test_a_precision_the_target_lacks_stops_before_any_work(tmp_path, digits_ensemble, capsys):
    out = tmp_path / "never"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--target", "onnx", "--precision", "int8",
                 *QUICK]) == 1
    assert "use --target onnxruntime for int8" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("flag, value", [
    ("--lr", "0"), ("--lr", "nan"), ("--threads", "0"), ("--threads", "-2"), ("--warmup", "-1"), ("--duration", "0"),
    ("--max-accuracy-drop", "-1"), ("--temperature", "nan"), ("--seed", "-1"),
])
def test_numbers_read_late_are_refused_before_any_work(tmp_path, digits_ensemble, capsys, flag, value):
    out = tmp_path / "never"
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--out", out, "--student", "mlp:16", *QUICK,
                           flag, value)
    assert code == 1 and not out.exists() and "internal error" not in output
    assert_one_clear_line(output, f"{flag} {value}")
    assert "teachers" not in output  # refused before they were even loaded


def test_a_student_benchmarked_below_the_speed_up_its_choice_priced_is_named():
    from compressor.config import RunConfig
    from compressor.deployment.report import speed_warnings

    selection = {"chosen": "mlp:64", "candidates": [{"spec": "mlp:64", "latency_ms": 0.05}],
                 "constraint": {"reference_ms": 0.13, "min_speedup": 2.0, "max_latency_ms": None, "max_params": None}}
    config = RunConfig(teacher="t.pt")
    slow = [_row("member", "onnxruntime", 0.9, 0.10, 10), _row("student", "onnxruntime", 0.9, 0.066, 1)]
    (warning,) = speed_warnings(selection, slow, config)
    assert "priced the student 2.6× faster" in warning and "measures 1.5×" in warning and "--min-speedup" in warning
    fast = [_row("member", "onnxruntime", 0.9, 0.10, 10), _row("student", "onnxruntime", 0.9, 0.04, 1)]
    assert speed_warnings(selection, fast, config) == []
    absolute = {**selection, "constraint": {**selection["constraint"], "max_latency_ms": 0.06}}
    assert speed_warnings(absolute, slow, config) == [] and speed_warnings(None, slow, config) == []
