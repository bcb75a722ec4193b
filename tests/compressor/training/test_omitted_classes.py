"""Tests for compressor/omitted_classes.py: class lists, transfer-set masks, and the bias fix of Hinton et al. §3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from compressor.training import omitted_classes
from compressor.data.datasets import FASHION_MNIST_CLASSES
from compressor.core.errors import CompressorError
from compressor.training.omitted_classes import (
    apply_bias_shift,
    fit_bias_shift,
    keep_rows,
    parse_class_list,
)
from compressor.students import create_student


def planted(n: int = 4000, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (n, c) of a good classifier (true class +4, noise 1) and labels (n,), float32."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) + 4.0 * nn.functional.one_hot(y, c)
    return logits, y


def brute_force(logits: torch.Tensor, y: torch.Tensor, classes, max_shift: float, step: float) -> tuple[float, int]:
    """The oracle: argmax of the shifted logits at every grid point, the first best shift and its correct count."""
    onehot = torch.zeros(logits.shape[1])
    onehot[list(classes)] = 1.0
    best = None
    for k in range(round(max_shift / step) + 1):
        s = torch.tensor(k * step, dtype=torch.float64).float()
        correct = int(((logits + s * onehot).argmax(1) == y).sum())
        if best is None or correct > best[1]:
            best = (float(k * step), correct)
    return best


# ------------------------------------------------------------------------------------------------------------------
# parse_class_list and keep_rows


def test_class_lists_take_indices_and_names_and_come_back_sorted_and_unique():
    assert parse_class_list("3", None, 10) == (3,)
    assert parse_class_list("8, 7,7", None, 10) == (7, 8)
    assert parse_class_list(" Dress ,coat", FASHION_MNIST_CLASSES, 10) == (3, 4)
    assert parse_class_list("T-SHIRT/TOP,9", FASHION_MNIST_CLASSES, 10) == (0, 9)


@pytest.mark.parametrize("spec, names, needles", [
    ("10", None, ["'10'", "0 to 9"]),
    ("dres", FASHION_MNIST_CLASSES, ["'dres'", "dress, coat"]),  # a typo: the valid names are listed
    ("dress", None, ["'dress'", "0 to 9"]),  # names without class names: only indices are valid
    ("-1", None, ["'-1'", "0 to 9"]),
    ("3,,5", None, ["empty entry", "0 to 9"]),
    ("", None, ["empty"]),
    (",".join(map(str, range(10))), None, ["all 10 classes", "at most 9"]),
])
def test_bad_class_lists_say_which_token_and_what_is_valid(spec, names, needles):
    with pytest.raises(CompressorError) as excinfo:
        parse_class_list(spec, names, 10)
    assert all(needle in str(excinfo.value) for needle in needles), str(excinfo.value)


def test_keep_rows_drops_the_omitted_labels_and_keeps_unlabeled_rows():
    y = np.array([3, 0, -1, 5, 3, 9])
    want = np.array([False, True, True, False, False, True])
    got = keep_rows(y, (3, 5))
    assert isinstance(got, np.ndarray) and got.dtype == bool and np.array_equal(got, want)
    got_t = keep_rows(torch.from_numpy(y), (3, 5))
    assert got_t.dtype == torch.bool and torch.equal(got_t, torch.from_numpy(want))
    assert keep_rows(torch.from_numpy(y), ()).all()


# ------------------------------------------------------------------------------------------------------------------
# fit_bias_shift


def test_the_fit_recovers_a_shift_planted_on_good_logits():
    logits, y = planted()
    classes = (3,)
    broken = logits.clone()
    broken[:, 3] -= 2.5  # the student under-rates class 3 as one trained without threes does
    fix = fit_bias_shift(broken, y, classes)
    assert fix.shift == pytest.approx(2.5, abs=0.5)
    clean_accuracy = float((logits.argmax(1) == y).double().mean())
    assert fix.val_accuracy_before < clean_accuracy - 0.03  # the planted bias really hurt
    assert fix.val_accuracy_after >= clean_accuracy - 0.002
    # several classes at once, as with only 7s and 8s kept: the other eight under-rated together
    broken = logits.clone()
    omitted = tuple(c for c in range(10) if c not in (7, 8))
    broken[:, list(omitted)] -= 6.0
    fix = fit_bias_shift(broken, y, omitted)
    assert fix.shift == pytest.approx(6.0, abs=0.6) and fix.classes == omitted


@pytest.mark.parametrize("seed", range(4))
def test_the_fit_is_the_first_best_grid_point_of_the_brute_force_argmax_ties_included(seed):
    # small whole-number logits: many exact ties between classes and between grid points
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (300, 6), generator=g).float()
    y = torch.randint(0, 6, (300,), generator=g)
    classes = (1, 4) if seed % 2 else (5,)
    fix = fit_bias_shift(logits, y, classes, max_shift=6.0, step=0.5)
    shift, correct = brute_force(logits, y, classes, 6.0, 0.5)
    assert fix.shift == shift and fix.val_accuracy_after == correct / 300
    assert fix.val_accuracy_before == float((logits.argmax(1) == y).double().mean())
    assert fix.val_accuracy_after >= fix.val_accuracy_before  # the fit never lowers validation accuracy
    assert fix.searched == (0.0, 6.0, 0.5)


def test_a_model_that_needs_no_fix_gets_zero():
    logits, y = planted()
    perfect = 10.0 * nn.functional.one_hot(y, 10).float()  # every row right at shift 0 and at small shifts
    fix = fit_bias_shift(perfect, y, (3,))
    assert fix.shift == 0.0 and fix.val_accuracy_before == fix.val_accuracy_after == 1.0
    over = logits.clone()
    over[:, 3] += 3.0  # over-rated already: raising it further only hurts
    assert fit_bias_shift(over, y, (3,)).shift == 0.0


def test_unlabeled_rows_are_ignored_and_a_split_without_labels_is_refused():
    logits, y = planted(1000)
    logits[:, 2] -= 3.0
    fix = fit_bias_shift(logits, y, (2,))
    noise = torch.randn(500, 10) + 50.0 * nn.functional.one_hot(torch.full((500,), 2), 10)
    padded = fit_bias_shift(torch.cat([logits, noise]), torch.cat([y, torch.full((500,), -1)]), (2,))
    assert padded == fix
    with pytest.raises(CompressorError, match="no labeled rows"):
        fit_bias_shift(logits, torch.full((1000,), -1), (2,))


def test_chunking_the_grid_does_not_change_the_answer(monkeypatch):
    logits, y = planted(2000, seed=3)
    logits[:, [0, 6]] -= 4.0
    whole = fit_bias_shift(logits, y, (0, 6), step=0.01)
    monkeypatch.setattr(omitted_classes, "_GRID_CHUNK_ELEMENTS", 2000 * 7)  # 7 shifts per chunk, a ragged tail
    assert fit_bias_shift(logits, y, (0, 6), step=0.01) == whole


def test_bad_fit_arguments_are_refused():
    logits, y = planted(100)
    with pytest.raises(CompressorError, match="out of range"):
        fit_bias_shift(logits, y, (10,))
    with pytest.raises(CompressorError, match="do not fit"):
        fit_bias_shift(logits, y[:50], (3,))
    with pytest.raises(CompressorError, match="step"):
        fit_bias_shift(logits, y, (3,), step=0.0)
    with pytest.raises(CompressorError, match="no classes"):
        fit_bias_shift(logits, y, ())


def test_bias_fix_serialises_to_json():
    logits, y = planted(200)
    fix = fit_bias_shift(logits, y, (3, 5), max_shift=2.0, step=0.25)
    data = json.loads(json.dumps(fix.to_dict()))
    assert data["classes"] == [3, 5] and data["searched"] == [0.0, 2.0, 0.25] and data["shift"] == fix.shift


# ------------------------------------------------------------------------------------------------------------------
# apply_bias_shift


@pytest.mark.parametrize("spec", ["mlp:32x32", "cnn:4x8"])
def test_applying_the_shift_moves_exactly_those_logits_by_exactly_the_shift(spec):
    torch.manual_seed(0)
    model = create_student(spec, (1, 8, 8), 10).eval()
    x = torch.rand(16, 1, 8, 8)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    bias_before = head.bias.detach().clone()
    with torch.no_grad():
        before = model(x)  # (16, 10)
    assert apply_bias_shift(model, (2, 7), 1.75) is model
    others = [c for c in range(10) if c not in (2, 7)]
    assert torch.equal(head.bias.detach()[others], bias_before[others])
    assert torch.equal(head.bias.detach()[[2, 7]], bias_before[[2, 7]] + 1.75)
    with torch.no_grad():
        after = model(x)
    assert torch.equal(after[:, others], before[:, others])
    torch.testing.assert_close(after[:, [2, 7]] - before[:, [2, 7]], torch.full((16, 2), 1.75), rtol=0, atol=1e-5)


def test_the_fitted_shift_applied_to_the_model_gives_the_fitted_accuracy():
    torch.manual_seed(0)
    model = create_student("mlp:32x32", (1, 8, 8), 10).eval()
    x = torch.rand(500, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)  # (500, 10)
    others = torch.cat([logits[:, :4], logits[:, 5:]], 1).max(1).values  # (500,)
    planted_shift = float((others - logits[:, 4]).quantile(0.3))  # class 4 under-rated by this: 30% of rows
    y = (logits + planted_shift * nn.functional.one_hot(torch.tensor(4), 10)).argmax(1)
    fix = fit_bias_shift(logits, y, (4,), max_shift=2 * planted_shift, step=planted_shift / 500)
    assert fix.val_accuracy_before < 0.8 and fix.val_accuracy_after > 0.99
    apply_bias_shift(model, fix.classes, fix.shift)
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).double().mean()) == pytest.approx(fix.val_accuracy_after)


@pytest.mark.parametrize("model, needle", [
    (nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), "no nn.Linear"),
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False)), "no bias"),
    (nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (8, 1, 1)), nn.Conv2d(8, 10, 1), nn.Flatten()), "Conv2d"),
])
def test_models_without_a_linear_head_with_a_bias_are_refused_with_the_families_that_work(model, needle):
    with pytest.raises(CompressorError) as excinfo:
        apply_bias_shift(model, (3,), 1.0)
    assert needle in str(excinfo.value) and "mlp, cnn" in str(excinfo.value)


def test_a_class_beyond_the_output_layer_is_refused():
    model = create_student("mlp:8", (4,), 3)
    with pytest.raises(CompressorError, match=r"out of range .* 0 to 2"):
        apply_bias_shift(model, (3,), 1.0)
    with pytest.raises(CompressorError, match="out of range"):
        apply_bias_shift(model, (-1,), 1.0)
