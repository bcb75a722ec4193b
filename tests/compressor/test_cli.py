"""`compress` on bad input: one line naming the file and the fix, a non-zero exit, no traceback, nothing in --out."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor import save_ensemble
import compressor.cli as cli_module
from compressor.cli import main
from compressor.options import command_line
from compressor.config import RunConfig

QUICK = ["--epochs", "1", "--warmup", "0.01", "--duration", "0.02", "--no-progress"]


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_one_clear_line(output: str, *needles: str) -> None:
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, output
    for needle in needles:
        assert needle in output.replace("\n", " "), output


def test_tensorrt_without_gpu_stops_before_training(capsys, digits_ensemble, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--target", "tensorrt", "--out", out, *QUICK)
    assert code == 2
    assert_one_clear_line(output, "NVIDIA GPU", "--target onnxruntime")
    # the student's graph was checked against TensorRT's ONNX parser before stopping
    assert_one_clear_line(output, "--student cnn:", "will build with TensorRT 11", "dynamic batch")  # sized
    assert not out.exists()


def test_preflight_command_checks_an_onnx_file_without_a_gpu(capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="det")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    code, output = run_cli(capsys, "preflight", path)
    assert code == 1 and "will NOT build" in output and "node 'det' (Det)" in output


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, np.random.default_rng(0).bytes(2048)],
                         ids=["empty", "zeros", "random"])
def test_unreadable_teacher(capsys, tmp_path, content):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(content)
    code, output = run_cli(capsys, "--teacher", bad, "--out", tmp_path / "out", *QUICK)
    assert code == 1
    assert_one_clear_line(output, "broken.pt")
    assert not (tmp_path / "out").exists()


def test_truncated_teacher(capsys, tmp_path, digits_ensemble):
    bad = tmp_path / "cut.pt"
    bad.write_bytes(digits_ensemble.read_bytes()[:5000])
    code, output = run_cli(capsys, "--teacher", bad, "--out", tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "cut.pt")


def test_missing_data_path(capsys, tmp_path, digits_ensemble):
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--data", tmp_path / "nowhere", "--out",
                           tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "nowhere", "no such file")


def test_data_shape_mismatch(capsys, tmp_path, digits_ensemble):
    np.savez(tmp_path / "wide.npz", x=np.zeros((50, 1, 28, 28), np.float32), y=np.zeros(50, np.int64))
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--data", tmp_path / "wide.npz", "--out",
                           tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "[1, 28, 28]", "[1, 8, 8]")


def test_unwritable_out(capsys, tmp_path, digits_ensemble):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--out", blocker / "out", *QUICK)
    assert code == 1
    assert_one_clear_line(output, "--out", "a-file")
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--out", "/proc/compressor-out", *QUICK)
    assert code == 1
    assert_one_clear_line(output, "/proc/compressor-out")


def test_members_with_different_class_counts(capsys, tmp_path):
    x = torch.rand(2, 1, 8, 8)
    for k, classes in enumerate((10, 7)):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, classes)).eval()
        torch.jit.save(torch.jit.trace(net, x), str(tmp_path / f"m{k}.pt"))
    (tmp_path / "ensemble.toml").write_text('[[members]]\npath = "m0.pt"\n[[members]]\npath = "m1.pt"\n')
    code, output = run_cli(capsys, "--teacher", tmp_path / "ensemble.toml", "--data", "digits",
                           "--out", tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "'m0' 10", "'m1' 7")


class NaNAfterThreshold(nn.Module):
    """Finite on random validation batches, NaN on real data rows whose first pixel is exactly 0."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        bad = (x.flatten(1)[:, :1] == 0).float()
        return logits + bad * float("nan")


def test_nan_logits_from_a_member(capsys, tmp_path):
    net = NaNAfterThreshold().eval()
    path = save_ensemble([nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), net], tmp_path / "nan.pt",
                         torch.rand(2, 1, 8, 8) + 0.1, {"member_names": ["fine", "broken"]})
    code, output = run_cli(capsys, "--teacher", path, "--data", "digits", "--out", tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "'broken'", "NaN")


def test_pickle_needs_trust_flag(capsys, tmp_path):
    path = tmp_path / "members.pkl"
    torch.save([nn.Sequential(nn.Flatten(), nn.Linear(64, 10))], path)
    code, output = run_cli(capsys, "--teacher", path, "--data", "digits", "--out", tmp_path / "out", *QUICK)
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_clear_line(output, "members.pkl", "--trust-pickle")


def test_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"junk")
    result = subprocess.run([sys.executable, "-m", "compressor", "--teacher", str(bad), "--debug"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CompressorError" in result.stderr
    result = subprocess.run([sys.executable, "-m", "compressor", "--teacher", str(bad)], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "broken.pt" in result.stderr


def test_usage_errors(capsys):
    code, output = run_cli(capsys)
    assert code == 2 and "--teacher is required" in output
    code, output = run_cli(capsys, "--teacher", "x.pt", "--batch-sizes", "1,zero")
    assert code == 2 and "comma-separated" in output


def test_inspect_lists_members_and_scores_them_on_data(capsys, digits_ensemble):
    code, output = run_cli(capsys, "inspect", digits_ensemble)
    assert code == 0
    assert "mlp" in output and "cnn" in output and "input shape: [1, 8, 8]" in output and "classes: 10" in output
    assert "accuracy on the test split" in output  # the ensemble's dataset hint ("digits") is used
    code, output = run_cli(capsys, "inspect", digits_ensemble, "--data", "digits", "--max-train", "100")
    assert code == 0 and "ensemble" in output and "(100 examples)" in output
    code, output = run_cli(capsys, "inspect", "/nonexistent.pt")
    assert code == 1
    assert_one_clear_line(output, "/nonexistent.pt")


def test_an_ort_provider_this_build_lacks_stops_before_training(capsys, digits_ensemble, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--ort-provider", "tensorrt", "--out", out, *QUICK)
    assert code == 2
    assert_one_clear_line(output, "--ort-provider tensorrt", "install onnxruntime-gpu")
    assert not out.exists()


def test_the_chosen_ort_provider_runs_the_student_and_the_ensemble(capsys, digits_ensemble, tmp_path):
    out = tmp_path / "out"
    code, output = run_cli(capsys, "--teacher", digits_ensemble, "--ort-provider", "cpu", "--out", out,
                           "--rounds", "1", "--batch-sizes", "1", *QUICK)
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["ort_provider"] == "cpu"
    assert report["runner"]["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("config", [
    RunConfig(teacher=Path("ens.pt")),
    RunConfig(teacher=Path("dir with space/ens.pt"), target="onnx", data="/data/fashion", student="cnn:16x32",
              out=Path("out dir"), temperature=2.0, alpha=0.0, epochs=100, batch_size=64, lr=1e-3, precision="int8",
              max_accuracy_drop=0.5, seed=3, normalise=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
              max_train=500, trust_pickle=True, resume=True, batch_sizes=(1,), warmup_s=0.05, duration_s=0.2,
              rounds=3, baseline=True, teacher_cache=Path("cache"), no_cache=True, refresh_teacher_cache=True,
              unlabeled=True, omit_classes="dress,coat", bias_fix="none", amp="bf16", device="cpu",
              ort_provider="cpu", recipe="auto", tune=12.5, tune_trials=4, threads=2, progress=False),
])
def test_command_line_builds_the_same_config(monkeypatch, config):
    """command_line is the inverse of the CLI: its line, parsed by compress, gives back every setting."""
    parsed = []
    monkeypatch.setattr(cli_module, "_run_and_summarise", parsed.append)  # parse only; the pipeline is not tested here
    line = command_line(config)
    assert main(shlex.split(line)[1:]) == 0
    assert {**parsed[0].to_dict(), "command": ""} == config.to_dict()
    assert parsed[0].command == line


def test_command_line_refuses_a_setting_compress_lacks():
    with pytest.raises(ValueError, match="weight_decay"):
        command_line(RunConfig(teacher=Path("ens.pt"), weight_decay=0.0))


def test_a_bad_student_spec_stops_before_the_teachers_run(digits_ensemble, tmp_path, capsys):
    code = main(["--teacher", str(digits_ensemble), "--student", "cnnn:8", "--out", str(tmp_path / "run"), *QUICK])
    err = capsys.readouterr().err
    assert code == 1 and "did you mean cnn" in err
    assert "teacher cache" not in err and "warning" not in err  # nothing ran: no teachers, no diagnostics
    assert not (tmp_path / "run").exists()
