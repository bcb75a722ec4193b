"""compressor.compress: the main job from Python over nn.Modules and the user's own torch Datasets (map-style,
iterable, dict inputs, unlabeled rows), the same report as the command for the same settings, and one named error
for each kind of bad Dataset, raised before the teachers run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compressor
from compressor.cli import main
from compressor.core.errors import DataShapeError, EmptySplitError, LabelError, OptionError
from tests.conftest import TOKEN_CLASSES, tiny_bert, token_rows

QUICK = dict(student="mlp:32", epochs=2, batch_sizes=(1,), warmup=0.01, duration=0.02, rounds=1)


class Rows(torch.utils.data.Dataset):
    """A map-style Dataset over tensors, with a transform of its own (the user's preprocessing)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform=None, unlabeled: bool = False):
        self.x, self.y, self.transform, self.unlabeled = x, y, transform, unlabeled

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.x[i])
        x = self.transform(x) if self.transform else x
        return x if self.unlabeled else (x, int(self.y[i]))


class Stream(torch.utils.data.IterableDataset):
    """An iterable Dataset: rows as they come, no length."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        self.x, self.y = x, y

    def __iter__(self):
        for x, y in zip(self.x, self.y):
            yield torch.from_numpy(x), torch.tensor(y)


class Tokens(torch.utils.data.Dataset):
    """Pre-tokenised rows of different lengths as dicts of 1-D int64 tensors."""

    def __init__(self, n: int, seed: int):
        self.rows = token_rows(n, seed)

    def __len__(self) -> int:
        return len(self.rows["label"])

    def __getitem__(self, i: int):
        inputs = {name: torch.tensor(self.rows[name][i]) for name in ("input_ids", "attention_mask")}
        return inputs, self.rows["label"][i]


def digits_splits(digits_data, unlabeled: bool = False) -> compressor.Data:
    """The digits splits as the user's Datasets: raw pixel counts (0 to 16) scaled by a transform of their own."""
    d = digits_data

    def rows(split, **kwargs):
        return Rows(np.round(split.x * 16), split.y, transform=lambda x: x / 16, **kwargs)
    return compressor.Data(train=rows(d.train, unlabeled=unlabeled), val=rows(d.val), test=rows(d.test),
                           classes=d.class_names)


def student_top1(report: dict) -> float:
    return next(r for r in report["rows"] if r["kind"] == "student")["accuracy"]["top1"]


def ensemble_top1(report: dict) -> float:
    return next(r for r in report["rows"] if r["kind"] == "ensemble")["accuracy"]["top1"]


def test_in_memory_teachers_on_a_map_style_dataset_and_the_bundle_reproduces_the_report(digits_nets, digits_data,
                                                                                       tmp_path):
    epochs = []
    result = compressor.compress(digits_nets, digits_splits(digits_data), out=tmp_path / "run",
                                 on_epoch=epochs.append, **QUICK)
    assert [e["epoch"] for e in epochs] == [1, 2] and {e["run"] for e in epochs} == {"checkpoints"}
    assert result.report["data"]["sizes"] == {"train": len(digits_data.train), "val": len(digits_data.val),
                                              "test": len(digits_data.test)}
    assert "keyed_by" in result.report["data"]["split"] and "sampled" in result.report["data"]["split"]["keyed_by"]
    assert result.headline == result.report["headline"] and isinstance(result.student, torch.nn.Module)
    assert result.paths["report"] == tmp_path / "run" / "report.json" and result.paths["model"].is_file()
    metadata = json.loads((result.paths["bundle"] / "metadata.json").read_text())
    assert metadata["normalisation"] is None and "Dataset's own transform" in metadata["preprocessing"]
    test = digits_splits(digits_data).test  # its transform is the user's: the bundle takes the tensors it yields
    x = np.stack([test[i][0].numpy() for i in range(len(test))])
    top1 = float((result.bundle.predict(x).argmax(1) == digits_data.test.y).mean())
    assert top1 == pytest.approx(student_top1(result.report), abs=1e-9)
    assert result.report["command"].startswith("compressor.compress([Sequential, Sequential], Data(train=Rows")


def test_an_iterable_dataset_is_read_once_and_carved_into_val_and_test(digits_nets, digits_data, tmp_path):
    d = digits_data
    data = compressor.Data(train=Stream(d.train.x, d.train.y), classes=d.class_names, fingerprint="digits-v1")
    result = compressor.compress(digits_nets, data, out=tmp_path / "run", **QUICK)
    sizes = result.report["data"]["sizes"]
    assert sum(sizes.values()) == len(d.train) and min(sizes.values()) > 0
    assert sizes["test"] == pytest.approx(0.2 * len(d.train), rel=0.25)
    assert result.report["data"]["split"]["keyed_by"] == "the fingerprint given, Data(fingerprint='digits-v1')"
    assert ensemble_top1(result.report) > 0.9  # the teachers saw the rows as they were yielded


def test_an_unlabeled_transfer_dataset_trains_on_the_soft_targets(digits_nets, digits_data, tmp_path):
    result = compressor.compress(digits_nets, digits_splits(digits_data, unlabeled=True), out=tmp_path / "run",
                                 **QUICK)
    assert result.report["transfer_set"]["alpha"] == 1.0 and result.report["student"]["loss"]["alpha"] == 1.0
    assert ensemble_top1(result.report) > 0.9  # val and test keep their labels: every row is still scored


def test_a_dict_input_dataset_with_in_memory_text_teachers(tmp_path):
    teachers = [tiny_bert(k) for k in range(2)]
    data = compressor.Data(train=Tokens(300, 0), test=Tokens(100, 1), classes=TOKEN_CLASSES)
    result = compressor.compress(teachers, data, out=tmp_path / "run",
                                 **{**QUICK, "student": "hf:teacher/0.5", "batch_sizes": (1, 8)})
    assert [i["name"] for i in result.report["export"]["inputs"]] == ["input_ids", "attention_mask"]
    test = Tokens(100, 1)
    rows = [test[i][0] for i in range(len(test))]
    width = max(len(r["input_ids"]) for r in rows)
    feed = {name: np.stack([np.pad(r[name].numpy(), (0, width - len(r[name]))) for r in rows])
            for name in ("input_ids", "attention_mask")}
    top1 = float((result.bundle.predict(feed).argmax(1) == np.asarray(test.rows["label"])).mean())
    assert top1 == pytest.approx(student_top1(result.report), abs=1e-9)


def bad_run(nets, data, tmp_path, error, match):
    """The run stops with ``error`` before the teachers ran on the data: no --out, no teacher-cache entry."""
    cache = tmp_path / "cache"
    with pytest.raises(error, match=match):
        compressor.compress(nets, data, out=tmp_path / "run", teacher_cache=cache, **QUICK)
    assert not (tmp_path / "run").exists()
    assert not [p for p in cache.glob("*") if p.name != "datasets"]  # no teacher logits were cached


def test_rows_of_another_shape_stop_the_run_naming_the_row(digits_nets, digits_data, tmp_path):
    d = digits_data
    x = [row for row in d.train.x]
    x[7] = np.zeros((1, 8, 7), np.float32)

    class Ragged(Rows):
        def __getitem__(self, i):
            return torch.from_numpy(x[i]), int(self.y[i])
    data = compressor.Data(train=Ragged(d.train.x, d.train.y), test=Rows(d.test.x, d.test.y))
    bad_run(digits_nets, data, tmp_path, DataShapeError, r"train split, row 7: an input of shape \[1, 8, 7\]")


def test_labels_beyond_the_classes_stop_the_run(digits_nets, digits_data, tmp_path):
    d = digits_data
    y = d.train.y.copy()
    y[[3, 5]] = 12
    data = compressor.Data(train=Rows(d.train.x, y), test=Rows(d.test.x, d.test.y))
    bad_run(digits_nets, data, tmp_path, LabelError, r"2 row\(s\) of the train split have the label\(s\) 12 but the "
                                                     r"teachers in in-memory teachers predict 10 classes")


def test_an_empty_split_stops_the_run(digits_nets, digits_data, tmp_path):
    d = digits_data
    data = compressor.Data(train=Rows(d.train.x, d.train.y), val=Rows(d.val.x[:0], d.val.y[:0]))
    bad_run(digits_nets, data, tmp_path, EmptySplitError, "the val split is empty")


def test_a_pil_image_or_an_unknown_option_is_named(digits_nets, digits_data, tmp_path):
    PIL = pytest.importorskip("PIL.Image")
    d = digits_data

    class Images(Rows):
        def __getitem__(self, i):
            return PIL.fromarray((d.train.x[i, 0] * 255).astype(np.uint8)), int(self.y[i])
    bad_run(digits_nets, compressor.Data(train=Images(d.train.x, d.train.y)), tmp_path, DataShapeError,
            "is a Image, not a tensor .end the transform with torchvision's ToTensor")
    with pytest.raises(OptionError, match="unknown option 'budgt'; did you mean budget"):
        compressor.compress(digits_nets, "digits", budgt=3)
    with pytest.raises(OptionError, match="target='onnxx'"):
        compressor.compress(digits_nets, "digits", target="onnxx")


VOLATILE = {"created", "command", "latency", "throughput", "environment", "benchmark", "budget", "pareto", "timing", "headline", "warnings",
            "teacher_cache"}  # the clock's figures, and the second run's teacher-cache hit


def scrubbed(value, out: Path):
    """A report without what differs between two runs of the same settings: wall-clock figures, the command, and
    the --out folder in paths."""
    if isinstance(value, dict):
        return {k: scrubbed(v, out) for k, v in value.items()
                if k not in VOLATILE and "ms" not in k.split("_") and "seconds" not in k.split("_")}
    if isinstance(value, list):
        return [scrubbed(v, out) for v in value]
    return value.replace(str(out), "OUT") if isinstance(value, str) else value


def test_the_api_and_the_command_write_the_same_report(digits_ensemble, tmp_path):
    options = ["--student", "mlp:32", "--epochs", "2", "--batch-sizes", "1", "--warmup", "0.01", "--duration",
               "0.02", "--rounds", "1", "--seed", "3", "--baseline", "--no-progress"]
    assert main(["--teacher", str(digits_ensemble), "--data", "digits", "--out", str(tmp_path / "cli"), *options]) == 0
    result = compressor.compress(digits_ensemble, "digits", out=tmp_path / "api", seed=3, baseline=True, **QUICK)
    cli = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert cli.keys() == result.report.keys()
    assert scrubbed(cli, tmp_path / "cli") == scrubbed(result.report, tmp_path / "api")
    assert result.report["command"].startswith(f"compress --teacher {digits_ensemble}")


def test_teachers_that_are_not_classifiers_are_named(digits_data, tmp_path):
    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1).sum(1)  # (N,), not (N, C) logits
    with pytest.raises(compressor.TeacherError, match=r"returned shape \(8,\) for a batch of 8"):
        compressor.compress([Flat()], digits_splits(digits_data), out=tmp_path / "run", **QUICK)
    assert not (tmp_path / "run").exists()
    with pytest.raises(OptionError, match="teachers in memory name no dataset"):
        compressor.compress([Flat()], out=tmp_path / "run")


def test_modules_and_datasets_in_memory_train_the_student_the_files_train(digits_nets, digits_ensemble, digits_data,
                                                                          tmp_path):
    """The same members and rows, once as an archive and --data digits, once as modules and Datasets: the same
    student, epoch for epoch."""
    files = compressor.compress(digits_ensemble, "digits", out=tmp_path / "files", **QUICK)
    memory = compressor.compress(digits_nets, digits_splits(digits_data), out=tmp_path / "memory", **QUICK)
    history = [[e["val_accuracy"] for e in r.report["student"]["training"]["history"]] for r in (files, memory)]
    assert history[0] == history[1]
    assert student_top1(files.report) == student_top1(memory.report)
    assert files.report["data"]["sizes"] == memory.report["data"]["sizes"]
