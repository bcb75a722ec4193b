"""DDP through torchrun on the CPU (gloo, 2 processes): the same training as one process, one writer, one cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.training.loop import _shard
from compressor.training.teacher_shards import shard_bounds

RUN = ["--data", "digits", "--student", "mlp:32x32", "--epochs", "3", "--batch-size", "64", "--seed", "3",
       "--warmup", "0.02", "--duration", "0.05", "--rounds", "1", "--batch-sizes", "1", "--no-progress"]


def compress(*args, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same intra-op threads in both runs, as torchrun sets
    return subprocess.run([*launcher, "-m", "compressor", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def files_in(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def single_and_ddp(digits_ensemble, tmp_path_factory):
    """One run in one process and the same run on two gloo ranks, each with a cold teacher cache of its own."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {}
    for name, processes in (("single", 1), ("ddp", 2)):
        done = compress("--teacher", digits_ensemble, "--out", root / name, "--teacher-cache", root / f"cache-{name}",
                        *RUN, processes=processes)
        assert done.returncode == 0, done.stdout + done.stderr
        runs[name] = (root / name, root / f"cache-{name}", done)
    return runs


def test_two_ranks_train_the_same_student_as_one_process(single_and_ddp):
    (single, _, _), (ddp, _, _) = single_and_ddp["single"], single_and_ddp["ddp"]
    one, two = (json.loads((folder / "report.json").read_text()) for folder in (single, ddp))
    assert two["environment"]["distributed"] == {"world_size": 2, "backend": "gloo", "device": "cpu"}
    assert one["environment"]["distributed"]["world_size"] == 1
    # every global batch is split across the ranks, so the steps are those of the one-process run up to rounding
    for a, b in zip(one["student"]["training"]["history"], two["student"]["training"]["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert abs(b["val_accuracy"] - a["val_accuracy"]) <= 1 / 144 + 1e-9  # at most one validation image
    weights = [torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["model_state"]
               for folder in (single, ddp)]
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], atol=1e-4, rtol=1e-4)
    top1 = [next(row for row in report["rows"] if row["kind"] == "student")["accuracy"]["top1"]
            for report in (one, two)]
    assert abs(top1[0] - top1[1]) <= 0.01


def test_rank_zero_alone_writes_and_nothing_is_half_written(single_and_ddp):
    (single, _, _), (ddp, cache, done) = single_and_ddp["single"], single_and_ddp["ddp"]
    assert files_in(ddp) == files_in(single)  # no file per rank, nothing extra
    assert not [name for name in files_in(ddp) if name.endswith(".tmp") or "/." in f"/{name}"]
    json.loads((ddp / "report.json").read_text())
    json.loads((ddp / "bundle" / "metadata.json").read_text())
    for name in ("last.pt", "best.pt"):
        torch.load(ddp / "checkpoints" / name, weights_only=True)
    # the teacher cache is shared: rank 0 stored one entry, rank 1 read it; the ranks' shards of the teacher pass
    # are gone
    entries = [path for path in cache.iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries
    assert (entries[0] / "entry.json").is_file()
    # one voice: the summary table and the headline are printed once
    assert done.stdout.count("test split: accuracy and median latency") == 1, done.stdout


def test_the_ranks_teacher_shards_assemble_into_the_entry_one_process_computes(single_and_ddp):
    (single, one_cache, _), (ddp, two_cache, _) = single_and_ddp["single"], single_and_ddp["ddp"]
    reports = [json.loads((folder / "report.json").read_text()) for folder in (single, ddp)]
    assert [report["teacher_cache"]["computed_by_ranks"] for report in reports] == [1, 2]
    (one,), (two,) = list(one_cache.iterdir()), list(two_cache.iterdir())
    for split in ("train", "val", "test"):
        a, b = np.load(one / f"{split}.npy"), np.load(two / f"{split}.npy")
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("rows, size", [(10, 3), (2, 4), (0, 2), (7, 1)])
def test_shards_of_the_teacher_pass_cover_every_row_once_in_order(rows, size):
    bounds = [shard_bounds(rows, rank, size) for rank in range(size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == rows
    assert all(stop == next_first for (_, stop), (next_first, _) in zip(bounds, bounds[1:]))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


def test_a_global_batch_is_split_without_loss_or_overlap():
    batch = torch.arange(7)
    shards = [_shard(batch, rank, 3) for rank in range(3)]
    assert sorted(torch.cat([rows for rows, _ in shards]).tolist()) == list(range(7))
    assert sum(share for _, share in shards) == pytest.approx(1.0)
    assert _shard(batch, 0, 1) == (batch, 1.0)
    rows, share = _shard(torch.tensor([5]), 1, 2)  # a last batch smaller than the world
    assert share == 0.0 and rows.tolist() == [5]
