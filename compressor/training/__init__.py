"""Steps 3 and 4 of the main job: the transfer set and the teachers' outputs on it (cached on disk), the loss, the
training loop with its checkpoints, recipes, the hard-label baseline, the tuning search (``--tune``, ``--recipe
auto``), DDP, the bias fix for omitted classes, and ``compress specialists`` (paper §5).

Public entry points: :func:`train_student` (the loop), :func:`distill`, :func:`train_baseline`, :func:`tune` (the
main job's steps), :class:`DistillationLoss`, :class:`HardLabelLoss`.
"""

from compressor.training.distill import choose_student, distill, distill_generalist, train_baseline
from compressor.training.loop import TrainConfig, TrainResult, train_student
from compressor.training.losses import DistillationLoss, HardLabelLoss
from compressor.training.tuning import tune

__all__ = ["DistillationLoss", "HardLabelLoss", "TrainConfig", "TrainResult", "choose_student", "distill",
           "distill_generalist", "train_baseline", "train_student", "tune"]
