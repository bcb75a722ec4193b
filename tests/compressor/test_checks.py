"""Pairings refused before the teachers run (compressor/checks.py), through the real CLI: exit 1, one ``error:``
line naming the file or flag and the fix, no ``internal error:``, nothing new in --out, and a fresh
--teacher-cache left empty: the teachers never ran."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compressor.cli import main
from compressor.students import create_student
from tests.compressor.test_cli import QUICK, assert_one_clear_line, run_cli
from tests.conftest import FASHION_MNIST

FAST = [*QUICK, "--rounds", "1", "--batch-sizes", "1"]


def snapshot(path: Path) -> dict | None:
    """Every file under ``path`` with its size and modification time (None: no such folder)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
            if p.is_file()}


def refused_before_the_teachers(capsys, tmp_path: Path, *args, out: Path | None = None) -> str:
    """Run ``compress *args`` with a fresh teacher cache; assert the contract above and return the output."""
    out = out or tmp_path / "out"
    cache = tmp_path / "fresh-teacher-cache"
    before = snapshot(out)
    code, output = run_cli(capsys, *args, "--out", out, "--teacher-cache", cache)
    assert code == 1, output
    assert "internal error:" not in output
    assert_one_clear_line(output)
    assert "teacher cache" not in output and not [p for p in cache.rglob("*") if p.is_file()], output
    assert snapshot(out) == before, output
    return " ".join(output.split())


def text_args(text_ensemble, token_data, *extra) -> list:
    return ["--teacher", text_ensemble, "--data", f"hf:{token_data}", *FAST, *extra]


def bert_config(tmp_path: Path, **changes) -> Path:
    """A one-layer BERT config.json for token_data's vocabulary (ids below 32) and rows (4 to 15 tokens)."""
    values = {"model_type": "bert", "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32, **changes}
    path = tmp_path / "student" / "config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def test_function_matching_on_token_data_is_refused_before_the_teachers(capsys, tmp_path, text_ensemble,
                                                                         token_data):
    output = refused_before_the_teachers(capsys, tmp_path, *text_args(
        text_ensemble, token_data, "--student", "hf:teacher/0.5", "--recipe", "function-matching"))
    assert "--recipe function-matching" in output and f"hf:{token_data}" in output and "--recipe hinton" in output


def test_function_matching_in_a_search_on_token_data_is_refused_too(capsys, tmp_path, text_ensemble, token_data):
    output = refused_before_the_teachers(capsys, tmp_path, *text_args(
        text_ensemble, token_data, "--student", "hf:teacher/0.5", "--recipe", "function-matching", "--tune", "1"))
    assert "--recipe function-matching" in output


@pytest.mark.parametrize("change, extra, needles", [
    ({"max_position_embeddings": 8}, (), ("max_position_embeddings 8", "at least 15")),
    ({"vocab_size": 16}, (), ("vocab_size 16", "largest token id is 31", "at least 32")),
    ({"max_position_embeddings": 16}, ("--seq-len", "20"), ("max_position_embeddings 16", "at least 20")),
], ids=["positions", "vocabulary", "positions-for-seq-len"])
def test_an_hf_student_smaller_than_the_data_is_refused_naming_its_config(capsys, tmp_path, text_ensemble,
                                                                          token_data, change, extra, needles):
    config = bert_config(tmp_path, **change)
    for spec in (f"hf:{config}", f"hf:{config.parent}"):  # a config file, and a save_pretrained folder
        output = refused_before_the_teachers(capsys, tmp_path, *text_args(text_ensemble, token_data, "--student",
                                                                          spec, *extra))
        assert f"--student {spec}" in output and f"in {config}" in output, output
        assert all(needle in output for needle in needles), output


def test_a_student_with_non_finite_weights_is_refused_on_real_rows(capsys, tmp_path, digits_ensemble):
    weights = tmp_path / "nan.safetensors"
    save_file({name: torch.full_like(t, float("nan")) for name, t in
               create_student("mlp:16", (1, 8, 8), 10).state_dict().items()}, weights)
    output = refused_before_the_teachers(capsys, tmp_path, "--teacher", digits_ensemble, "--data", "digits",
                                         "--student", "mlp:16", "--student-weights", weights, *FAST)
    assert "--student mlp:16" in output and "non-finite logits" in output and "--student-weights" in output


def test_a_bias_fix_for_a_student_without_an_output_bias_is_refused_before_the_teachers(capsys, tmp_path,
                                                                                        fashion_ensemble):
    pytest.importorskip("torchvision")
    output = refused_before_the_teachers(capsys, tmp_path, "--teacher", fashion_ensemble, "--data", FASHION_MNIST,
                                         "--max-train", "300", "--student", "torchvision:squeezenet1_1",
                                         "--omit-classes", "3", *FAST)
    assert "--omit-classes with --bias-fix auto" in output and "--bias-fix none" in output


def test_cache_top_k_keeping_every_class_is_refused_before_the_teachers(capsys, tmp_path, text_ensemble,
                                                                        token_data):
    output = refused_before_the_teachers(capsys, tmp_path, *text_args(text_ensemble, token_data, "--student",
                                                                      "hf:teacher/0.5", "--cache-top-k", "3"))
    assert "--cache-top-k 3" in output


# ---------------------------------------------------------------------------------------------------------------
# --resume: the checkpoint is read and checked before the teachers run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_ensemble) -> tuple[Path, list]:
    """A finished one-epoch run of mlp:16 on digits (with --baseline): its --out and its arguments."""
    root = tmp_path_factory.mktemp("finished")
    args = ["--teacher", str(digits_ensemble), "--data", "digits", "--student", "mlp:16", "--max-train", "200",
            "--baseline", *FAST]
    assert main([*args, "--out", str(root / "run"), "--teacher-cache", str(root / "cache")]) == 0
    return root / "run", args


def resumable(tmp_path: Path, finished_run, folder: str = "checkpoints", content=None) -> Path:
    """A copy of the finished run's --out with ``folder/last.pt`` replaced by ``content`` (bytes, or a function
    of the path that writes it; None keeps it), the only checkpoint there to resume from."""
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out)
    for other in {"checkpoints", "checkpoints-baseline"} - {folder}:
        (out / other / "last.pt").unlink()
    last = out / folder / "last.pt"
    if isinstance(content, bytes):
        last.write_bytes(content)
    elif content is not None:
        content(last)
    return out


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5000])


def pickled_protocol_4(path: Path) -> None:
    with open(path, "wb") as handle:  # torch.load warns of the protocol in two lines before refusing it
        pickle.dump({"format": "compressor.distill/1"}, handle, protocol=4)


def other_weights(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model_state"] = {name: t[:1] for name, t in checkpoint["model_state"].items()}
    torch.save(checkpoint, path)


@pytest.mark.parametrize("folder, content, extra, needles", [
    ("checkpoints", b"\x00garbage" * 64, (), ("cannot be read",)),
    ("checkpoints", b"", (), ("cannot be read",)),
    ("checkpoints", truncated, (), ("cannot be read",)),
    ("checkpoints", pickled_protocol_4, (), ("cannot be read",)),
    ("checkpoints", lambda p: torch.save({"epoch": 3}, p), (), ("not a compressor.distill/1",)),
    ("checkpoints", other_weights, (), ("holds other weights",)),
    ("checkpoints", None, ("--lr", "0.01"), ("different settings (lr)",)),
    ("checkpoints", None, ("--alpha", "0.5"), ("fingerprint.alpha",)),
    ("checkpoints", None, ("--student", "mlp:32"), ("fingerprint.student",)),
    ("checkpoints", None, ("--temperature", "2"), ("fingerprint.temperature",)),
    ("checkpoints-baseline", b"\x00garbage" * 64, (), ("cannot be read",)),
    ("checkpoints-baseline", None, ("--omit-classes", "3"), ("fingerprint.omitted_classes",)),
], ids=["garbage", "empty", "truncated", "pickle-protocol-4", "not-a-checkpoint", "other-weights", "lr", "alpha",
        "student", "temperature", "baseline-garbage", "baseline-omitted-classes"])
def test_a_resume_checkpoint_is_checked_before_the_teachers(capsys, tmp_path, finished_run, folder, content, extra,
                                                            needles):
    out = resumable(tmp_path, finished_run, folder, content)
    output = refused_before_the_teachers(capsys, tmp_path, *finished_run[1], "--resume", *extra, out=out)
    assert f"{out / folder / 'last.pt'}" in output and "drop --resume" in output, output
    assert all(needle in output for needle in needles), output
    assert "warn" not in output.lower(), output  # torch's pickle warning does not leak


def test_a_tuning_trials_checkpoint_is_checked_before_the_teachers(capsys, tmp_path, finished_run):
    out = tmp_path / "run"
    last = out / "tuning" / "distilled-hinton-T4-a0.9-lr0.003-e1" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"not a checkpoint")
    output = refused_before_the_teachers(capsys, tmp_path, *finished_run[1], "--tune-trials", "1", "--recipe",
                                         "auto", "--resume", out=out)
    assert str(last) in output and "cannot be read" in output


def test_a_matching_checkpoint_passes_the_early_check_and_resumes(capsys, tmp_path, finished_run):
    out = resumable(tmp_path, finished_run)
    code, output = run_cli(capsys, *finished_run[1], "--resume", "--out", out, "--teacher-cache",
                           tmp_path / "cache")
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["training"]["resumed_from_epoch"] == 1
