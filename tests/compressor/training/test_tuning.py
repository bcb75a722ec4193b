"""The main job's training steps (compressor/student_training.py) on their own; end to end they run in
test_pipeline.py, test_recipes.py and test_tuning.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compressor.data.augment import Shift
from compressor.training.tuning import reached_at, views_ahead
from compressor.training.cached_logits import CachedLogits
from compressor.training.view_cache import ViewLogits


def test_a_trial_trained_past_a_rung_reports_what_the_search_saw_at_that_rung():
    history = [{"epoch": e, "val_accuracy": v, "seconds": float(e)}
               for e, v in enumerate([0.5, 0.7, 0.6, 0.9, 0.8], start=1)]
    assert reached_at(history, 3) == (0.7, 6.0)  # epochs 1-3 only, though the checkpoint holds 5
    assert reached_at(history, 5) == (0.9, 15.0)
    assert reached_at(history, 9) == (0.9, 15.0)  # paused at epoch 5: all it has


def test_a_trials_views_ahead_are_the_passes_not_cached_less_what_its_pace_already_carries(tmp_path):
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    source = ViewLogits(lambda xb: net(xb)[None], x, Shift(1, seed=0), 1, 3, tmp_path, {"view": "test"},
                        batch_size=8)
    source.for_epoch(1)
    source.for_epoch(2)  # epochs 1-2 stored; 3-5 not
    per_pass = source.pass_seconds()
    history = [{"epoch": 1, "seconds": 3.0, "view_seconds": 2.0}, {"epoch": 2, "seconds": 1.0, "view_seconds": 0.0}]
    # epochs 3-5: three passes to compute, less 1 s per epoch of view time in the pace (2 s over its 2 epochs)
    assert views_ahead(source, 0.9, history, 3, 5) == pytest.approx(3 * per_pass - 3 * 1.0)
    assert views_ahead(source, 0.9, history, 1, 2) == 0.0  # both cached, and no epoch before the first to carry
    # epochs up to 4 already charged to another trial of the recipe: only epoch 5's pass is this trial's
    assert views_ahead(source, 0.9, history, 3, 5, priced=4) == pytest.approx(per_pass - 3 * 1.0)
    assert views_ahead(source, 0.9, history, 3, 5, priced=5) == pytest.approx(-3 * 1.0)
    assert views_ahead(source, 0.0, history, 3, 5) == 0.0  # the labels use no teachers
    assert views_ahead(CachedLogits(np.zeros((1, 32, 3), np.float16)), 0.9, history, 3, 5) == 0.0  # no views
