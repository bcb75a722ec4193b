"""The main job on an ensemble of timm models read from an RGB image folder, with a timm and a torchvision student:
teachers saved as TorchScript, the folder decoded through the data cache, the student exported to ONNX Runtime and
its bundle reproducing the report's accuracy on the raw images. `make test` installs timm and torchvision, so under
CI these run, never skip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor import save_ensemble
from compressor.cli import main
from targets.bundle import load_bundle
from tests.conftest import fit

if os.environ.get("CI"):  # make test installs both: a missing one is a failure there, not a skip
    import timm
    import torchvision
else:
    timm = pytest.importorskip("timm")
    torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.slow

CLASSES = ["blobs", "horizontal", "vertical"]
SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """One (SIZE, SIZE, 3) uint8 image of class ``label``: stripes across or down at a random phase and colour, or
    a few soft blobs, under noise, so the task needs a few epochs but no luck."""
    y, x = np.mgrid[:SIZE, :SIZE].astype(np.float32)
    colour = rng.uniform(0.3, 1.0, 3)
    if label == 0:
        image = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 30.0) for cx, cy in rng.uniform(4, SIZE - 4, (3, 2)))
    else:
        along = y if label == 1 else x
        image = 0.5 + 0.5 * np.sin(along * rng.uniform(0.6, 1.2) + rng.uniform(0, 6.3))
    image = image[..., None] * colour + rng.normal(0, 0.25, (SIZE, SIZE, 3))
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory) -> Path:
    """DIR/{train,test}/<class>/*.png: 80 and 20 RGB images per class."""
    root, rng = tmp_path_factory.mktemp("rgb") / "patterns", np.random.default_rng(0)
    for split, count in (("train", 80), ("test", 20)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for n in range(count):
                Image.fromarray(pattern(label, rng), mode="RGB").save(root / split / name / f"{n:03d}.png")
    return root


def read_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A split's images as normalised (N, 3, SIZE, SIZE) floats and their labels, for training the teachers."""
    files = [(path, k) for k, name in enumerate(CLASSES) for path in sorted((root / split / name).glob("*.png"))]
    x = np.stack([np.asarray(Image.open(path), np.float32) / 255 for path, _ in files]).transpose(0, 3, 1, 2)
    x = (x - np.float32(0.5)) / np.float32(0.25)
    return torch.from_numpy(x), torch.tensor([k for _, k in files])


@pytest.fixture(scope="module")
def timm_ensemble(rgb_folder, tmp_path_factory) -> Path:
    """Two timm models of different families (a ConvNeXt and a ResNet), trained on the folder and saved."""
    x, y = read_split(rgb_folder, "train")
    members = []
    for seed, name in enumerate(("test_convnext", "test_resnet")):
        torch.manual_seed(seed)
        members.append(fit(timm.create_model(name, num_classes=len(CLASSES)), x, y, epochs=4, seed=seed))
    path = tmp_path_factory.mktemp("timm-teachers") / "timm-ensemble.pt"
    save_ensemble(members, path, x[:2], {"class_names": CLASSES, "normalisation": {"mean": MEAN, "std": STD},
                                         "member_names": ["test_convnext", "test_resnet"]})
    return path


@pytest.mark.parametrize("student", ["timm:test_efficientnet", "torchvision:shufflenet_v2_x0_5"])
def test_a_timm_ensemble_on_an_image_folder_compresses_to_a_library_student(student, timm_ensemble, rgb_folder,
                                                                            tmp_path, capsys):
    out = tmp_path / "run"
    code = main([str(a) for a in ("--teacher", timm_ensemble, "--data", rgb_folder, "--target", "onnxruntime",
                                  "--student", student, "--epochs", "5", "--batch-size", "16", "--batch-sizes", "1", "--out", out,
                                  "--warmup", "0.01", "--duration", "0.02", "--no-progress")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["student"]["spec"] == student
    assert report["data"]["input_shape"] == [3, SIZE, SIZE] and report["parity"]["passed"]
    student_row = report["rows"][-1]
    assert student_row["accuracy"]["top1"] > 0.45  # three classes: chance is a third (a few epochs on 216 rows)
    # the bundle, fed the raw test images, gives the report's accuracy: one preprocessing function on both sides
    bundle = load_bundle(out / "bundle")
    files = [(path, k) for k, name in enumerate(CLASSES) for path in sorted((rgb_folder / "test" / name).glob("*"))]
    logits = bundle.predict_images([path for path, _ in files])
    accuracy = float((logits.argmax(1) == np.array([k for _, k in files])).mean())
    assert accuracy == pytest.approx(student_row["accuracy"]["top1"], abs=1e-9)
