"""--student auto as a measured choice: candidates of every family, the speed constraint, the screen's successive
halving and α/T grid, the budget's epochs, and a real run that reports all of it."""

from __future__ import annotations

import json

import pytest

from compressor.cli import main
from compressor.students.candidates import candidate_specs, family_of
from compressor.students.registry import create_student
from compressor.training.budget import MAX_EPOCHS, RunBudget, epoch_cap, epochs_that_fit
from compressor.training.selection import (GRID, SCREEN_MIX, ScreenTrial, apply_speed_constraint, run_grid,
                                           run_screen, screen_order, within_noise)

QUICK = ["--warmup", "0.02", "--duration", "0.05", "--rounds", "1", "--batch-sizes", "1", "--no-progress"]


def test_images_get_candidates_of_every_family_and_vectors_the_mlp_ladder():
    images = candidate_specs((3, 32, 32), False, None, True)
    assert {family_of(s) for s in images} == {"cnn", "mlp", "timm", "torchvision", "from-teacher"}
    vectors = candidate_specs((64,), False, None, False)
    assert {family_of(s) for s in vectors} == {"mlp"}
    assert "from-teacher:0.25" in candidate_specs((64,), False, None, True)


def test_text_candidates_keep_two_layers_where_the_teachers_have_them():
    config = {"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 4,
              "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 16}
    specs = candidate_specs((16,), True, config, False)
    assert "hf:teacher/0.25/2" in specs and "hf:teacher/0.5/4" in specs
    pytest.importorskip("transformers")
    model = create_student("hf:teacher/0.25/2", (16,), 3, teacher_config=config,
                           example=_token_example())
    assert model.model.config.num_hidden_layers == 2 and model.model.config.hidden_size == 8


def _token_example():
    import torch

    from compressor.core.inputs import NamedInputs

    ids = torch.randint(2, 50, (2, 16))
    return NamedInputs({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.full((2,), 16))


def _rows(latencies: dict[str, float], parameters: int = 1000) -> list[dict]:
    return [{"spec": s, "family": family_of(s), "latency_ms": ms, "parameters": parameters,
             "multiply_adds": int(1e6 * ms)} for s, ms in latencies.items()]


def test_the_speed_constraint_is_relative_to_the_best_member():
    rows = _rows({"cnn:8x16": 0.2, "cnn:16x32": 0.6, "mlp:32": 0.4})
    constraint = apply_speed_constraint(rows, 1.0, 2.0, None, None)
    assert [r["fits"] for r in rows] == [True, False, True] and constraint["limit_ms"] == 0.5
    assert "0.6000 ms" in rows[1]["why_not"] and constraint["note"] is None


def test_named_limits_replace_the_speedup_and_none_fitting_screens_the_fastest():
    rows = _rows({"cnn:8x16": 0.2, "cnn:16x32": 0.6})
    constraint = apply_speed_constraint(rows, 1.0, 2.0, None, 500)  # every row has 1,000 parameters: none fits
    assert [r["fits"] for r in rows] == [True, False] and "fastest" in constraint["note"]  # the fastest are screened
    rows = _rows({"cnn:8x16": 0.2, "cnn:16x32": 0.6})
    constraint = apply_speed_constraint(rows, None, 2.0, 0.3, None)
    assert [r["fits"] for r in rows] == [True, False] and "at most 0.3 ms" in constraint["rule"]


def test_the_screen_order_alternates_families_largest_first():
    rows = _rows({"cnn:8x16": 0.1, "cnn:16x32": 0.2, "mlp:32": 0.05, "mlp:64x64": 0.08, "timm:x": 0.3})
    for row in rows:
        row["fits"] = True
    assert screen_order(rows) == ["cnn:16x32", "mlp:64x64", "timm:x", "cnn:8x16", "mlp:32"]


class FakeScreen:
    """The screen's bookkeeping with a scripted accuracy per spec and α: successive halving and the grid are the
    things under test, not the training loop (tested on its own)."""

    def __init__(self, scores: dict, pace: float = 1.0, examples: int = 10_000):
        self.scores, self.rungs, self.results, self.seconds, self.epochs = scores, (2, 6, 18), {}, {}, {}
        self._pace = pace
        self.ctx = type("Ctx", (), {"tensors": type("T", (), {"y_val": range(examples)})()})()

    def train(self, trial, epochs):
        accuracy = self.scores[(trial.spec, trial.alpha, trial.temperature)] * epochs / 18
        self.results.setdefault(trial, {})[epochs] = accuracy
        self.seconds[trial] = self._pace * epochs
        self.epochs[trial] = epochs
        return accuracy

    def pace(self, trial):
        return self._pace

    def spent(self):
        return sum(self.seconds.values())


def test_successive_halving_keeps_the_best_third_each_rung():
    specs = [f"mlp:{w}" for w in (8, 16, 32, 64, 128, 256, 512, 1024, 2048)]
    screen = FakeScreen({(s, *SCREEN_MIX): 0.5 + 0.05 * k for k, s in enumerate(specs)})
    winner = run_screen(screen, specs, 1e9, None, print)
    assert winner.spec == "mlp:2048"
    reached = {t.spec: max(r) for t, r in screen.results.items()}
    assert sorted(s for s, e in reached.items() if e == 18) == ["mlp:2048"]
    assert sorted(s for s, e in reached.items() if e >= 6) == ["mlp:1024", "mlp:2048", "mlp:512"]


def test_candidates_the_validation_split_cannot_tell_apart_all_go_on():
    specs = ["cnn:8x16", "mlp:512x512", "mlp:128x128"]
    scores = {("cnn:8x16", *SCREEN_MIX): 0.85 * 9, ("mlp:512x512", *SCREEN_MIX): 0.8467 * 9,
              ("mlp:128x128", *SCREEN_MIX): 0.70 * 9}  # at the first rung (2 of 18 epochs): 85.0%, 84.67%, 70.0%
    screen = FakeScreen(scores, examples=300)  # one standard error is 2.1 points on 300 rows
    run_screen(screen, specs, 1e9, None, print)
    reached = {t.spec: max(r) for t, r in screen.results.items()}
    assert reached == {"cnn:8x16": 18, "mlp:512x512": 6, "mlp:128x128": 2}  # 0.33 points apart: both went on
    screen = FakeScreen(scores, examples=1_000_000)
    run_screen(screen, specs, 1e9, None, print)
    assert {t.spec: max(r) for t, r in screen.results.items()}["mlp:512x512"] == 2  # resolvable: the third only


def test_a_small_budget_stops_starting_candidates_and_promotes_fewer():
    specs = [f"mlp:{w}" for w in (8, 16, 32, 64, 128, 256)]
    screen = FakeScreen({(s, *SCREEN_MIX): 0.5 + 0.01 * k for k, s in enumerate(specs)})
    run_screen(screen, specs, 12.0, None, print)  # 12 s: the first rung's share (4 s) is spent after 2 trials
    assert len(screen.results) < len(specs)
    screen = FakeScreen({(s, *SCREEN_MIX): 0.5 for s in specs})
    run_screen(screen, specs, 1e9, 2, print)  # --screen-trials 2: exactly 2 enter, budget ignored
    assert len(screen.results) == 2


def test_the_grid_picks_labels_alone_only_beyond_the_noise():
    spec = "cnn:8x16"
    base = {(spec, a, t): 0.80 for a, t in GRID}
    winner = ScreenTrial(spec, *SCREEN_MIX)
    screen = FakeScreen({**base, (spec, 0.0, 1.0): 0.95})
    screen.train(winner, 6)
    assert run_grid(screen, winner, True, False, 1e9, None, print).alpha == 0.0
    screen = FakeScreen({**base, (spec, 0.0, 1.0): 0.801}, examples=300)  # 0.1 point on 300 rows: noise
    screen.train(winner, 6)
    assert run_grid(screen, winner, True, False, 1e9, None, print) == winner
    assert run_grid(screen, winner, False, False, 1e9, None, print) == winner  # no labels: nothing to choose


def test_within_noise_prefers_the_first_of_the_tied():
    assert within_noise({"a": 0.90, "b": 0.905}, 100) == "a"
    assert within_noise({"a": 0.50, "b": 0.90}, 10_000) == "b"


def test_the_budget_buys_epochs_by_measured_pace():
    ticks = iter([0.0, 100.0])
    budget = RunBudget(600.0, clock=lambda: next(ticks))
    budget.start()
    assert budget.left() == 500.0
    assert epochs_that_fit(500.0, 10.0, 2) == 25 and epochs_that_fit(500.0, 1.0, 1) == 30
    assert epochs_that_fit(5.0, 10.0, 2) == 1


def test_the_budget_clock_stops_when_training_ends():
    ticks = iter([0.0, 50.0, 80.0, 500.0])
    budget = RunBudget(600.0, clock=lambda: next(ticks))
    budget.start()
    assert budget.elapsed() == 50.0
    budget.stop()  # at 80 s; the export and the benchmark come after
    assert budget.elapsed() == 80.0 and budget.describe({})["seconds_used"] == 80.0


def test_the_epoch_cap_counts_steps_for_small_transfer_sets():
    assert epoch_cap(24) == 125          # 3,000 rows at batch 128: 3,000 steps, not 30 epochs of 720
    assert epoch_cap(422) == MAX_EPOCHS  # 54,000 rows: 30 epochs are more than 3,000 steps
    assert epochs_that_fit(500.0, 1.0, 2, cap=epoch_cap(24)) == 125


@pytest.mark.slow
def test_compress_auto_chooses_by_measurement_and_resume_keeps_the_choice(digits_ensemble, tmp_path):
    out = tmp_path / "out"
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--screen-trials", "3", "--baseline",
                 *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    selection = report["student"]["selection"]
    assert report["config"]["student"] == "auto" and report["student"]["spec"] == selection["chosen"]
    built = [row for row in selection["candidates"] if "skipped" not in row]
    assert {row["family"] for row in built} >= {"cnn", "mlp"}
    assert all(row["parameters"] > 0 and "eager_ms" in row for row in built)
    assert selection["reference"]["latency_ms"] > 0 and selection["constraint"]["min_speedup"] == 2.0
    screened = [row for row in selection["candidates"] if "screened" in row]
    assert 1 <= len(screened) <= 3 and all(row["fits"] for row in screened)
    assert {(t["alpha"], t["temperature"]) for t in selection["screen"]["trials"]} >= {(0.0, 1.0), SCREEN_MIX}
    assert report["budget"]["bought"]["epochs"] == report["student"]["training"]["history"][-1]["epoch"]
    assert "chosen by measurement" in report["headline"]
    settled = json.loads((out / "selection.json").read_text())["settled"]
    assert settled["student"] == selection["chosen"] and settled["alpha"] == selection["alpha"]
    assert main(["--teacher", str(digits_ensemble), "--out", str(out), "--screen-trials", "3", "--baseline",
                 "--resume", *QUICK]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["student"]["spec"] == report["student"]["spec"]
    assert resumed["student"]["selection"]["screen"] == selection["screen"]  # read back, not measured again
