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


def logits_with_accuracy(labels: torch.Tensor, accuracy: float, members: int = 2, seed: int = 0) -> torch.Tensor:
    """Member logits (K, N, C) whose top-1 is the label on the first ``accuracy`` share of rows, the next class
    on the others, every member alike, at a confident margin."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    right = torch.randperm(n, generator=generator) < round(accuracy * n)  # (N,)
    top = torch.where(right, labels, (labels + 1) % 10)
    logits = torch.randn(members, n, 10, generator=generator)
    logits[:, torch.arange(n), top] += 6.0
    return logits


def synthetic(path, accuracies: dict[str, float], **flags) -> dict:
    """diagnose() of the two-member ensemble at ``path`` on synthetic logits: 4,000 validation, 4,000 test and 4,000
    transfer rows at the given accuracies."""
    labels = {split: torch.arange(4000) % 10 for split in accuracies}
    logits = {split: logits_with_accuracy(labels[split], accuracy, seed=k)
              for k, (split, accuracy) in enumerate(accuracies.items())}
    return diagnose(load_ensemble(path), logits["val"], labels["val"], transfer_logits=logits["transfer"],
                    transfer_labels=labels["transfer"], test_logits=logits["test"], test_labels=labels["test"],
                    **flags)


def test_teachers_that_saw_the_validation_rows_get_a_note_not_a_false_undertrained_alarm(digits_ensemble):
    # the shape of the Fashion-MNIST ensemble: validation seen in training, the test split not
    report = synthetic(digits_ensemble, {"val": 0.96, "test": 0.90, "transfer": 0.958})
    assert report["seen_validation"]["detected"] and report["split"] == "half of the test split"
    text = " ".join(report["warnings"])
    assert "trained on the validation rows" in text and "look undertrained" not in text
    assert report["transfer"]["heldout_accuracy"] == pytest.approx(0.90, abs=0.02)  # judged against unseen test rows


def test_validation_above_test_but_far_below_the_training_rows_is_not_taken_for_seen_rows(digits_ensemble):
    # benchmarks/zoo.py's quick Fashion-MNIST CNNs, trained on compress's own training rows (84.7% there): 82.5% on
    # validation, 80.1% on the official test file, a gap beyond 2 standard errors, but validation scores below the
    # training rows as unseen rows do (the test file is simply drawn a little differently)
    report = synthetic(digits_ensemble, {"val": 0.825, "test": 0.801, "transfer": 0.847})
    seen = report["seen_validation"]
    assert seen["gap"] > seen["two_standard_errors"] and not seen["detected"] and report["split"] == "val"
    assert "validation rows" not in " ".join(report["warnings"])


def test_an_undertrained_ensemble_still_warns_and_an_unseen_well_trained_one_is_quiet(digits_ensemble):
    weak = synthetic(digits_ensemble, {"val": 0.90, "test": 0.90, "transfer": 0.905})
    assert "look undertrained" in " ".join(weak["warnings"]) and not weak["seen_validation"]["seen"]
    fine = synthetic(digits_ensemble, {"val": 0.93, "test": 0.93, "transfer": 0.99})
    text = " ".join(fine["warnings"])
    assert "undertrained" not in text and "validation rows" not in text and "transfer set" not in text
    assert fine["split"] == "val" and not fine["seen_validation"]["seen"]


def test_the_user_can_say_the_teachers_saw_validation(digits_ensemble):
    report = synthetic(digits_ensemble, {"val": 0.93, "test": 0.93, "transfer": 0.99}, teachers_saw_val=True)
    assert report["seen_validation"]["flagged"] and not report["seen_validation"]["detected"]
    assert "--teachers-saw-val says so" in report["warnings"][0]
