"""benchmarks/zoo.py: the cached build, the default command, and a zoo row read from a real run's report.json."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rich.console import Console

from benchmarks import zoo, zoo_losses

# the digits ensemble at the quick scale (its data do not depend on the scale) under its own name, so nothing is
# shared with a real zoo folder
TINY = replace(zoo.SCALES["quick"], name="test")
FAST = ("--epochs", "2", "--screen-trials", "2", "--warmup", "0", "--duration", "0.05", "--rounds", "1",
        "--batch-sizes", "1")


def test_the_gain_and_speed_up_texts():
    assert zoo.ratio(2.0, 0.5) == 4.0 and zoo.ratio(None, 0.5) is None and zoo.ratio(2.0, None) is None
    assert zoo.gain_text({"gain_kept": 0.5, "interval_95": [0.25, 0.75]}) == "50% [25%, 75%]"
    assert zoo.gain_text({"gain_kept": -0.2, "interval_95": None}) == "-20% (n.m.)"
    assert zoo.gain_text({"gain_kept": None}) == "no gain"


def test_the_zoo_has_its_eight_ensembles_and_the_quick_scale_is_smaller():
    assert list(zoo.ZOO) == ["cnn-homogeneous", "mixed-cnn-mlp", "mlp-digits", "timm-rgb", "bert-text", "weak-cnn",
                             "pairs-100", "rich-teachers"]
    assert set(zoo.PREVIOUS_DEFAULT) == set(zoo.ZOO)
    quick, full = zoo.SCALES["quick"], zoo.SCALES["full"]
    assert quick.fashion_rows < 60_000 and full.fashion_rows is None and full.run_args == ()
    assert quick.pair_images < full.pair_images and full.pair_images // 2 >= 100 * 100  # 100 classes, enough rows


def test_the_command_keeps_the_defaults(tmp_path):
    built = zoo.Built(tmp_path / "e.pt", "digits", ("--max-train", "300"))
    command = zoo.compress_command(built, tmp_path / "out", tmp_path / "cache", zoo.SCALES["quick"])
    assert command[1:3] == ["-m", "compressor"]
    assert "--student" not in command and "--alpha" not in command and "-T" not in command
    assert {"--baseline", "--no-progress"} <= set(command) and command[command.index("--target") + 1] == "onnxruntime"
    assert command[command.index("--budget") + 1] == "3" and command[command.index("--max-train") + 1] == "300"
    full = zoo.compress_command(replace(built, run_args=()), tmp_path / "o", tmp_path / "c", zoo.SCALES["full"])
    assert "--budget" not in full and "--max-train" not in full  # the full scale changes nothing but the data
    digits = zoo.compress_command(replace(built, default_epochs=True), tmp_path / "o", tmp_path / "c", TINY)
    assert "--budget" not in digits
    previous = zoo.compress_command(built, tmp_path / "o", tmp_path / "c", TINY, zoo.PREVIOUS_DEFAULT["mlp-digits"])
    assert previous[previous.index("--student") + 1] == "mlp" and "--baseline" not in previous


@pytest.mark.slow
def test_a_built_ensemble_is_reused_and_its_run_gives_a_row(tmp_path, monkeypatch):
    console = Console(width=170)
    built = zoo.build("mlp-digits", tmp_path, TINY, console)
    stamp = built.teacher.stat().st_mtime_ns
    assert zoo.build("mlp-digits", tmp_path, TINY, console) == built and built.teacher.stat().st_mtime_ns == stamp
    monkeypatch.setattr(zoo, "VERSION", "another")
    assert zoo.build("mlp-digits", tmp_path, TINY, console).teacher.stat().st_mtime_ns != stamp  # rebuilt

    row = zoo.run("mlp-digits", built, tmp_path, TINY, console, extra=FAST)
    assert row["exit"] == 0, row.get("error")
    report = json.loads((tmp_path / "test" / "mlp-digits" / "run" / "report.json").read_text())
    assert row["members"]["count"] == 3 and row["classes"] == 10
    assert row["members"]["parameters"] == report["teacher"]["parameters"]
    # on 64-vectors the families are MLPs and a shrunk member; which wins depends on the candidates' timings
    assert row["student"]["spec"] == report["student"]["spec"]
    assert row["student"]["spec"].split(":")[0] in ("mlp", "from-teacher")
    assert row["student_eager_top1"] == report["verdict"]["student_top1"]
    assert abs(row["student_top1"] - row["student_eager_top1"]) <= 0.01  # fp32 ONNX Runtime against PyTorch
    assert row["baseline_top1"] == report["verdict"]["baseline_top1"]
    assert row["ensemble_top1"] == report["verdict"]["ensemble_top1"]
    assert row["gain_kept"] == report["verdict"]["gain_kept"]
    assert row["best_member"]["top1"] >= 0.8 and row["best_member"]["name"] in row["members"]["names"]
    b1 = row["batch1_ms"]
    assert row["speedup_over_ensemble"] == round(b1["ensemble"] / b1["student"], 2)
    assert row["speedup_over_best_member"] == round(b1["best_member"] / b1["student"], 2)
    assert row["command"].startswith("compress --teacher") and "--student" not in row["command"]
    previous = row["previous_default"]
    assert previous["exit"] == 0 and previous["spec"].startswith("mlp:") and 0 < previous["top1"] <= 1

    result = {"label": "defaults at abc1234", "scale": "test", "rows": [row, {"name": "broken", "exit": 2}]}
    wide = Console(width=200, record=True)
    wide.print(zoo.zoo_table(result))
    text = wide.export_text()
    assert "defaults at abc1234" in text and row["student"]["spec"] in text and "exit 2" in text
    assert previous["spec"] in text

    # the loss columns: the settled student at --loss dkd, the baseline resumed from the default run's checkpoint
    folder = tmp_path / "test" / "mlp-digits"
    entry = zoo_losses.run_loss("mlp-digits", folder, "dkd", console)
    assert entry["exit"] == 0, entry.get("error")
    again = json.loads((folder / "loss-dkd" / "report.json").read_text())
    assert again["student"]["loss"]["soft_term"] == "dkd" and again["student"]["spec"] == row["student"]["spec"]
    assert entry["baseline_top1"] == row["baseline_top1"]
    assert again["baseline"]["training"]["resumed_from_epoch"] == len(again["baseline"]["training"]["history"])
    losses = {"label": "at abc1234", "scale": "test", "losses": ["dkd"],
              "rows": [{"name": "mlp-digits", "student": row["student"]["spec"],
                        "losses": {"kd": {"exit": 0, **{k: row[k] for k in ("student_top1", "gain_kept",
                                                                              "interval_95")}}, "dkd": entry}}]}
    wide.print(zoo_losses.table(losses))
    assert "dkd: gain kept" in wide.export_text()
