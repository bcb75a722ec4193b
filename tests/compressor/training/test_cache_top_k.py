"""--cache-top-k: the transfer set's member logits kept as top-k values, indices and the tail's log-sum-exp, the
dense rows the loss reads rebuilt from them, and real `compress` runs that store and reuse such an entry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compressor.cli import main
from compressor.core.errors import CompressorError
from compressor.training.cached_logits import TopKLogits, densify, reduce_top_k, tail_mass
from compressor.training.teacher_cache import StreamedLogits, TeacherCache, cache_key

QUICK = ["--epochs", "2", "--batch-size", "32", "--student", "mlp:32x32", "--warmup", "0.02", "--duration", "0.05",
         "--rounds", "1", "--batch-sizes", "1", "--no-progress"]


def peaked_logits(k: int = 3, n: int = 40, c: int = 50, seed: int = 0) -> torch.Tensor:
    """(K, N, C) logits of a confident classifier: a few large classes per row above a spread-out tail."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, n, c, generator=generator, dtype=torch.float64)
    top = torch.randint(0, c, (k, n, 2), generator=generator)
    return logits.scatter_add(-1, top, torch.full((k, n, 2), 6.0, dtype=torch.float64))


def a_key(top_k: int | None) -> dict:
    return cache_key("t" * 64, "d" * 64, {"preprocessing": "none", "normalisation": None}, top_k=top_k)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_the_rebuilt_rows_keep_the_top_k_probabilities_and_the_tail_mass_exactly_at_t1(k):
    logits = peaked_logits()
    values, indices, tail = reduce_top_k(logits, k)
    assert values.shape == indices.shape == (3, 40, k) and tail.shape == (3, 40)
    dense = densify(values, indices, tail, 50).double()  # (K, N, C)
    p, q = torch.softmax(logits, -1), torch.softmax(dense, -1)
    top = torch.topk(logits, k, -1).indices
    torch.testing.assert_close(q.gather(-1, top), p.gather(-1, top), rtol=1e-5, atol=1e-7)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top, True)
    torch.testing.assert_close((q * ~kept).sum(-1), (p * ~kept).sum(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tail_mass(values, tail).double(), (p * ~kept).sum(-1), rtol=1e-5, atol=1e-7)


def test_at_higher_temperatures_the_rebuilt_mixture_stays_close_and_closer_with_more_k():
    logits = peaked_logits()
    errors = []
    for k in (2, 10, 30):
        dense = densify(*reduce_top_k(logits, k), 50).double()
        p, q = torch.log_softmax(logits / 4, -1), torch.log_softmax(dense / 4, -1)
        errors.append(float((p.exp() * (p - q)).sum(-1).mean()))  # KL(true ‖ rebuilt) at T = 4
    assert errors[0] > errors[1] > errors[2] >= 0
    assert errors[2] < 0.01


def test_a_top_k_entry_streams_to_disk_reads_back_and_is_keyed_apart_from_the_dense_one(tmp_path):
    train = peaked_logits().float()
    val, test = peaked_logits(n=12, seed=1).float(), peaked_logits(n=9, seed=2).float()
    batches = [(start, train[:, start:start + 7]) for start in range(0, 40, 7)]
    cache = TeacherCache(tmp_path, a_key(5))
    assert cache.path != TeacherCache(tmp_path, a_key(None)).path != TeacherCache(tmp_path, a_key(6)).path
    stored = cache.store({"train": StreamedLogits(40, iter(batches)), "val": val, "test": test})
    assert sorted(p.name for p in cache.path.iterdir()) == ["entry.json", "test.npy", "train.indices.npy",
                                                            "train.tail.npy", "train.values.npy", "val.npy"]
    assert np.load(cache.path / "train.indices.npy").dtype == np.int16
    record = json.loads((cache.path / "entry.json").read_text())["top_k"]
    assert record["k"] == 5 and 0 < record["tail_mass_mean"] <= record["tail_mass_max"] < 1
    loaded = TeacherCache(tmp_path, a_key(5)).load()
    for entries in (stored, loaded):
        assert isinstance(entries["train"], TopKLogits) and entries["train"].shape == (3, 40, 50)
        rows = torch.tensor([3, 0, 39])
        expected = densify(*reduce_top_k(train[:, rows], 5), 50)
        torch.testing.assert_close(entries["train"].take(rows), expected)
        torch.testing.assert_close(entries["train"].subset(np.array([39, 3])).take(torch.tensor([1])),
                                   expected[:, :1])
        assert entries["train"].first_member().take(rows).shape == (1, 3, 50)
        torch.testing.assert_close(entries["val"].to_tensor(), val)  # held-out splits stay dense and exact
    assert cache.describe(hit=False)["top_k"] == record


def test_a_damaged_top_k_file_is_refused_naming_it(tmp_path):
    cache = TeacherCache(tmp_path, a_key(4))
    cache.store({"train": peaked_logits().float(), "val": peaked_logits(seed=1).float(),
                 "test": peaked_logits(seed=2).float()})
    indices = np.load(cache.path / "train.indices.npy")
    np.save(cache.path / "train.indices.npy", indices[:, ::-1].copy())
    with pytest.raises(CompressorError, match=r"train\.indices\.npy does not match the checksum"):
        TeacherCache(tmp_path, a_key(4)).load()


def test_the_loss_is_finite_on_rebuilt_rows_with_an_empty_tail_region():
    logits = peaked_logits()
    dense = densify(*reduce_top_k(logits, 49), 50)
    assert torch.isfinite(dense).all() and not math.isinf(float(dense.min()))


# ----------------------------------------------------------------------------------------------------------------
# Real `compress` runs on the digits ensemble (10 classes)


@pytest.mark.slow
def test_compress_with_cache_top_k_stores_it_trains_from_it_and_reports_the_tail(digits_ensemble, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--teacher-cache", str(cache),
                 "--cache-top-k", "3", *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    section = report["teacher_cache"]
    assert section["key"]["top_k"] == 3 and section["top_k"]["k"] == 3
    assert 0 <= section["top_k"]["tail_mass_mean"] <= section["top_k"]["tail_mass_max"] <= 1
    assert report["config"]["cache_top_k"] == 3 and "--cache-top-k 3" in report["command"]
    assert report["student"]["training"]["best_val_accuracy"] > 0.5  # it learned from the rebuilt rows
    again = tmp_path / "again"
    assert main(["--teacher", str(digits_ensemble), "--out", str(again), "--teacher-cache", str(cache),
                 "--cache-top-k", "3", *QUICK]) == 0
    assert json.loads((again / "report.json").read_text())["teacher_cache"]["hit"] is True


@pytest.mark.parametrize("extra, message", [
    (["--cache-top-k", "10"], "keeps every one of the ensemble's 10 classes"),
    (["--cache-top-k", "3", "--no-cache"], "--no-cache and --cache-top-k contradict"),
])
def test_a_top_k_that_cannot_apply_stops_before_the_teachers_run(digits_ensemble, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["--teacher", str(digits_ensemble), "--out", str(out), "--teacher-cache", str(tmp_path / "c"),
                 *QUICK, *extra])
    err = capsys.readouterr().err
    assert code != 0 and message in err and "teachers (" not in err
    assert not out.exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_bf16_teachers_are_cached_under_their_own_key(digits_ensemble, tmp_path):
    cache = tmp_path / "cache"
    keys = []
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--teacher-cache", str(cache),
                     "--teacher-precision", precision, *QUICK]) == 0
        keys.append(json.loads((out / "report.json").read_text())["teacher_cache"]["key"])
    assert "teacher_precision" not in keys[0]["preprocessing"]  # fp32 keys are those of earlier releases
    assert keys[1]["preprocessing"]["teacher_precision"] == "bf16"
    assert len(list(cache.iterdir())) == 2
