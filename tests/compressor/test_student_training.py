"""The main job's training steps (compressor/student_training.py) on their own; end to end they run in
test_pipeline.py, test_recipes.py and test_tuning.py."""

from __future__ import annotations

from compressor.student_training import reached_at


def test_a_trial_trained_past_a_rung_reports_what_the_search_saw_at_that_rung():
    history = [{"epoch": e, "val_accuracy": v, "seconds": float(e)}
               for e, v in enumerate([0.5, 0.7, 0.6, 0.9, 0.8], start=1)]
    assert reached_at(history, 3) == (0.7, 6.0)  # epochs 1-3 only, though the checkpoint holds 5
    assert reached_at(history, 5) == (0.9, 15.0)
    assert reached_at(history, 9) == (0.9, 15.0)  # paused at epoch 5: all it has
