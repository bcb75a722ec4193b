"""compressor/augment.py and compressor/recipes.py: views that depend on (row, epoch, seed) only, teachers that see
the student's view, and the recipes end to end on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from compressor.data.augment import Mixup, Shift, default_augmentation, row_hash, uniform
from compressor.cli import main
from compressor.training.loop import TrainConfig, train_student
from compressor.core.errors import CompressorError
from compressor.training.recipes import make_recipe

QUICK = ["--data", "digits", "--student", "mlp:64x64", "--warmup", "0.01", "--duration", "0.02", "--rounds", "1",
         "--batch-sizes", "1", "--no-progress"]


def images(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_view_depends_on_row_epoch_and_seed_not_on_the_batch():
    x, rows = images(), torch.arange(12)
    shift = Shift(2, seed=5)
    whole = shift(x, rows, 3)
    pieces = torch.cat([shift(x[:5], rows[:5], 3), shift(x[5:], rows[5:], 3)])
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, shift(x, rows, 4)) and not torch.equal(whole, Shift(2, seed=6)(x, rows, 3))
    assert not torch.equal(whole, x)


def test_a_shift_moves_whole_pixels_within_the_range_with_zero_fill():
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0  # one bright pixel per image
    moved = Shift(2, seed=0)(x, torch.arange(64), 1)
    spots = moved[:, 0].flatten(1).argmax(1)  # (64,) where the pixel went
    dy, dx = spots // 8 - 3, spots % 8 - 4
    assert bool((dy.abs() <= 2).all() and (dx.abs() <= 2).all())
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 10  # the offsets really vary
    assert torch.equal(moved.sum(dim=(1, 2, 3)), torch.ones(64))  # nothing smeared: a pure shift


def test_mixup_blends_each_row_with_a_partner_by_a_weight_in_zero_one():
    pool = images(50)
    rows = torch.arange(10, 20)
    mixed = Mixup(pool, seed=1)(pool[rows], rows, 2)
    partners = row_hash(rows, 2, 1, 3) % 50
    lam = uniform(rows, 2, 1, 4).float()[:, None, None, None]
    torch.testing.assert_close(mixed, lam * pool[rows] + (1 - lam) * pool[partners])
    assert bool(((lam > 0) & (lam < 1)).all())


def test_the_hash_spreads_rows_evenly():
    values = uniform(torch.arange(100_000), 0, 0, 1)
    counts = torch.histc(values.float(), bins=10, min=0, max=1)
    assert bool((counts > 9_500).all() and (counts < 10_500).all())


def test_teachers_called_per_batch_see_exactly_the_students_view(tmp_path):
    """The view runs before a callable teacher source, so soft targets describe the input the student trains on."""
    x, y = images(32), torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    seen = []

    def teacher(xb):
        seen.append(xb.clone())
        return torch.zeros(1, len(xb), 10)

    def view(xb, rows, epoch):
        return xb + 100.0 * epoch + rows[:, None, None, None]  # marks both the epoch and the row

    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    train_student(student, x, y, teacher, x, y, lambda s, t, yb: (s - t[0]).pow(2).mean(),
                  TrainConfig(epochs=2, batch_size=8, progress=False), tmp_path, view=view)
    assert len(seen) == 8
    for batch in seen:
        epoch = int(batch.min() // 100)
        rows = (batch - 100.0 * epoch - x[:1] * 0).flatten(1)  # marks plus the original pixels
        assert epoch in (1, 2) and bool((rows >= 0).all())
    first_epoch = torch.cat(seen[:4])
    originals = (first_epoch - 100.0)[:, 0, 0, 0]  # x + row index at pixel (0, 0)
    row_ids = torch.round(originals - 0.5).long()  # images are in [0, 1), so floor(value) is the row index
    assert sorted(row_ids.tolist()) == list(range(32))  # every row seen once per epoch, with its own mark


def test_recipes_resolve_by_input_kind():
    x = images()
    assert make_recipe("hinton", (1, 8, 8), x).view is None
    vectors = make_recipe("consistent", (64,), x.flatten(1))
    assert vectors.view is None and not vectors.teachers_per_batch and "as hinton" in vectors.augmentation
    assert make_recipe("consistent", (1, 8, 8), x).view is None  # 8×8 images are too small to shift
    fashion = make_recipe("consistent", (1, 28, 28), torch.rand(4, 1, 28, 28))
    assert isinstance(fashion.view, Shift) and fashion.view.pixels == 2 and fashion.teachers_per_batch
    matching = make_recipe("function-matching", (1, 28, 28), torch.rand(4, 1, 28, 28))
    assert isinstance(matching.view, Mixup) and matching.alpha == 1.0 and isinstance(matching.baseline_view, Shift)
    assert matching.view.then == matching.baseline_view
    small = make_recipe("function-matching", (1, 8, 8), x)
    assert isinstance(small.view, Mixup) and small.view.then is None and small.baseline_view is None
    assert default_augmentation((3, 15, 40)) is None and default_augmentation((3, 32, 32)).pixels == 2
    with pytest.raises(CompressorError, match="--recipe cutmix: choose one of"):
        make_recipe("cutmix", (1, 8, 8), x)


def test_function_matching_on_small_images_mixes_without_shifting_and_trains_on_soft_targets(capsys, digits_ensemble,
                                                                                               tmp_path):
    out = tmp_path / "fm"
    code = main([str(a) for a in ("--teacher", digits_ensemble, "--out", out, "--recipe", "function-matching",
                                  "--epochs", "6", "--baseline", *QUICK)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    transfer = report["transfer_set"]
    assert transfer["recipe"] == "function-matching" and "cached" in transfer["teachers"]
    # the teachers' logits on each epoch's mixed views came from the view cache (computed now, or by an earlier test
    # of this session with the same teachers, data and views)
    views = transfer["view_cache"]
    assert sorted(views["epochs_computed"] + views["epochs_reused"]) == [1, 2, 3, 4, 5, 6]
    assert "View cache" in (out / "report.md").read_text()
    assert transfer["alpha"] == 1.0 and "mixup" in transfer["augmentation"] and "shift" not in transfer["augmentation"]
    assert report["diagnostics"]["view_check"] is None  # 8×8 digits are not shifted, so there is nothing to check
    student = next(row for row in report["rows"] if row["kind"] == "student")
    assert student["accuracy"]["top1"] > 0.5  # learned from mixed inputs and soft targets alone (chance: 10%;
    # function matching needs long schedules, Beyer et al. 2022: 6 epochs give about 72%)
    assert "Recipe `function-matching`" in (out / "report.md").read_text()
    for run in (report["student"], report["baseline"]):  # each one's imitation of the ensemble where it was taught
        fit = run["transfer_fit"]
        assert fit["rows"] == transfer["rows"] and 0.5 < fit["agreement"] <= 1 and fit["kl_to_ensemble"] > 0
    assert "of its own transfer set it agrees with the ensemble" in (out / "report.md").read_text()
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["fingerprint"]["transfer_set"]["recipe"] == "function-matching"


def test_consistent_shifts_fashion_images_for_student_and_teachers_and_checks_the_teachers(capsys, fashion_ensemble,
                                                                                          tmp_path):
    out = tmp_path / "consistent"
    code = main([str(a) for a in ("--teacher", fashion_ensemble, "--out", out, "--recipe", "consistent", "--epochs",
                                  "2", "--max-train", "1500", "--student", "mlp:64x64", "--warmup", "0.01",
                                  "--duration", "0.02", "--rounds", "1", "--batch-sizes", "1", "--no-progress")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["transfer_set"]["augmentation"].startswith("shifts by up to 2 px")
    # the teachers' logits on shifted views are stored per (row, offset): 25 offsets at ±2 px, at most one pass
    # over the transfer rows per epoch
    views = report["transfer_set"]["view_cache"]
    rows = report["transfer_set"]["rows"]
    assert views["pairs_total"] == 25 * rows and views["pairs_stored"] <= 2 * rows and "25 in all" in \
        report["transfer_set"]["teachers"]
    assert "(row, view) pairs computed" in (out / "report.md").read_text()
    check = report["diagnostics"]["view_check"]
    assert 0 < check["view_accuracy"] <= 1 and 0 < check["plain_accuracy"] <= 1
    assert (check["warning"] is not None) == (check["plain_accuracy"] - check["view_accuracy"] > 0.02)
    assert np.isfinite(report["student"]["training"]["history"][-1]["train_loss"])
