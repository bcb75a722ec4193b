"""compressor/training/distill.py: what --resume is checked against before the teachers run is what training
checks it against afterwards, as far as it goes."""

from __future__ import annotations

import pytest
from rich.console import Console

from compressor.config import RunConfig
from compressor.pipeline import start
from compressor.training.distill import baseline_fingerprint, distill_fingerprint, resume_points
from compressor.training.teacher_outputs import teacher_outputs
from compressor.training.transfer import transfer_set
from tests.conftest import FASHION_MNIST


def known_part(full: dict, known: dict) -> dict:
    """``full`` cut to the keys ``known`` holds, at every depth."""
    return {key: known_part(full[key], value) if isinstance(value, dict) else full[key] for key, value in known.items()}


@pytest.mark.parametrize("options", [
    {},
    {"recipe": "function-matching"},
    {"unlabeled": True},
    {"omit_classes": "3", "alpha": 0.5, "temperature": 2.0},
    {"no_cache": True, "recipe": "consistent"},
], ids=["hinton", "function-matching", "unlabeled", "omit-classes", "no-cache-consistent"])
def test_the_fingerprint_known_before_the_teachers_is_the_trained_ones(tmp_path, digits_ensemble, options):
    config = RunConfig(teacher=digits_ensemble, data="digits", student="mlp:16", max_train=200, out=tmp_path / "out",
                       teacher_cache=tmp_path / "cache", progress=False, baseline=True, **options)
    ctx = start(config, Console(quiet=True))
    (student_path, settings, known), (baseline_path, _, baseline_known) = resume_points(ctx)
    assert student_path == tmp_path / "out" / "checkpoints" / "last.pt" and settings["epochs"] == config.epochs
    assert baseline_path.parent.name == "checkpoints-baseline" and baseline_known == baseline_fingerprint(ctx)
    assert {"alpha", "temperature", "student", "teacher_sha256", "data_sha256"} <= set(known)
    assert set(known["transfer_set"]) == {"unlabeled", "omitted_classes", "recipe", "augmentation"}
    ctx.teacher = teacher_outputs(ctx)
    transfer = transfer_set(ctx)
    assert known_part(distill_fingerprint(ctx, transfer.alpha, transfer.info), known) == known


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST is not installed")
def test_the_known_fingerprint_of_a_shifting_recipe_matches_too(tmp_path, fashion_ensemble):
    config = RunConfig(teacher=fashion_ensemble, data=str(FASHION_MNIST), student="mlp:16", max_train=300,
                       out=tmp_path / "out", teacher_cache=tmp_path / "cache", progress=False, recipe="consistent")
    ctx = start(config, Console(quiet=True))
    [(_, _, known)] = resume_points(ctx)
    assert "shifts" in known["transfer_set"]["augmentation"]
    ctx.teacher = teacher_outputs(ctx)
    transfer = transfer_set(ctx)
    assert known_part(distill_fingerprint(ctx, transfer.alpha, transfer.info), known) == known


def test_a_search_knows_only_what_every_trial_shares(tmp_path, digits_ensemble):
    out = tmp_path / "out"
    for trial in ("distilled-hinton-T4-a0.9-lr0.003-e30", "screen/labels-hinton-lr0.003-e30"):
        (out / "tuning" / trial).mkdir(parents=True)
        (out / "tuning" / trial / "last.pt").write_bytes(b"")
    config = RunConfig(teacher=digits_ensemble, data="digits", student="mlp:16", max_train=200, out=out,
                       progress=False, recipe="auto")
    points = resume_points(start(config, Console(quiet=True)))
    assert [path.parent.name for path, _, _ in points] == ["distilled-hinton-T4-a0.9-lr0.003-e30",
                                                           "labels-hinton-lr0.003-e30"]
    assert all(settings is None for _, settings, _ in points)  # a trial's epochs and lr are its own
    assert set(points[0][2]) == {"teacher_sha256", "data_sha256", "student", "normalisation", "teacher_logits"}
