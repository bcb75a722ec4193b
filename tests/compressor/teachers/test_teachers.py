"""Teacher files: the save_ensemble archive, manifests, pickles (refused unless trusted), validation."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from compressor import save_ensemble
from compressor.core.errors import CompressorError
from compressor.teachers.formats import load_ensemble, sniff_format


def tiny(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


class NaNNet(nn.Module):
    def forward(self, x):
        return torch.full((x.shape[0], 10), float("nan"))


class Marker:
    """Unpickling this touches a file: proof of whether a pickle was ever unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_archive_round_trip_keeps_members_and_metadata(tmp_path):
    members = [tiny(seed=0), tiny(seed=1)]
    x = torch.rand(5, 1, 8, 8)
    path = save_ensemble(members, tmp_path / "e.pt", x[:2],
                         {"class_names": list("abcdefghij"), "normalisation": {"mean": [0.5], "std": [0.25]},
                          "dataset": "digits", "weights": [2.0, 1.0]})
    assert sniff_format(path) == "torchscript"
    ensemble = load_ensemble(path)
    assert [m.name for m in ensemble.members] == ["member-0", "member-1"]
    assert ensemble.input_shape == (1, 8, 8) and ensemble.num_classes == 10
    assert ensemble.class_names == list("abcdefghij") and ensemble.weights == [2.0, 1.0]
    assert ensemble.parameters == sum(p.numel() for m in members for p in m.parameters())
    expected = torch.stack([m(x) for m in members])
    assert torch.allclose(ensemble.member_logits(x), expected, atol=1e-6)
    progress: list[int] = []  # one call per batch and member, with that batch's row count: each batch read once
    assert torch.allclose(ensemble.member_logits(x, batch_size=2, on_batch=progress.append), expected, atol=1e-6)
    assert progress == [2, 2, 2, 2, 1, 1]
    # the untraced module predicts the mixture, as the traced one does
    assert torch.allclose(ensemble.eager_module()(x), ensemble.log_probs(expected), atol=1e-6)
    # the members' architecture is recorded as data (for from-teacher students)
    assert ensemble.members[0].architecture[1]["type"] == "Linear"
    assert not list(tmp_path.glob("*.tmp"))


def test_mixture_is_weighted_mean_of_probabilities(tmp_path):
    members = [tiny(seed=0), tiny(seed=1)]
    x = torch.rand(4, 1, 8, 8)
    ensemble = load_ensemble(save_ensemble(members, tmp_path / "e.pt", x[:2], {"weights": [3.0, 1.0]}))
    p = 0.75 * members[0](x).softmax(1) + 0.25 * members[1](x).softmax(1)
    assert torch.allclose(ensemble.log_probs(ensemble.member_logits(x)).exp(), p, atol=1e-6)


@pytest.mark.parametrize("damage", ["truncate", "random", "empty"])
def test_damaged_files_name_the_file(tmp_path, damage, rng):
    good = save_ensemble([tiny()], tmp_path / "good.pt", torch.rand(2, 1, 8, 8))
    bad = tmp_path / "bad.pt"
    raw = good.read_bytes()
    bad.write_bytes({"truncate": raw[: len(raw) // 2], "random": rng.bytes(4096), "empty": b""}[damage])
    with pytest.raises(CompressorError, match="bad.pt"):
        load_ensemble(bad)


def test_missing_file(tmp_path):
    with pytest.raises(CompressorError, match="no such file"):
        load_ensemble(tmp_path / "absent.pt")


def test_pickle_is_refused_without_trust_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    for name, write in (("raw.pkl", lambda p: p.write_bytes(pickle.dumps(Marker(str(marker))))),
                        ("torch.pt", lambda p: torch.save(Marker(str(marker)), p))):
        with pytest.raises(CompressorError, match="--trust-pickle"):
            load_ensemble_at(tmp_path / name, write)
        assert not marker.exists(), f"{name} was unpickled without --trust-pickle"


def load_ensemble_at(path, write):
    write(path)
    return load_ensemble(path)


def test_trusted_pickle_of_modules_loads(tmp_path):
    torch.save([tiny(seed=0), tiny(seed=1)], tmp_path / "members.pt")
    ensemble = load_ensemble(tmp_path / "members.pt", trust_pickle=True)
    ensemble.validate(torch.rand(3, 1, 8, 8), "test data")
    assert len(ensemble.members) == 2 and ensemble.num_classes == 10


def test_members_with_different_class_counts_are_named(tmp_path):
    x = torch.rand(2, 1, 8, 8)
    for k, classes in enumerate((10, 5)):
        torch.jit.save(torch.jit.trace(tiny(classes), x), str(tmp_path / f"m{k}.pt"))
    (tmp_path / "ensemble.toml").write_text('[[members]]\npath = "m0.pt"\n[[members]]\npath = "m1.pt"\n')
    ensemble = load_ensemble(tmp_path / "ensemble.toml")
    with pytest.raises(CompressorError, match=r"'m0' 10, 'm1' 5"):
        ensemble.validate(x, "test data")


def test_nan_logits_name_the_member(tmp_path):
    path = save_ensemble_unchecked(tmp_path, [tiny(), NaNNet()])
    with pytest.raises(CompressorError, match="member-1.*NaN"):
        load_ensemble(path)


def save_ensemble_unchecked(tmp_path, members):
    """save_ensemble itself does not reject NaN members: the loader must."""
    return save_ensemble(members, tmp_path / "nan.pt", torch.rand(2, 1, 8, 8))


def test_manifest_mixes_torchscript_export_and_onnx_members(tmp_path):
    x = torch.rand(4, 1, 8, 8)
    models = [tiny(seed=s) for s in range(3)]
    torch.jit.save(torch.jit.script(models[0]), str(tmp_path / "a.pt"))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(models[1], (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "b.pt2"))
    torch.onnx.export(models[2], (x,), str(tmp_path / "c.onnx"), input_names=["input"], dynamo=False,
                      dynamic_axes={"input": {0: "batch"}})
    (tmp_path / "ensemble.toml").write_text(
        '[ensemble]\ninput_shape = [1, 8, 8]\nclass_names = ["0","1","2","3","4","5","6","7","8","9"]\n'
        '[[members]]\npath = "a.pt"\nweight = 2.0\n'
        '[[members]]\npath = "b.pt2"\n'
        '[[members]]\npath = "c.onnx"\ntemperature = 2.0\n')
    with pytest.raises(CompressorError, match="b.pt2.*--trust-pickle"):  # torch.export.load unpickles
        load_ensemble(tmp_path / "ensemble.toml")
    ensemble = load_ensemble(tmp_path / "ensemble.toml", trust_pickle=True)
    assert [m.kind for m in ensemble.members] == ["torchscript", "torch.export", "onnx"]
    assert ensemble.weights == [2.0, 1.0, 1.0]
    got = ensemble.member_logits(x)
    with torch.no_grad():
        expected = torch.stack([models[0](x), models[1](x), models[2](x) / 2.0])
    assert torch.allclose(got, expected, atol=1e-5)


def test_data_of_the_wrong_shape_is_explained(tmp_path):
    ensemble = load_ensemble(save_ensemble([tiny()], tmp_path / "e.pt", torch.rand(2, 1, 8, 8)))
    with pytest.raises(CompressorError, match=r"shape \[1, 28, 28\].*expects|declares input shape \[1, 8, 8\]"):
        ensemble.validate(torch.rand(2, 1, 28, 28), "--data fashion")


def test_save_ensemble_metadata_is_plain_json(tmp_path):
    import zipfile

    path = save_ensemble([tiny()], tmp_path / "e.pt", torch.rand(2, 1, 8, 8), {"dataset": "digits"})
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("extra/compressor.json"))
        meta = json.loads(archive.read(name))
    assert meta["format"] == "compressor.ensemble" and meta["input_shape"] == [1, 8, 8]
    assert meta["dataset"] == "digits" and np.isclose(meta["members"][0]["parameters"], 64 * 16 + 16 + 16 * 10 + 10)


def test_bf16_teachers_give_float32_logits_close_to_fp32_but_not_the_same(digits_ensemble, digits_data):
    ensemble = load_ensemble(digits_ensemble)
    x = torch.from_numpy(digits_data.val.x[:64])
    full, half = ensemble.member_logits(x), ensemble.member_logits(x, precision="bf16")
    assert half.dtype == torch.float32 and half.shape == full.shape
    assert not torch.equal(half, full)  # the members really ran in bfloat16
    scale = float(full.abs().max())
    assert float((half - full).abs().max()) < 0.05 * scale  # bfloat16 keeps 8 significant bits
    assert (half.argmax(-1) == full.argmax(-1)).float().mean() > 0.95
