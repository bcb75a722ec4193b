"""What the student learns from: unlabeled transfer sets, omitted classes with the bias fix, teacher-logit sources
(in memory, cached on disk, recomputed per batch) and bf16 autocast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.training.loop import TrainConfig, train_student
from compressor.core.inference import evaluate_accuracy
from compressor.core.errors import CompressorError
from compressor.training.losses import DistillationLoss
from compressor.training.cached_logits import CachedLogits

QUICK = ["--data", "digits", "--student", "mlp:64x64", "--warmup", "0.01", "--duration", "0.02", "--rounds", "1",
         "--batch-sizes", "1", "--no-progress"]


def compress(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def report_of(folder) -> dict:
    return json.loads((folder / "report.json").read_text())


def student_top1(report: dict) -> float:
    return next(row for row in report["rows"] if row["kind"] == "student")["accuracy"]["top1"]


def test_unlabeled_trains_on_soft_targets_alone(capsys, digits_ensemble, tmp_path):
    code, output = compress(capsys, "--teacher", digits_ensemble, "--out", tmp_path / "u", "--unlabeled",
                            "--baseline", "--epochs", "8", *QUICK)
    assert code == 0, output
    report = report_of(tmp_path / "u")
    assert report["transfer_set"]["unlabeled"] and report["transfer_set"]["alpha"] == 1.0
    assert "soft targets alone" in output and "--baseline skipped" in output
    assert report["baseline"] is None
    history = report["student"]["training"]["history"]
    assert all(epoch["train_accuracy"] is None for epoch in history)  # it never saw a label
    assert student_top1(report) > 0.8  # and still learned digits from the teachers


def test_an_npz_without_labels_chooses_the_best_epoch_by_agreement(capsys, digits_ensemble, digits_data, tmp_path):
    x = np.concatenate([digits_data.train.x, digits_data.val.x, digits_data.test.x])
    np.savez(tmp_path / "images.npz", x=x)
    out = tmp_path / "npz"
    code, output = compress(capsys, "--teacher", digits_ensemble, "--out", out, "--epochs", "6",
                            *QUICK, "--data", tmp_path / "images.npz")
    assert code == 0, output
    report = report_of(out)
    assert report["transfer_set"]["best_epoch_by"].startswith("agreement with the ensemble")
    student = next(row for row in report["rows"] if row["kind"] == "student")
    assert student["accuracy"]["top1"] is None and student["accuracy"]["agreement"] > 0.8
    assert "no labels" in report["headline"]


@pytest.fixture(scope="module")
def omitted_runs(digits_ensemble, tmp_path_factory):
    """The same student distilled without the 3s, with the bias fix fitted on validation and without it."""
    root = tmp_path_factory.mktemp("omit")
    for name, fix in (("auto", "auto"), ("none", "none")):
        code = main([str(a) for a in ("--teacher", digits_ensemble, "--out", root / name, "--omit-classes", "3",
                                      "--bias-fix", fix, "--epochs", "10", *QUICK)])
        assert code == 0
    return root


def test_omitted_classes_leave_the_transfer_set_and_the_bias_fix_restores_them(omitted_runs, digits_data):
    fixed, plain = report_of(omitted_runs / "auto"), report_of(omitted_runs / "none")
    threes = int((digits_data.train.y == 3).sum())
    assert fixed["transfer_set"]["omitted_classes"] == [3] and fixed["transfer_set"]["rows_dropped"] == threes
    assert fixed["transfer_set"]["rows"] == len(digits_data.train) - threes
    assert plain["student"]["bias_fix"] is None
    fix = fixed["student"]["bias_fix"]
    assert fix["classes"] == [3] and fix["shift"] > 0
    assert fix["val_accuracy_after"] >= fix["val_accuracy_before"]
    # the fix is in the deployed model: the exported student's accuracy on the never-seen 3s rises
    per_class = [next(row for row in r["rows"] if row["kind"] == "student" and row["backend"] == "onnxruntime")
                 ["accuracy"]["per_class"][3] for r in (plain, fixed)]
    assert per_class[1] > per_class[0]


def test_a_fixed_bias_shift_and_bad_class_lists(capsys, digits_ensemble, tmp_path):
    code, output = compress(capsys, "--teacher", digits_ensemble, "--out", tmp_path / "f", "--omit-classes", "3,5",
                            "--bias-fix", "2.5", "--epochs", "2", *QUICK)
    assert code == 0, output
    fix = report_of(tmp_path / "f")["student"]["bias_fix"]
    assert fix["shift"] == 2.5 and fix["classes"] == [3, 5]
    for spec, needle in (("eleven", "eleven"), ("0,1,2,3,4,5,6,7,8,9", "all 10 classes")):
        code, output = compress(capsys, "--teacher", digits_ensemble, "--out", tmp_path / "bad", "--omit-classes",
                                spec, "--epochs", "1", *QUICK)
        assert code != 0 and needle in output and "Traceback" not in output, output
    code, output = compress(capsys, "--teacher", digits_ensemble, "--out", tmp_path / "bad", "--bias-fix", "lots",
                            "--epochs", "1", *QUICK)
    assert code != 0 and "--bias-fix lots" in output
    assert not (tmp_path / "bad").exists()


def test_amp_bf16_trains_on_the_cpu(capsys, digits_ensemble, tmp_path):
    code, output = compress(capsys, "--teacher", digits_ensemble, "--out", tmp_path / "amp", "--amp", "bf16",
                            "--epochs", "6", *QUICK)
    assert code == 0, output
    report = report_of(tmp_path / "amp")
    assert report["config"]["amp"] == "bf16"
    assert student_top1(report) > 0.8
    state = torch.load(tmp_path / "amp" / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["amp"] == "bf16"
    assert all(t.dtype == torch.float32 for t in state["model_state"].values())  # master weights stay fp32


def test_an_unknown_amp_mode_is_refused():
    student = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(CompressorError, match="--amp fp8"):
        train_student(student, x, y, None, x, y, lambda s, t, yb: s.sum(), TrainConfig(amp="fp8"), "unused")


def test_teacher_logits_in_memory_from_the_cache_or_per_batch_train_alike(tmp_path, digits_data):
    """The three teacher sources feed the same soft targets, so the students end up the same (up to float
    rounding of batch-size-dependent matrix products)."""
    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    xv, yv = torch.from_numpy(digits_data.val.x), torch.from_numpy(digits_data.val.y)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        logits = teacher(x)[None]  # (1, N, 10)
    sources = {"tensor": logits, "cache": CachedLogits(logits.numpy()),
               "per batch": lambda xb: teacher(xb)[None]}
    weights = {}
    for name, source in sources.items():
        torch.manual_seed(1)
        student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        train_student(student, x, y, source, xv, yv, DistillationLoss(2.0, 0.5),
                      TrainConfig(epochs=2, batch_size=64, progress=False), tmp_path / name.replace(" ", "-"))
        weights[name] = student.state_dict()
        assert evaluate_accuracy(student, xv, yv) > 0.3  # learning happened (the untrained teacher is no help)
    for name in ("cache", "per batch"):
        for key, value in weights["tensor"].items():
            torch.testing.assert_close(weights[name][key], value, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
def test_training_on_cuda_with_bf16_autocast_and_cached_logits(tmp_path, digits_data):
    """On a GPU: the student trains on CUDA from cached (fp16, memory-mapped) teacher logits under bf16 autocast,
    with the fused Triton loss, and learns as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    xv, yv = torch.from_numpy(digits_data.val.x), torch.from_numpy(digits_data.val.y)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    optimiser = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    for _ in range(200):
        optimiser.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        optimiser.step()
    with torch.no_grad():
        cached = CachedLogits(teacher(x)[None].numpy().astype(np.float16))
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
    result = train_student(student, x, y, cached, xv, yv, DistillationLoss(4.0, 0.9),
                           TrainConfig(epochs=8, batch_size=64, amp="bf16", progress=False), tmp_path)
    assert result.best_val_accuracy > 0.85
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in student.parameters())
