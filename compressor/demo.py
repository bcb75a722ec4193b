"""``compress demo``: a small, real teacher ensemble on scikit-learn's 8×8 digits, built in seconds.

Three members of different shapes (two MLPs and a CNN) are trained on the training split of ``--data digits``
with the same seed the main job then uses, so the test split the report scores on is never seen by a teacher.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from compressor.data.datasets import load_dataset
from compressor.training.loop import TrainConfig, train_student
from compressor.training.losses import HardLabelLoss
from compressor.teachers.formats import save_ensemble

TEACHER_EPOCHS = 40


def _mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.2), nn.Linear(width, 10))


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),   # (64, 4, 4)
        nn.Flatten(), nn.Linear(64 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))


# The three demo teachers, built after seeding: large for 8×8 inputs on purpose, so a small student gains.
DEMO_MEMBERS = [("mlp-1024", lambda: _mlp(1024)), ("cnn-32x64", _cnn), ("mlp-512", lambda: _mlp(512))]


def build_demo_teachers(out_dir: Path, seed: int = 0, progress: bool = True) -> Path:
    """Train the demo ensemble on the digits training split and save it to ``out_dir/digits-ensemble.pt``."""
    dataset = load_dataset("digits", seed=seed)
    x_train, y_train = torch.from_numpy(dataset.train.x), torch.from_numpy(dataset.train.y)
    x_val, y_val = torch.from_numpy(dataset.val.x), torch.from_numpy(dataset.val.y)
    names, models = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for k, (name, build) in enumerate(DEMO_MEMBERS):
            torch.manual_seed(seed + k)  # initial weights are part of the recorded seed
            model = build()
            config = TrainConfig(epochs=TEACHER_EPOCHS, batch_size=64, lr=1e-3, seed=seed + k, progress=progress)
            train_student(model, x_train, y_train, None, x_val, y_val, HardLabelLoss(), config,
                          Path(scratch) / name)
            names.append(name)
            models.append(model)
    path = Path(out_dir) / "digits-ensemble.pt"
    save_ensemble(models, path, x_train[:2], {"class_names": dataset.class_names, "dataset": "digits",
                                               "member_names": names})
    return path
