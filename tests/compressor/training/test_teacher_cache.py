"""compressor/teacher_cache.py: one entry on disk (round trip, dtypes, damage refused, atomic store, modes), then the
cache inside real ``compress`` runs on the digits ensemble: a miss stores, a hit reads, ``--no-cache`` writes nothing,
another teacher file misses, a damaged entry stops the run, ``--refresh-teacher-cache`` rebuilds, ``--resume`` works.

No mocks: the CLI tests run ``compressor.cli.main`` on the real teacher file of ``digits_ensemble``, each in its own
``--teacher-cache`` folder (a copy of the first run's when the test changes it), so no test sees another's entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor import save_ensemble
from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.training.cached_logits import CachedLogits
from compressor.training.teacher_cache import (ENTRY_FILE, StreamedLogits, TeacherCache, cache_key,
                                              check_cache_root, key_digest)
from compressor.core.fileio import default_cache_root
from compressor.teachers.formats import load_ensemble
from tests.conftest import digits_members

FP16_RELATIVE = 2.0 ** -11  # float16 keeps 11 significant bits: round-to-nearest moves a value by at most this share
# The digits runs: few epochs, a small student, the export benchmark reduced to a token, so each run takes seconds.
QUICK = ["--epochs", "3", "--batch-size", "32", "--student", "mlp:32x32", "--warmup", "0.02", "--duration", "0.05",
         "--rounds", "1", "--batch-sizes", "1", "--no-progress"]


def member_logits(k: int = 3, n: int = 50, c: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random (K, N, C) float32 logits per split, spread like a trained net's (a few units to tens)."""
    generator = torch.Generator().manual_seed(seed)
    splits = ("train", "val", "test")
    return {split: 8 * torch.randn(k, n + i, c, generator=generator) for i, split in enumerate(splits)}


def a_key(teacher: str = "t" * 64, data: str = "d" * 64, preprocessing: dict | None = None) -> dict:
    return cache_key(teacher, data, preprocessing or {"preprocessing": "pixel / 16", "normalisation": None})


def stored(root: Path) -> tuple[TeacherCache, dict[str, torch.Tensor]]:
    """An entry written by store() under ``root``, and the logits it was written from."""
    cache, logits = TeacherCache(root, a_key()), member_logits()
    cache.store(logits)
    return cache, logits


# ----------------------------------------------------------------------------------------------------------------
# One entry on disk


@pytest.mark.parametrize("scale", [8.0, 300.0], ids=["fits-float16", "beyond-float16"])
def test_logits_streamed_batch_by_batch_are_stored_as_whole_ones_are(tmp_path, scale):
    logits = {split: values * scale / 8 for split, values in member_logits().items()}
    whole = TeacherCache(tmp_path / "whole", a_key()).store(logits)
    batches = [(start, logits["train"][:, start:start + 7]) for start in range(0, logits["train"].shape[1], 7)]
    streamed = TeacherCache(tmp_path / "streamed", a_key()).store(
        {**logits, "train": StreamedLogits(logits["train"].shape[1], iter(batches))})
    for split in ("train", "val", "test"):
        assert streamed[split].array.dtype == whole[split].array.dtype
        assert np.array_equal(np.asarray(streamed[split].array), np.asarray(whole[split].array))
    assert streamed["train"].array.dtype == (np.float16 if scale < 128 else np.float32)
    assert not list((tmp_path / "streamed").rglob("*.float32.npy"))  # the float32 scratch file is gone
    assert TeacherCache(tmp_path / "streamed", a_key()).load() is not None  # checksums recorded as for any entry


def test_round_trip_keeps_train_in_float16_and_the_held_out_splits_exact(tmp_path):
    cache, logits = stored(tmp_path)
    loaded = TeacherCache(tmp_path, a_key()).load()  # a new object, as a later run would make
    assert loaded is not None and set(loaded) == {"train", "val", "test"}
    assert np.load(cache.path / "train.npy", mmap_mode="r").dtype == np.float16
    train = loaded["train"].to_tensor()  # (K, N, C)
    assert train.dtype == torch.float32 and train.shape == logits["train"].shape
    # float16 rounding and nothing more: the nearest float16 to each logit, within half a unit in the last place
    assert torch.equal(train, logits["train"].half().float())
    assert torch.all((train - logits["train"]).abs() <= logits["train"].abs() * FP16_RELATIVE)
    assert not torch.equal(train, logits["train"])  # it really is float16 on disk, not float32
    for split in ("val", "test"):
        assert np.load(cache.path / f"{split}.npy", mmap_mode="r").dtype == np.float32
        assert torch.equal(loaded[split].to_tensor(), logits[split])
    record = json.loads((cache.path / ENTRY_FILE).read_text())
    assert record["key"] == a_key() and record["arrays"]["val"]["shape"] == [3, 51, 10]


@pytest.mark.parametrize("big", [128.0, 70_000.0])
def test_a_train_logit_where_float16_gets_coarse_is_stored_in_float32(tmp_path, big):
    """From 128 up float16's steps are 0.125 or more (and above 65,504 it overflows to inf): such logits stay exact."""
    logits = member_logits()
    logits["train"][1, 7, 3] = big
    cache = TeacherCache(tmp_path, a_key())
    loaded = cache.store(logits)
    assert np.load(cache.path / "train.npy", mmap_mode="r").dtype == np.float32
    assert torch.equal(loaded["train"].to_tensor(), logits["train"])
    # the same logits with every value below the threshold are stored in float16
    logits["train"][1, 7, 3] = 127.0
    other = TeacherCache(tmp_path, a_key(teacher="u" * 64))
    other.store(logits)
    assert np.load(other.path / "train.npy", mmap_mode="r").dtype == np.float16


def test_cached_logits_take_rows_of_their_view():
    array = np.arange(2 * 10 * 3, dtype=np.float16).reshape(2, 10, 3)  # (K, N, C): every value tells its row
    whole = CachedLogits(array)
    assert whole.shape == (2, 10, 3)
    got = whole.take(torch.tensor([4, 0, 4]))  # (K, 3, C), repeated and unsorted rows
    assert got.dtype == torch.float32 and torch.equal(got, torch.from_numpy(array[:, [4, 0, 4]].astype(np.float32)))
    view = whole.subset(np.array([9, 2, 5, 7]))
    assert view.shape == (2, 4, 3)
    assert torch.equal(view.take(torch.tensor([1, 3])), torch.from_numpy(array[:, [2, 7]].astype(np.float32)))
    inner = view.subset(np.array([3, 0]))  # rows 3 and 0 of the view: 7 and 9 of the array
    assert inner.shape == (2, 2, 3)
    assert torch.equal(inner.to_tensor(), torch.from_numpy(array[:, [7, 9]].astype(np.float32)))
    assert torch.equal(view.to_tensor(), torch.from_numpy(array[:, [9, 2, 5, 7]].astype(np.float32)))
    assert inner.array is array  # a view, not a copy: a memory-mapped transfer set stays on disk


def test_the_key_separates_teachers_data_and_preprocessing(tmp_path):
    base = TeacherCache(tmp_path, a_key()).path
    others = [a_key(teacher="T" * 64), a_key(data="D" * 64),
              a_key(preprocessing={"preprocessing": "pixel / 16", "normalisation": {"mean": [0.5], "std": [0.5]}})]
    paths = {TeacherCache(tmp_path, key).path for key in others}
    assert base not in paths and len(paths) == 3
    assert all(path.parent == tmp_path and len(path.name) == 64 for path in paths | {base})
    # the same key, however its dict was built, names the same folder
    reordered = a_key(preprocessing={"normalisation": None, "preprocessing": "pixel / 16"})
    assert TeacherCache(tmp_path, reordered).path == base
    assert base.name == key_digest(a_key()) == hashlib.sha256(json.dumps(a_key(), sort_keys=True).encode()).hexdigest()


def test_default_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_root() == tmp_path / "mine"
    monkeypatch.delenv("COMPRESSOR_CACHE_DIR")
    assert default_cache_root() == tmp_path / "xdg" / "compressor" / "teacher-logits"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_root() == tmp_path / "home" / ".cache" / "compressor" / "teacher-logits"
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", "~/elsewhere")
    assert default_cache_root() == tmp_path / "home" / "elsewhere"


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the last logit's low byte: the file keeps its size and its header
    path.write_bytes(bytes(data))


def _edit_key(path: Path) -> None:
    record = json.loads(path.read_text())
    record["key"]["data_sha256"] = "0" * 64
    path.write_text(json.dumps(record))


def _edit_shape(path: Path) -> None:
    record = json.loads(path.read_text())
    record["arrays"]["test"]["shape"] = [3, 52, 5]
    path.write_text(json.dumps(record))


def _drop(path: Path, field: str | None) -> None:
    """Remove ``field`` from the train array's record, or (None) turn the arrays record into a list."""
    record = json.loads(path.read_text())
    if field is None:
        record["arrays"] = list(record["arrays"].values())
    else:
        del record["arrays"]["train"][field]
    path.write_text(json.dumps(record))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


DAMAGE = {
    "npy bytes altered": ("train.npy", _flip_last_byte, "does not match the checksum"),
    "entry.json key edited": (ENTRY_FILE, _edit_key, "other teachers, data or preprocessing"),
    "entry.json shape edited": (ENTRY_FILE, _edit_shape, "has shape [3, 52, 10] float32, recorded [3, 52, 5]"),
    "entry.json not JSON": (ENTRY_FILE, lambda path: path.write_text('{"key": '), "unreadable"),
    "val.npy missing": ("val.npy", Path.unlink, "val.npy is missing"),
    "entry.json a list": (ENTRY_FILE, lambda path: path.write_text("[]"), "other teachers, data or preprocessing"),
    "entry.json without a checksum": (ENTRY_FILE, lambda path: _drop(path, "sha256"), "no complete record of"),
    "entry.json arrays a list": (ENTRY_FILE, lambda path: _drop(path, None), "no complete record of train.npy"),
    "test.npy truncated": ("test.npy", _truncate, "test.npy does not match the checksum"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_entry_is_refused_naming_the_folder_and_the_fix(tmp_path, damage):
    cache, _ = stored(tmp_path)
    name, spoil, why = DAMAGE[damage]
    spoil(cache.path / name)
    with pytest.raises(CompressorError) as raised:
        TeacherCache(tmp_path, a_key()).load()
    message = str(raised.value)
    assert str(cache.path) in message and "--refresh-teacher-cache" in message and why in message
    assert "\n" not in message


def test_a_cache_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(CompressorError, match="cannot create the teacher cache in .*a-file.*--teacher-cache"):
        TeacherCache(tmp_path / "a-file", a_key()).store(member_logits())


def test_a_cache_folder_that_is_a_file_or_lies_under_one_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(CompressorError, match=r"^--teacher-cache \S*a-file is a file, not a folder; choose another "
                                              r"--teacher-cache or pass --no-cache$"):
        check_cache_root(tmp_path / "a-file", no_cache=False)
    with pytest.raises(CompressorError, match=r"^--teacher-cache \S*a-file/cache/deeper: \S*a-file is a file, not a "
                                              r"folder; choose another --teacher-cache$"):
        check_cache_root(tmp_path / "a-file" / "cache" / "deeper", no_cache=True)  # images still decode there
    check_cache_root(tmp_path / "new" / "cache", no_cache=False)  # a folder still to be made is fine...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # ...and the check creates nothing


def test_the_default_cache_folder_is_checked_unless_no_cache_leaves_it_unused(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("COMPRESSOR_CACHE_DIR", str(tmp_path / "a-file"))
    with pytest.raises(CompressorError, match=r"^the cache folder \S*a-file is a file, not a folder; pass "
                                              r"--teacher-cache with a writable folder or pass --no-cache$"):
        check_cache_root(None, no_cache=False)
    check_cache_root(None, no_cache=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_is_refused_before_any_work(tmp_path):
    root = tmp_path / "readonly"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(CompressorError, match=r"\S*readonly cannot be written in \(Permission denied\); "
                                                  r"choose another --teacher-cache or pass --no-cache"):
            check_cache_root(root / "cache", no_cache=False)
    finally:
        root.chmod(0o700)


def test_an_entry_copied_under_another_key_is_refused(tmp_path):
    cache, _ = stored(tmp_path)
    other = TeacherCache(tmp_path, a_key(teacher="T" * 64))
    shutil.copytree(cache.path, other.path)  # e.g. a folder renamed by hand, or synced from another machine
    with pytest.raises(CompressorError, match="written for other teachers"):
        other.load()


def test_store_leaves_no_scratch_folder_and_replaces_a_damaged_entry(tmp_path):
    cache, _ = stored(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.digest]
    assert sorted(p.name for p in cache.path.iterdir()) == sorted([ENTRY_FILE, "train.npy", "val.npy", "test.npy"])
    _truncate(cache.path / "train.npy")
    (cache.path / "stray.txt").write_text("left by hand")
    fresh = member_logits(seed=1)
    loaded = cache.store(fresh, replace=True)  # what --refresh-teacher-cache does
    assert torch.equal(loaded["test"].to_tensor(), fresh["test"])
    assert torch.equal(TeacherCache(tmp_path, a_key()).load()["train"].to_tensor(), fresh["train"].half().float())
    assert sorted(p.name for p in tmp_path.iterdir()) == [cache.digest]
    assert not (cache.path / "stray.txt").exists()  # the old folder was replaced whole, not written over


def test_two_runs_storing_one_key_at_once_both_end_with_the_first_entry(tmp_path):
    """Runs that share a cache (a sweep launched in parallel) may both miss and both compute: the second store
    finds the first's entry in place, keeps it whole and returns it, rather than deleting it under the first."""
    first, second = TeacherCache(tmp_path, a_key()), TeacherCache(tmp_path, a_key())
    logits = member_logits()
    first.store(logits)
    before = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    shifted = {split: values + 1.0 for split, values in logits.items()}  # a tell-tale, not what a real run computes
    loaded = second.store(shifted)
    assert torch.equal(loaded["val"].to_tensor(), logits["val"])
    assert {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.digest]  # no scratch folder left


def test_a_store_that_fails_midway_leaves_nothing(tmp_path):
    logits = member_logits()
    del logits["test"]  # the train and val arrays are written before this is noticed
    with pytest.raises(KeyError):
        TeacherCache(tmp_path, a_key()).store(logits)
    assert list(tmp_path.iterdir()) == []
    assert TeacherCache(tmp_path, a_key()).load() is None


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_an_entry_gets_the_umask_mode_not_mkdtemp_0700(tmp_path, umask):
    previous = os.umask(umask)
    try:
        cache, _ = stored(tmp_path / "root")
    finally:
        os.umask(previous)
    assert cache.path.stat().st_mode & 0o777 == 0o777 & ~umask  # 0755 or 0750: others (or the group) can read it
    for file in cache.path.iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name


# ----------------------------------------------------------------------------------------------------------------
# The cache in real `compress` runs on the digits ensemble


def compress(teacher: Path, out: Path, *extra: str) -> dict | None:
    """Run the CLI; the report when it succeeds, None when it exits non-zero."""
    code = main(["--teacher", str(teacher), "--out", str(out), *QUICK, *extra])
    return json.loads((out / "report.json").read_text()) if code == 0 else None


def mtimes(folder: Path) -> dict[str, int]:
    return {file.name: file.stat().st_mtime_ns for file in folder.iterdir()}


def held_out(data) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(data.val.x), torch.from_numpy(data.test.x)


@dataclass
class FirstRun:
    cache: Path   # the --teacher-cache folder
    entry: Path   # the one entry the run stored
    out: Path
    report: dict
    mtimes: dict[str, int]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, digits_ensemble) -> FirstRun:
    """The first run in a fresh cache folder: the teachers run once and their logits are stored."""
    root = tmp_path_factory.mktemp("first-run")
    report = compress(digits_ensemble, root / "out", "--teacher-cache", str(root / "cache"))
    assert report is not None
    entry = Path(report["teacher_cache"]["path"])
    return FirstRun(root / "cache", entry, root / "out", report, mtimes(entry))


def copy_cache(first: FirstRun, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the first run's cache folder (mtimes kept), for a test that changes it: (folder, entry)."""
    shutil.copytree(first.cache, tmp_path / "cache")
    return tmp_path / "cache", tmp_path / "cache" / first.entry.name


@pytest.mark.slow
def test_the_first_run_misses_and_stores_one_entry_of_the_teachers_logits(first_run, digits_ensemble, digits_data):
    section = first_run.report["teacher_cache"]
    assert section["enabled"] is True and section["hit"] is False
    assert [p.name for p in first_run.cache.iterdir()] == [first_run.entry.name]  # one entry, no scratch folder
    assert first_run.entry == first_run.cache / key_digest(section["key"])
    assert section["key"]["teacher_sha256"] == hashlib.sha256(digits_ensemble.read_bytes()).hexdigest()
    assert section["key"]["data_sha256"] == digits_data.fingerprint()
    # the entry holds what the teachers output on each split
    entry = TeacherCache(first_run.cache, section["key"]).load()
    ensemble = load_ensemble(digits_ensemble)
    x_val, x_test = held_out(digits_data)
    torch.testing.assert_close(entry["val"].to_tensor(), ensemble.member_logits(x_val), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(entry["test"].to_tensor(), ensemble.member_logits(x_test), rtol=1e-6, atol=1e-6)
    train = ensemble.member_logits(torch.from_numpy(digits_data.train.x))
    assert entry["train"].shape == tuple(train.shape) == (2, len(digits_data.train), 10)
    assert torch.all((entry["train"].to_tensor() - train).abs() <= train.abs() * FP16_RELATIVE + 1e-6)


@pytest.mark.slow
def test_a_second_run_with_other_settings_reads_the_entry_instead_of_running_the_teachers(first_run, digits_ensemble,
                                                                                         digits_data, tmp_path):
    cache, entry = copy_cache(first_run, tmp_path)
    # Rewrite the entry's validation logits (and its record, so the entry stays consistent): a run that reads the
    # entry reports the ensemble's validation accuracy of these logits; one that ran the teachers could not.
    val = -np.load(entry / "val.npy")  # (K, N_val, C): every member's favourite class becomes its least favourite
    np.save(entry / "val.npy", val)
    record = json.loads((entry / ENTRY_FILE).read_text())
    record["arrays"]["val"]["sha256"] = hashlib.sha256((entry / "val.npy").read_bytes()).hexdigest()
    (entry / ENTRY_FILE).write_text(json.dumps(record))
    before = mtimes(entry)

    report = compress(digits_ensemble, tmp_path / "other", "--teacher-cache", str(cache), "--temperature", "2",
                      "--alpha", "0.5", "--student", "mlp:16")
    stored = {k: v for k, v in first_run.report["teacher_cache"].items() if k != "computed_by_ranks"}
    assert report["teacher_cache"] == {**stored, "path": str(entry), "hit": True}
    assert mtimes(entry) == before and [p.name for p in cache.iterdir()] == [entry.name]  # read, not rewritten
    expected = load_ensemble(digits_ensemble).log_probs(torch.from_numpy(val).double()).argmax(1)  # (N_val,)
    accuracy = float((expected.numpy() == digits_data.val.y).mean())
    assert report["diagnostics"]["mixture"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert accuracy < 0.1 and first_run.report["diagnostics"]["mixture"]["accuracy"] > 0.9
    # the test split was not touched: the ensemble's test rows are the first run's
    assert report["rows"][0]["accuracy"] == first_run.report["rows"][0]["accuracy"]
    assert report["student"]["spec"] == "mlp:16" and report["config"]["temperature"] == 2.0


@pytest.mark.slow
def test_no_cache_writes_nothing_and_trains_like_the_cached_run(first_run, digits_ensemble, tmp_path):
    report = compress(digits_ensemble, tmp_path / "out", "--no-cache", "--teacher-cache", str(tmp_path / "unused"))
    assert report["teacher_cache"] == {"enabled": False}
    assert not (tmp_path / "unused").exists() and mtimes(first_run.entry) == first_run.mtimes
    # The held-out splits are float32 in the cache, so everything scored on them is identical; the transfer-set
    # diagnostics read the float16 transfer logits from the cache, so their entropy agrees to float16 rounding.
    ours, theirs = dict(report["diagnostics"]), dict(first_run.report["diagnostics"])
    transfer, cached_transfer = ours.pop("transfer"), theirs.pop("transfer")
    assert ours == theirs
    assert transfer["accuracy"] == cached_transfer["accuracy"]
    assert transfer["entropy"] == pytest.approx(cached_transfer["entropy"], rel=1e-3)
    assert report["rows"][0]["accuracy"] == first_run.report["rows"][0]["accuracy"]
    # Training is not identical: the cache keeps the transfer set's logits in float16, which moves each soft
    # target's logit by at most 2^-11 of itself. On these runs that changes the mean training loss by ~1e-5
    # relative, so 1e-3 leaves a wide margin and still fails for any other teacher signal; equal losses would mean
    # this run read the cache.
    cached, online = (r["student"]["training"]["history"] for r in (first_run.report, report))
    assert [e["epoch"] for e in online] == [e["epoch"] for e in cached] == [1, 2, 3]
    assert online[0]["train_loss"] != cached[0]["train_loss"]
    for a, b in zip(cached, online):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert abs(b["val_accuracy"] - a["val_accuracy"]) <= 2 / 144 + 1e-12  # at most 2 of 144 validation images
    student, reference = report["rows"][-1]["accuracy"], first_run.report["rows"][-1]["accuracy"]
    assert abs(student["top1"] - reference["top1"]) <= 4 / 359 + 1e-12  # at most 4 of 359 test images


def changed_teacher(original: Path, path: Path, digits_data) -> Path:
    """A copy of ``original`` with one weight of its first member changed, saved the way a user saves teachers."""
    weights = torch.jit.load(str(original)).state_dict()  # "members.<k>.<layer>.weight", ...
    members = digits_members()
    for k, member in enumerate(members):
        prefix = f"members.{k}."
        member.load_state_dict({name[len(prefix):]: value for name, value in weights.items()
                                if name.startswith(prefix)})
    with torch.no_grad():
        members[0][3].bias[0] += 0.5  # the MLP member's class-0 logit, on every input
    example = torch.from_numpy(digits_data.train.x[:2])
    return save_ensemble(members, path, example, {"class_names": digits_data.class_names, "dataset": "digits",
                                                   "member_names": ["mlp", "cnn"]})


@pytest.mark.slow
def test_a_changed_teacher_file_misses_and_never_sees_the_old_logits(first_run, digits_ensemble, digits_data,
                                                                     tmp_path):
    cache, old_entry = copy_cache(first_run, tmp_path)
    teacher = changed_teacher(digits_ensemble, tmp_path / "changed.pt", digits_data)
    report = compress(teacher, tmp_path / "out", "--teacher-cache", str(cache))
    section = report["teacher_cache"]
    assert section["hit"] is False
    assert section["key"]["teacher_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert section["key"]["data_sha256"] == first_run.report["teacher_cache"]["key"]["data_sha256"]
    new_entry = Path(section["path"])
    assert new_entry != old_entry
    assert sorted(p.name for p in cache.iterdir()) == sorted([old_entry.name, new_entry.name])
    assert mtimes(old_entry) == first_run.mtimes
    # the new entry holds the changed teachers' logits: member 0's class 0 moved by 0.5, nothing else did
    old_val, new_val = (np.load(entry / "val.npy") for entry in (old_entry, new_entry))
    x_val, _ = held_out(digits_data)
    torch.testing.assert_close(torch.from_numpy(new_val), load_ensemble(teacher).member_logits(x_val),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_val[0, :, 0], old_val[0, :, 0] + 0.5, rtol=0, atol=1e-5)
    assert np.array_equal(new_val[0, :, 1:], old_val[0, :, 1:]) and np.array_equal(new_val[1], old_val[1])


@pytest.mark.slow
def test_a_damaged_entry_stops_compress_before_out_and_refresh_rebuilds_it(first_run, digits_ensemble, tmp_path,
                                                                           capsys):
    cache, entry = copy_cache(first_run, tmp_path)
    _truncate(entry / "train.npy")
    out = tmp_path / "out"
    capsys.readouterr()
    assert compress(digits_ensemble, out, "--teacher-cache", str(cache)) is None
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert str(entry) in errors[0] and "train.npy" in errors[0] and "--refresh-teacher-cache" in errors[0]
    assert not out.exists()  # refused before --out was created

    report = compress(digits_ensemble, out, "--teacher-cache", str(cache), "--refresh-teacher-cache")
    assert report["teacher_cache"]["hit"] is False and report["teacher_cache"]["path"] == str(entry)
    assert [p.name for p in cache.iterdir()] == [entry.name]
    rebuilt = TeacherCache(cache, report["teacher_cache"]["key"]).load()  # whole again
    for split in ("train", "val", "test"):
        assert np.array_equal(np.asarray(rebuilt[split].array), np.load(first_run.entry / f"{split}.npy"))


@pytest.mark.slow
def test_an_entry_with_flipped_bytes_stops_the_rerun_before_out(first_run, digits_ensemble, tmp_path, capsys):
    """The same size and header, one logit's bytes changed: only the checksum can tell, and the rerun refuses it."""
    cache, entry = copy_cache(first_run, tmp_path)
    _flip_last_byte(entry / "val.npy")
    out = tmp_path / "out"
    capsys.readouterr()
    assert compress(digits_ensemble, out, "--teacher-cache", str(cache)) is None
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "internal error" not in err, err
    assert str(entry) in errors[0] and "val.npy does not match the checksum" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("place", ["a file", "under a file"])
def test_compress_with_a_teacher_cache_that_is_a_file_stops_in_one_line_before_out(digits_ensemble, tmp_path, capsys,
                                                                                   place):
    (tmp_path / "a-file").write_text("not a folder")
    folder = tmp_path / "a-file" if place == "a file" else tmp_path / "a-file" / "cache"
    out = tmp_path / "out"
    capsys.readouterr()
    assert compress(digits_ensemble, out, "--teacher-cache", str(folder)) is None
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert f"--teacher-cache {folder}" in err and "is a file, not a folder" in err and not out.exists()


@pytest.mark.slow
def test_resume_reads_the_entry_the_interrupted_run_stored(first_run, digits_ensemble, tmp_path, capsys):
    # The first run computed the logits (a miss); its resumption reads them (a hit): same fingerprint, so it resumes.
    out = tmp_path / "run"
    shutil.copytree(first_run.out, out)
    report = compress(digits_ensemble, out, "--teacher-cache", str(first_run.cache), "--resume")
    assert report["teacher_cache"]["hit"] is True and report["student"]["training"]["resumed_from_epoch"] == 3
    assert report["student"]["training"]["history"] == first_run.report["student"]["training"]["history"]
    assert report["rows"][-1]["accuracy"] == first_run.report["rows"][-1]["accuracy"]
    # Resuming with --no-cache would train on float32 logits where the checkpoint saw float16 ones: refused.
    capsys.readouterr()
    assert compress(digits_ensemble, out, "--no-cache", "--resume") is None
    assert "fingerprint.teacher_logits" in capsys.readouterr().err
