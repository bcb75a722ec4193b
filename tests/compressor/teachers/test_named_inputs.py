"""Text teachers: transformers models saved with named int64 inputs, loaded back without unpickling, and members
that disagree on their inputs refused in one line."""

from __future__ import annotations

import pytest
import torch

from compressor.core.errors import CompressorError
from compressor.data.datasets import load_dataset
from compressor.teachers.formats import load_ensemble

transformers = pytest.importorskip("transformers")


def test_a_saved_text_ensemble_reproduces_its_members_at_any_length(text_ensemble, token_data, tmp_path):
    from compressor import save_ensemble
    from tests.conftest import tiny_bert

    ensemble = load_ensemble(text_ensemble)
    assert ensemble.input_names == ["input_ids", "attention_mask"] and ensemble.num_classes == 3
    assert ensemble.metadata["vocab_size"] == 32 and ensemble.metadata["max_length"] == 32
    assert ensemble.metadata["hf_config"]["model_type"] == "bert" and ensemble.input_shape is None
    x = load_dataset(f"hf:{token_data}").test.x
    logits = ensemble.member_logits(x, batch_size=64)  # batches of several lengths through the traced members
    assert logits.shape == (3, 200, 3) and torch.isfinite(logits).all()
    model = tiny_bert(7).eval()
    save_ensemble([model], tmp_path / "one.pt", dict(x[:2].tensors))  # traced on 2 rows of one length
    traced = load_ensemble(tmp_path / "one.pt")
    for rows in (slice(0, 1), slice(0, 64), slice(100, 200)):
        with torch.no_grad():
            eager = model(**x[rows].tensors).logits
        assert torch.allclose(traced.member_logits(x[rows])[0], eager, atol=1e-5)


def test_a_manifest_of_onnx_members_with_different_inputs_is_refused(tmp_path, text_ensemble):
    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(32, 4), torch.nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask):
            return self.head((self.embed(input_ids) * attention_mask[..., None]).sum(1))

    ids = torch.ones(2, 5, dtype=torch.int64)
    for name, names in (("a", ["input_ids", "attention_mask"]), ("b", ["input_ids", "mask"])):
        torch.onnx.export(Bag(), (ids, ids), str(tmp_path / f"{name}.onnx"), input_names=names, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    manifest = tmp_path / "ensemble.toml"
    manifest.write_text('[ensemble]\ninputs = ["input_ids", "attention_mask"]\nvocab_size = 32\nmax_length = 16\n'
                        '[[members]]\npath = "a.onnx"\n[[members]]\npath = "b.onnx"\n')
    with pytest.raises(CompressorError, match="member 'b' .* takes the inputs input_ids, mask but the ensemble "
                                              "declares input_ids, attention_mask"):
        load_ensemble(manifest)
    manifest.write_text(manifest.read_text().replace('path = "b.onnx"', 'path = "a.onnx"\nname = "a2"'))
    ensemble = load_ensemble(manifest)
    assert ensemble.member_logits(load_dataset_x(ids)).shape == (2, 2, 3)


def load_dataset_x(ids):
    from compressor.core.inputs import NamedInputs

    return NamedInputs({"input_ids": ids, "attention_mask": ids}, torch.full((len(ids),), ids.shape[1]))
