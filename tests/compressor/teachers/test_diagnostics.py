"""compressor/diagnostics.py: real ensembles trained here, well and badly; the fit on logits with a known answer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import save_ensemble
from compressor.teachers.diagnostics import TRANSFER_SAMPLE, diagnose, disagreement, fit_ensemble, transfer_sample
from compressor.teachers.formats import load_ensemble
from tests.conftest import fit


def splits(digits_data):
    as_tensors = [(torch.from_numpy(part.x), torch.from_numpy(part.y)) for part in (digits_data.train,
                                                                                     digits_data.val)]
    return as_tensors[0], as_tensors[1]


def diagnosis(ensemble, digits_data) -> dict:
    (x, y), (xv, yv) = splits(digits_data)
    return diagnose(ensemble, ensemble.member_logits(xv), yv, transfer_logits=ensemble.member_logits(x),
                    transfer_labels=y)


def test_a_well_fitted_ensemble_raises_no_transfer_warning(digits_ensemble, digits_data):
    report = diagnosis(load_ensemble(digits_ensemble), digits_data)
    transfer = report["transfer"]
    assert transfer["examples"] == len(digits_data.train)
    assert transfer["accuracy"] > 0.97 and transfer["accuracy"] >= transfer["heldout_accuracy"]
    assert not [w for w in report["warnings"] if "transfer set" in w]
    for member in report["members"]:
        assert set(member) == {"name", "accuracy", "nll", "ece"} and 0 <= member["ece"] <= 1


def test_an_undertrained_ensemble_is_named_before_any_student_trains(digits_data, tmp_path):
    (x, y), _ = splits(digits_data)
    torch.manual_seed(0)
    members = [fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), x, y, epochs=1,
                   seed=k, lr=3e-4) for k in range(2)]
    save_ensemble(members, tmp_path / "weak.pt", x[:2])
    report = diagnosis(load_ensemble(tmp_path / "weak.pt"), digits_data)
    text = " ".join(report["warnings"])
    assert "disagree with the labels on" in text and "look undertrained" in text, report["transfer"]


def test_disagreement_is_zero_for_copies_and_symmetric():
    torch.manual_seed(0)
    logits = torch.randn(1, 50, 4).repeat(3, 1, 1)  # three identical members
    assert disagreement(logits) == {"pairwise": [[0.0] * 3] * 3, "mean": 0.0}
    logits[2] = torch.randn(50, 4)
    pairwise = torch.tensor(disagreement(logits)["pairwise"])
    assert torch.equal(pairwise, pairwise.T) and pairwise[0, 2] > 0 and pairwise[0, 1] == 0


def test_the_fit_finds_the_informative_member_and_cools_an_overconfident_one():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (4000,), generator=generator)
    signal = 1.5 * torch.nn.functional.one_hot(labels, 5).double() + torch.randn(4000, 5, generator=generator,
                                                                                 dtype=torch.float64)
    noise = torch.randn(4000, 5, generator=generator, dtype=torch.float64)
    fitted = fit_ensemble(torch.stack([signal * 6.0, noise]), labels)  # a good but 6x over-confident member
    assert fitted["weights"][0] > 0.9 and fitted["temperature"] > 3.0
    assert fitted["nll_after"] < fitted["nll_before"] and fitted["ece_after"] < fitted["ece_before"]


def test_the_fit_never_reports_worse_than_where_it_started():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (300,), generator=generator)
    logits = torch.randn(2, 300, 3, generator=generator, dtype=torch.float64)
    fitted = fit_ensemble(logits, labels)
    assert fitted["nll_after"] <= fitted["nll_before"]


def test_the_transfer_sample_is_seeded_sorted_and_skips_unlabeled_rows():
    labels = torch.arange(3 * TRANSFER_SAMPLE) % 7 - 1  # every 7th row unlabeled
    rows = transfer_sample(labels, seed=0)
    assert len(rows) == TRANSFER_SAMPLE and bool((labels[rows] >= 0).all())
    assert torch.equal(rows, rows.sort().values) and torch.equal(rows, transfer_sample(labels, seed=0))
    assert not torch.equal(rows, transfer_sample(labels, seed=1))
    assert torch.equal(transfer_sample(labels[:100]), torch.nonzero(labels[:100] >= 0).flatten())


@pytest.mark.parametrize("combine", ["arithmetic", "geometric"])
def test_the_fit_works_for_both_ways_of_combining(combine):
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 4, (500,), generator=generator)
    logits = 3.0 * torch.nn.functional.one_hot(labels, 4).double()[None].repeat(2, 1, 1) \
        + torch.randn(2, 500, 4, generator=generator, dtype=torch.float64)
    fitted = fit_ensemble(logits, labels, combine)
    assert abs(sum(fitted["weights"]) - 1) < 1e-5 and fitted["nll_after"] <= fitted["nll_before"]
