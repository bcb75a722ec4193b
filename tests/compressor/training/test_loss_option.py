"""``--loss`` and ``--beta`` in the main job: the soft term trains the student, is recorded, and ties checkpoints."""

from __future__ import annotations

import json

from compressor.cli import main
from compressor.config import LOSSES, RunConfig
from compressor.kernels import VARIANTS
from compressor.options import command_line

RUN = ["--student", "mlp:32", "--epochs", "2", "--warmup", "0.01", "--duration", "0.02", "--no-progress",
       "--batch-sizes", "1"]


def test_the_cli_offers_every_variant_the_kernels_define():
    assert LOSSES == VARIANTS
    line = command_line(RunConfig(teacher="t.pt", loss="dkd", beta=4.0))
    assert "--loss dkd" in line and "--beta 4.0" in line


def test_compress_with_dkd_records_it_and_resume_refuses_another_loss(digits_ensemble, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--loss", "dkd", "--beta", "4", *RUN]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["loss"] == {"soft_term": "dkd", "temperature": 4.0, "alpha": 0.9, "beta": 4.0}
    assert report["config"]["loss"] == "dkd"
    kd = tmp_path / "kd"
    assert main(["--teacher", str(digits_ensemble), "--out", str(kd), *RUN]) == 0
    trained = lambda folder: json.loads((folder / "report.json").read_text())["student"]["training"]  # noqa: E731
    assert trained(out)["history"][-1]["train_loss"] != trained(kd)["history"][-1]["train_loss"]
    capsys.readouterr()
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--loss", "ls", "--resume", *RUN]) != 0
    assert "loss" in capsys.readouterr().err
