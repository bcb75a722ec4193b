"""Fixtures shared across the suite: small real teacher ensembles trained on real data, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# Without an NVIDIA device, Triton kernels run in Triton's interpreter on the CPU; it must be chosen before
# `import triton`, so here, before any test module imports it. On a GPU machine the real kernels run.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def teacher_cache_dir(tmp_path_factory):
    """Every run in the suite (and its subprocesses) caches teacher logits under pytest's temp folder, never in the
    user's ~/.cache; one folder for the session, so tests see each other's entries as real runs would."""
    folder = tmp_path_factory.mktemp("teacher-cache")
    previous = os.environ.get("COMPRESSOR_CACHE_DIR")
    os.environ["COMPRESSOR_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("COMPRESSOR_CACHE_DIR", None)
    else:
        os.environ["COMPRESSOR_CACHE_DIR"] = previous


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    """Plain full-batch-free Adam training for test fixtures; deterministic for a seed."""
    torch.manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimiser.step()
    return model.eval()


def digits_members() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
        nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                      nn.Linear(16 * 4 * 4, 10)),
    ]


@pytest.fixture(scope="session")
def digits_data():
    from compressor.data.datasets import load_dataset

    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def digits_ensemble(tmp_path_factory, digits_data) -> Path:
    """A 2-member ensemble (MLP + CNN) trained on the digits training split, saved with save_ensemble."""
    from compressor import save_ensemble

    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    members = [fit(m, x, y, epochs=8, seed=k) for k, m in enumerate(digits_members())]
    path = tmp_path_factory.mktemp("teachers") / "digits-ensemble.pt"
    save_ensemble(members, path, x[:2], {"class_names": digits_data.class_names, "dataset": "digits",
                                          "member_names": ["mlp", "cnn"]})
    return path


@pytest.fixture(scope="session")
def digits_nets(digits_data) -> list[nn.Module]:
    """The digits members trained as for digits_ensemble, kept in memory: the teachers a notebook would hold."""
    x, y = torch.from_numpy(digits_data.train.x), torch.from_numpy(digits_data.train.y)
    return [fit(m, x, y, epochs=8, seed=k) for k, m in enumerate(digits_members())]


@pytest.fixture(scope="session")
def fashion_ensemble(tmp_path_factory) -> Path:
    """Two small CNNs trained on a 3,000-image slice of Fashion-MNIST read from its IDX files."""
    if not FASHION_MNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed: apt-get install -y dataset-fashion-mnist")
    from compressor import save_ensemble
    from compressor.data.datasets import load_dataset

    data = load_dataset(str(FASHION_MNIST), seed=0, max_train=3000)
    x, y = torch.from_numpy(data.train.x), torch.from_numpy(data.train.y)

    def cnn(width: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(2 * width * 7 * 7, 10))

    members = [fit(cnn(w), x, y, epochs=2, seed=k) for k, w in enumerate((8, 12))]
    path = tmp_path_factory.mktemp("fashion") / "fashion-ensemble.pt"
    save_ensemble(members, path, x[:2], {"class_names": data.class_names, "dataset": str(FASHION_MNIST)})
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng()


TOKEN_CLASSES = ["low", "middle", "high"]


def token_rows(n: int, seed: int) -> dict:
    """Pre-tokenised rows of 4 to 15 ids (1 = [CLS] first) whose label is which third of the vocabulary (ids 2-31)
    holds most of the row's tokens: a rule a one-layer BERT learns in an epoch or two."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 16, n)
    labels = rng.integers(0, 3, n)
    ids = []
    for length, label in zip(lengths, labels):
        topic = rng.integers(2 + 10 * label, 12 + 10 * label, length - 1)
        noise = rng.integers(2, 32, length - 1)
        ids.append([1] + np.where(rng.random(length - 1) < 0.6, topic, noise).tolist())
    return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids], "label": labels.tolist()}


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    """A Hugging Face dataset on disk (train and test) of pre-tokenised int64 columns and a ClassLabel."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int64")),
                                  "attention_mask": datasets.List(datasets.Value("int64")),
                                  "label": datasets.ClassLabel(names=TOKEN_CLASSES)})
    folder = tmp_path_factory.mktemp("tokens") / "tokens"
    datasets.DatasetDict({split: datasets.Dataset.from_dict(token_rows(n, seed), features=features)
                          for split, n, seed in (("train", 600, 0), ("test", 200, 1))}).save_to_disk(str(folder))
    return folder


def tiny_bert(seed: int, hidden: int = 32):
    """A one-layer BERT classifier from a local config (random init, nothing downloaded)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=32, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="session")
def text_ensemble(tmp_path_factory, token_data) -> Path:
    """Three tiny BERTs trained for two epochs on token_data's train split, saved with save_ensemble."""
    from compressor import save_ensemble
    from compressor.data.datasets import load_dataset

    train = load_dataset(f"hf:{token_data}", seed=0).train
    x, y = train.x, torch.from_numpy(train.y)
    members = []
    for k in range(3):
        model = tiny_bert(k)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(2):
            for start in range(0, len(y), 32):
                batch = x[start:start + 32]
                loss = nn.functional.cross_entropy(model(**batch.tensors).logits, y[start:start + 32])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        members.append(model.eval())
    path = tmp_path_factory.mktemp("text-teachers") / "text-ensemble.pt"
    save_ensemble(members, path, dict(x[:2].tensors), {"class_names": TOKEN_CLASSES})
    return path


TEXT_RUN = ["--target", "onnxruntime", "--student", "hf:teacher/0.5", "--epochs", "2", "--batch-size", "64",
            "--warmup", "0.02", "--duration", "0.05", "--rounds", "1", "--batch-sizes", "1,8,64", "--no-progress"]


@pytest.fixture(scope="session")
def text_run(tmp_path_factory, text_ensemble, token_data) -> Path:
    """``compress`` on the text ensemble and token_data (an hf:teacher/0.5 student exported to onnxruntime with
    both int64 inputs), once per session: the run's --out folder."""
    from compressor.cli import main

    out = tmp_path_factory.mktemp("text-run") / "run"
    assert main(["--teacher", str(text_ensemble), "--data", f"hf:{token_data}", "--out", str(out), *TEXT_RUN]) == 0
    return out
