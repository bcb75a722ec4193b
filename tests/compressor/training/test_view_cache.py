"""compressor/view_cache.py and the augmentations' parameters(): the teachers' logits on each epoch's views, stored
once and reused, checked against the view on reuse, refused when damaged, and training on them reproducible.

No mocks: the teachers are two small seeded nets, the views real Shift and Mixup, every entry written to tmp_path.
"""

from __future__ import annotations

import json
import os
import re
import uuid

import numpy as np
import pytest
import torch
from torch import nn

from compressor.data.augment import Mixup, Shift
from compressor.training.loop import TrainConfig, train_student
from compressor.core.errors import CompressorError
from compressor.training.losses import DistillationLoss, HardLabelLoss
from compressor.training.cached_logits import CachedLogits
from compressor.training.view_cache import VariantLogits, ViewLogits, open_view_cache

N, K, C = 40, 2, 10
CONFIG = TrainConfig(epochs=2, batch_size=16, lr=1e-2, progress=False)


def images(n: int = N) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # (N, 1, 8, 8)


def labels(n: int = N) -> torch.Tensor:
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(1))  # (N,)


class Teachers:
    """Two seeded nets stacked to (K, B, C) member logits, counting how often they run."""

    def __init__(self, scale: float = 10.0):
        torch.manual_seed(0)
        self.members = [nn.Sequential(nn.Flatten(), nn.Linear(64, C)),
                        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, C))]
        self.scale, self.calls = scale, 0

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.scale * torch.stack([member(xb) for member in self.members])  # (K, B, C)


def view_logits(root, view, teachers=None, key=None, **kwargs) -> ViewLogits:
    return ViewLogits(teachers or Teachers(), images(), view, K, C, root, key or {"view": "test"}, batch_size=16,
                      **kwargs)


def assert_fp16_close(stored: torch.Tensor, exact: torch.Tensor) -> None:
    """float16 keeps 11 significant bits; the teachers ran in other batch sizes, which moves float32 sums a little."""
    torch.testing.assert_close(stored, exact, rtol=2.0 ** -10, atol=1e-4 * float(exact.abs().max()))


VIEWS = {"shift": Shift(2, seed=3), "mixup-then-shift": Mixup(images(), seed=4, then=Shift(1, seed=5))}


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_each_epoch_holds_the_teachers_on_that_epochs_view_of_every_row(tmp_path, name):
    view, teachers = VIEWS[name], Teachers()
    source = view_logits(tmp_path, view)
    assert source.shape == (K, N, C)
    epochs = {}
    for epoch in (1, 2):
        epochs[epoch] = source.for_epoch(epoch).to_tensor()  # (K, N, C)
        assert source.for_epoch(epoch).array.dtype == np.float16
        assert_fp16_close(epochs[epoch], teachers(view(images(), torch.arange(N), epoch)))
    assert not torch.allclose(epochs[1], epochs[2])  # a new view each epoch, so new soft targets


def test_a_second_run_reads_the_stored_epochs_without_running_the_teachers(tmp_path):
    first_teachers, rows_done = Teachers(), []
    first = view_logits(tmp_path, Shift(2, seed=3), first_teachers, on_rows=rows_done.append)
    arrays = [np.array(first.for_epoch(epoch).array) for epoch in (1, 2)]
    assert first_teachers.calls == 6 and sum(rows_done) == 2 * N  # 3 batches of ≤ 16 rows per epoch
    assert first.describe()["epochs_computed"] == [1, 2] and first.describe()["epochs_reused"] == []

    second_teachers = Teachers()
    second = view_logits(tmp_path, Shift(2, seed=3), second_teachers)
    for epoch, array in zip((1, 2), arrays):
        again = second.for_epoch(epoch).array
        assert again.dtype == array.dtype and again.tobytes() == array.tobytes()
    assert second_teachers.calls == 0
    summary = second.describe()
    assert summary["epochs_reused"] == [1, 2] and summary["epochs_computed"] == []
    assert summary["path"] == str(first.path) and summary["key"] == {"view": "test"}
    json.dumps(summary)  # JSON-safe for the report

    second.for_epoch(3)  # an epoch not stored yet is computed and added
    assert second_teachers.calls == 3 and second.describe()["epochs_computed"] == [3]
    assert sorted(p.name for p in first.path.iterdir()) == ["entry.json"] + [
        f"epoch-0000{e}{suffix}" for e in (1, 2, 3) for suffix in (".json", ".npy", ".params.npz")]


def shifted_by_hand(x: torch.Tensor, dy: np.ndarray, dx: np.ndarray, pixels: int) -> torch.Tensor:
    """Each image i moved so that output[y, x] = input[y + dy[i], x + dx[i]], zero outside."""
    padded = nn.functional.pad(x, (pixels,) * 4)  # (B, C, H + 2p, W + 2p)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, pixels + int(dy[i]) : pixels + int(dy[i]) + h,
                               pixels + int(dx[i]) : pixels + int(dx[i]) + w] for i in range(len(x))])


def test_the_recorded_parameters_are_exactly_what_the_view_applies():
    x, rows = images(), torch.arange(N)
    shift = Shift(2, seed=3)
    p = shift.parameters(rows, 2)
    assert p["dy"].dtype == np.int8 and p["dx"].dtype == np.int8 and p["dy"].shape == (N,)
    assert np.abs(p["dy"]).max() <= 2 and np.abs(p["dx"]).max() <= 2 and len(set(zip(p["dy"], p["dx"]))) > 10
    assert torch.equal(shifted_by_hand(x, p["dy"], p["dx"], 2), shift(x, rows, 2))

    mix = VIEWS["mixup-then-shift"]
    p = mix.parameters(rows, 2)
    assert set(p) == {"partner", "lam", "shift_dy", "shift_dx", "partner_shift_dy", "partner_shift_dx"}
    assert p["partner"].dtype == np.int64 and p["lam"].dtype == np.float64
    mine = shifted_by_hand(x, p["shift_dy"], p["shift_dx"], 1)
    partner = shifted_by_hand(x[torch.from_numpy(p["partner"])], p["partner_shift_dy"], p["partner_shift_dx"], 1)
    lam = torch.from_numpy(p["lam"]).float()[:, None, None, None]  # (B, 1, 1, 1)
    assert torch.equal(lam * mine + (1 - lam) * partner, mix(x, rows, 2))
    assert set(Mixup(x, seed=4).parameters(rows, 2)) == {"partner", "lam"}


def test_another_seed_under_the_same_key_is_refused(tmp_path):
    view_logits(tmp_path, Shift(2, seed=3)).for_epoch(1)
    other_seed = view_logits(tmp_path, Shift(2, seed=4))
    with pytest.raises(CompressorError, match=re.escape(str(other_seed.path)) + ".*seed changed"):
        other_seed.for_epoch(1)


def test_a_corrupted_epoch_is_refused_and_refresh_recomputes_it(tmp_path):
    source = view_logits(tmp_path, Shift(2, seed=3))
    good = np.array(source.for_epoch(1).array)  # a copy: the memory map would see the damage below
    npy = source.path / "epoch-00001.npy"
    data = bytearray(npy.read_bytes())
    data[-8:] = bytes(8)  # the last logits zeroed: the file still parses, only its checksum tells
    npy.write_bytes(bytes(data))
    with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*checksum"):
        view_logits(tmp_path, Shift(2, seed=3)).for_epoch(1)

    teachers = Teachers()
    refreshed = view_logits(tmp_path, Shift(2, seed=3), teachers, refresh=True)
    assert np.array_equal(refreshed.for_epoch(1).array, good) and teachers.calls == 3
    assert refreshed.describe()["epochs_computed"] == [1]


def test_an_entry_written_for_another_key_is_refused(tmp_path):
    source = view_logits(tmp_path, Shift(2, seed=3))
    record = json.loads((source.path / "entry.json").read_text())
    assert record["view"] == Shift(2, seed=3).describe()
    (source.path / "entry.json").write_text(json.dumps({**record, "key": {"view": "another"}}))
    with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*--refresh-teacher-cache"):
        view_logits(tmp_path, Shift(2, seed=3))


def test_logits_float16_cannot_hold_are_stored_in_float32(tmp_path):
    teachers = Teachers(scale=1000.0)
    source = view_logits(tmp_path, Shift(2, seed=3), teachers)
    stored = source.for_epoch(1)
    assert stored.array.dtype == np.float32 and float(np.abs(stored.array).max()) >= 128
    exact = teachers(Shift(2, seed=3)(images(), torch.arange(N), 1))  # (K, N, C), in one batch, not 16-row ones
    torch.testing.assert_close(stored.to_tensor(), exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


def trained(checkpoint_dir, teacher_source, view) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, C))
    train_student(student, images(), labels(), teacher_source, images(), labels(),
                  DistillationLoss(temperature=2.0, alpha=0.5), CONFIG, checkpoint_dir, view=view)
    return student.state_dict()


def test_training_on_the_cache_is_reproducible_and_matches_the_teachers_on_the_students_view(tmp_path):
    view, root = Shift(2, seed=3), tmp_path / "cache"
    first = view_logits(root, view)
    weights = trained(tmp_path / "a", first, view)
    second_teachers = Teachers()
    second = view_logits(root, view, second_teachers)
    again = trained(tmp_path / "b", second, view)
    assert second_teachers.calls == 0 and second.describe()["epochs_reused"] == [1, 2]
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert not [name for name in os.listdir(first.path) if name.endswith(".tmp")]
    assert not [name for name in os.listdir(root) if name.endswith(".tmp")]

    # online: the teachers run on each viewed batch; the cache must hold what they returned for those rows
    seen, outputs, online_teachers = [], [], Teachers()

    def recording_view(xb, rows, epoch):
        seen.append((epoch, rows.clone()))
        return view(xb, rows, epoch)

    def online(xb):
        outputs.append(online_teachers(xb))
        return outputs[-1]

    trained(tmp_path / "online", online, recording_view)
    assert len(seen) == len(outputs) == 6 and {epoch for epoch, _ in seen} == {1, 2}
    for (epoch, rows), output in zip(seen, outputs):
        assert_fp16_close(second.for_epoch(epoch).take(rows), output)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_folder_is_refused_without_leaving_partial_files(tmp_path):
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(CompressorError, match=re.escape(str(root)) + ".*--no-cache"):
            view_logits(root, Shift(2, seed=3))
    finally:
        root.chmod(0o700)

    source = view_logits(tmp_path / "cache", Shift(2, seed=3))
    source.for_epoch(1)
    source.path.chmod(0o500)  # the entry exists, but epoch 2 cannot be written into it
    try:
        with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*free disk space"):
            source.for_epoch(2)
    finally:
        source.path.chmod(0o700)
    assert sorted(p.name for p in source.path.iterdir()) == ["entry.json", "epoch-00001.json", "epoch-00001.npy",
                                                            "epoch-00001.params.npz"]


def test_a_failed_write_names_the_entry_and_leaves_no_temporary_file(tmp_path):
    """Runs as root too: a folder where epoch 2's array should go makes the rename fail like a full disk would."""
    source = view_logits(tmp_path, Shift(2, seed=3))
    (source.path / "epoch-00002.npy").mkdir()
    (source.path / "epoch-00002.npy" / "in-the-way").write_text("")
    with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*another --teacher-cache"):
        source.for_epoch(2)
    assert not [name for name in os.listdir(source.path) if name.endswith(".tmp")]
    assert not (source.path / "epoch-00002.json").exists()  # no record: the epoch is not taken as whole


def variant_logits(root, view, teachers=None, key=None, **kwargs) -> VariantLogits:
    return VariantLogits(teachers or Teachers(), images(), view, K, C, root, key or {"view": "test"}, batch_size=16,
                         **kwargs)


class CountingTeachers(Teachers):
    """Teachers that also count the rows they are run on."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __call__(self, xb: torch.Tensor) -> torch.Tensor:
        self.rows += len(xb)
        return super().__call__(xb)


def test_a_shifts_variant_is_the_view_it_names():
    x, rows, shift = images(), torch.arange(N), Shift(2, seed=3)
    for epoch in (1, 2, 3):
        variant = shift.variant(rows, epoch)  # (N,)
        assert variant.dtype == torch.int64 and 0 <= int(variant.min()) and int(variant.max()) < shift.variants == 25
        assert torch.equal(shift.apply_variant(x, variant), shift(x, rows, epoch))
    every = torch.arange(25)
    moved = Shift(2).apply_variant(x[:1].expand(25, -1, -1, -1), every)  # (25, 1, 8, 8): one image, each offset
    assert len({tuple(image.flatten().tolist()) for image in moved}) == 25


def test_pairs_are_stored_once_and_the_teachers_never_pass_over_the_data_more_than_variants_times(tmp_path):
    view, teachers = Shift(1, seed=3), CountingTeachers()  # 9 variants
    source = variant_logits(tmp_path, view, teachers)
    assert source.shape == (K, N, C)
    for epoch in range(1, 31):
        stored = source.for_epoch(epoch)
        assert isinstance(stored, CachedLogits) and stored.shape == (K, N, C)
        assert_fp16_close(stored.to_tensor(), teachers(view(images(), torch.arange(N), epoch)))
        assert source.pairs_computed <= min(epoch, 9) * N  # never more than one pass per epoch, 9 in all
    assert source.pairs_computed == teachers.rows - 30 * N  # minus the reference passes in the loop above
    summary = source.describe()
    assert summary["pairs_total"] == 9 * N and summary["pairs_stored"] == source.pairs_computed
    assert summary["epochs_computed"][0] == 1 and len(summary["epochs_computed"]) + len(summary["epochs_reused"]) == 30
    assert summary["epochs_reused"], "after 30 epochs some epoch must find every pair stored"
    json.dumps(summary)


def test_another_run_and_another_seed_reuse_the_stored_pairs(tmp_path):
    first = variant_logits(tmp_path, Shift(1, seed=3))
    arrays = [first.for_epoch(epoch).to_tensor() for epoch in (1, 2)]

    again_teachers = CountingTeachers()
    again = variant_logits(tmp_path, Shift(1, seed=3), again_teachers)
    for epoch, array in zip((1, 2), arrays):
        assert torch.equal(again.for_epoch(epoch).to_tensor(), array)
    assert again_teachers.rows == 0 and again.describe()["epochs_reused"] == [1, 2]

    other_teachers = CountingTeachers()
    other = variant_logits(tmp_path, Shift(1, seed=4), other_teachers)  # other variants per row, same logits
    stored = other.for_epoch(1).to_tensor()
    assert other_teachers.rows == other.pairs_computed < N  # only the pairs seed 3's two epochs did not draw
    assert_fp16_close(stored, Teachers()(Shift(1, seed=4)(images(), torch.arange(N), 1)))


def test_a_part_cut_short_is_ignored_and_a_damaged_one_refused(tmp_path):
    source = variant_logits(tmp_path, Shift(1, seed=3))
    good = source.for_epoch(1).to_tensor()
    (record,) = source.path.glob("part-*.json")
    record.unlink()  # as if the run died before writing the record: the part does not count
    teachers = CountingTeachers()
    assert torch.equal(variant_logits(tmp_path, Shift(1, seed=3), teachers).for_epoch(1).to_tensor(), good)
    assert teachers.rows == N

    (npy,) = [p for p in source.path.glob("part-*.npy") if not p.name.endswith(".pairs.npy")
              and (source.path / p.name.replace(".npy", ".json")).exists()]
    data = bytearray(npy.read_bytes())
    data[-8:] = bytes(8)  # the file still parses; only its checksum tells
    npy.write_bytes(bytes(data))
    with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*checksum"):
        variant_logits(tmp_path, Shift(1, seed=3))
    refreshed = variant_logits(tmp_path, Shift(1, seed=3), refresh=True)
    assert torch.equal(refreshed.for_epoch(1).to_tensor(), good) and refreshed.pairs_computed == N


def test_the_store_follows_the_view(tmp_path):
    key = {"view": "test", "view_seed": 3}
    shifted = view_logits_for(tmp_path, Shift(1, seed=3), key)
    mixed = view_logits_for(tmp_path, VIEWS["mixup-then-shift"], key)
    assert isinstance(shifted, VariantLogits) and "view_seed" not in shifted.key
    assert isinstance(mixed, ViewLogits) and mixed.key == key


def view_logits_for(root, view, key):
    return open_view_cache(Teachers(), images(), view, K, C, root, key)


def test_a_part_that_cannot_be_written_names_the_entry_and_is_not_taken_as_whole(tmp_path, monkeypatch):
    """Runs as root too: a folder where the part's pairs should go makes the rename fail like a full disk would."""
    source = variant_logits(tmp_path, Shift(1, seed=3))
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))  # the part's name, known in advance
    stem = f"part-{uuid.UUID(int=7).hex[:16]}"
    (source.path / f"{stem}.pairs.npy").mkdir()
    (source.path / f"{stem}.pairs.npy" / "in-the-way").write_text("")
    with pytest.raises(CompressorError, match=re.escape(str(source.path)) + ".*another --teacher-cache"):
        source.for_epoch(1)
    assert not [name for name in os.listdir(source.path) if name.endswith(".tmp")]
    assert not (source.path / f"{stem}.json").exists()  # no record: the logits written before it do not count
    monkeypatch.undo()
    teachers = CountingTeachers()
    again = variant_logits(tmp_path, Shift(1, seed=3), teachers)
    assert_fp16_close(again.for_epoch(1).to_tensor(), Teachers()(Shift(1, seed=3)(images(), torch.arange(N), 1)))
    assert teachers.rows == N


def test_each_store_says_how_many_teacher_passes_later_epochs_still_need_and_what_one_costs(tmp_path):
    per_epoch = view_logits(tmp_path / "epochs", Shift(1, seed=3))
    assert per_epoch.missing_passes(1, 3) == 3.0
    per_epoch.for_epoch(2)
    assert per_epoch.missing_passes(1, 3) == 2.0 and per_epoch.missing_passes(2, 2) == 0.0

    pairs = variant_logits(tmp_path / "pairs", Shift(1, seed=3))
    assert pairs.missing_passes(1, 1) == 1.0  # one pair per row, none stored
    pairs.for_epoch(1)
    assert pairs.missing_passes(1, 1) == 0.0 and 0.0 < pairs.missing_passes(2, 2) < 1.0  # some rows drew epoch 1's
    drawn = {(int(v), row) for e in (2, 3) for row, v in enumerate(Shift(1, seed=3).variant(torch.arange(N), e))}
    stored = {(v, row) for v in range(9) for row in range(N) if pairs.part_of[v, row] >= 0}
    assert pairs.missing_passes(2, 3) == pytest.approx(len(drawn - stored) / N)  # a pair both epochs need: once

    for source in (per_epoch, pairs):  # measured on the views the teachers ran on
        assert source.pass_seconds() > 0.0
    fresh_teachers = CountingTeachers()
    fresh = view_logits(tmp_path / "fresh", Shift(1, seed=3), fresh_teachers)
    assert fresh.pass_seconds() > 0.0 and fresh_teachers.rows == 16  # nothing run yet: one batch timed


def test_the_training_history_says_how_long_each_epoch_waited_for_the_teachers_views(tmp_path):
    view, root = Shift(1, seed=3), tmp_path / "cache"
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, C))
    result = train_student(model, images(), labels(), view_logits(root, view), images(), labels(),
                           DistillationLoss(temperature=2.0, alpha=0.5), CONFIG, tmp_path / "a", view=view)
    assert all(0.0 < epoch["view_seconds"] <= epoch["seconds"] for epoch in result.history)
    plain = train_student(model, images(), labels(), None, images(), labels(), HardLabelLoss(), CONFIG, tmp_path / "b")
    assert all(0.0 <= epoch["view_seconds"] <= epoch["seconds"] for epoch in plain.history)  # recorded there too
