"""Transfer sets that omit classes, and the bias fix (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network", §3).

A distilled student can learn a class it never sees in the transfer set, because the teacher's soft targets on the
other classes say how much each image looks like it. What it gets wrong is the class's *prior*: the class is never
the answer during training, so its output bias ends up too low. The paper's MNIST numbers: with every 3 omitted
from the transfer set, the distilled 2×800 net made 206 test errors, 133 of them on the 1,010 threes; raising the
3's bias by 3.5 brought that to 109 errors, 14 on threes. With only 7s and 8s in the transfer set the test error
was 47.3%; reducing the biases of 7 and 8 by 7.6 (equivalently, raising every omitted class's bias by 7.6, since
softmax ignores a shift shared by all classes) brought it to 13.2%.

The pieces, in the order a run uses them:

- :func:`parse_class_list` — ``"3"`` / ``"3,5"`` / ``"dress,coat"`` → sorted class indices;
- :func:`keep_rows` — the rows of a transfer set whose label is not omitted;
- :func:`fit_bias_shift` — the one scalar added to the omitted classes' logits that maximises top-1 accuracy on a
  validation split that has every class (a grid search, so an already-good model gets 0);
- :func:`apply_bias_shift` — writes that scalar into the student's output bias, so the exported model carries it.

Example::

    omitted = parse_class_list("dress", data.class_names, 10)  # (3,)
    mask = keep_rows(y_train, omitted)  # (N,) bool
    train_student(student, x_train[mask], y_train[mask], teacher_logits[:, mask], x_val, y_val, ...)
    fix = fit_bias_shift(predict_logits(student, x_val), y_val, omitted)
    apply_bias_shift(student, omitted, fix.shift)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from compressor.config import RunConfig
from compressor.core.errors import CompressorError
from compressor.data.datasets import Dataset
from compressor.teachers.ensemble import Ensemble

# The student families whose output layer is an nn.Linear with a bias, i.e. the ones apply_bias_shift can fix.
FIXABLE_FAMILIES = "mlp, cnn, and from-teacher when the teacher ends in a Linear"
_GRID_CHUNK_ELEMENTS = 1 << 22  # (shifts × rows) booleans per chunk of the search: 4 MiB


def parse_class_list(spec: str, class_names: list[str] | None, num_classes: int) -> tuple[int, ...]:
    """The classes named by ``spec``, as sorted unique indices in ``[0, num_classes)``.

    ``spec`` is a comma-separated list of tokens; a whole number is a class index, anything else a class name matched
    case-insensitively against ``class_names``. ``"3"``, ``"3,5"`` and ``"dress, coat"`` (Fashion-MNIST) are valid.
    Raises :class:`CompressorError` naming the bad token and what is valid, and for a list that names every class
    (a transfer set that omits them all is empty).
    """
    names = {name.strip().lower(): k for k, name in enumerate(class_names or [])}
    valid = f"class indices 0 to {num_classes - 1}" + (f" or names ({', '.join(class_names)})" if class_names else "")
    tokens = [token.strip() for token in str(spec).split(",")]
    if not any(tokens):
        raise CompressorError(f"the class list {spec!r} is empty; give {valid}, separated by commas")
    indices = set()
    for token in tokens:
        if token.isdigit():
            index = int(token)
            if index >= num_classes:
                raise CompressorError(f"class {token!r} in {spec!r} is out of range; give {valid}")
        elif token.lower() in names:
            index = names[token.lower()]
        else:
            what = "an empty entry" if not token else f"class {token!r}"
            raise CompressorError(f"{what} in {spec!r} is not a known class; give {valid}")
        indices.add(index)
    if len(indices) >= num_classes:
        raise CompressorError(f"the class list {spec!r} names all {num_classes} classes, which would leave no "
                              f"transfer data; omit at most {num_classes - 1} of them")
    return tuple(sorted(indices))


def keep_rows(y, omitted: tuple[int, ...]):
    """Boolean mask ``(N,)`` of the rows of ``y`` ``(N,)`` whose label is not in ``omitted``.

    A numpy array gives a numpy mask, a tensor a torch.bool tensor on its device. Unlabeled rows (label -1) are
    kept: they carry soft targets only and belong to no class.
    """
    if isinstance(y, Tensor):
        omitted_t = torch.tensor(omitted, dtype=y.dtype, device=y.device)  # (k,)
        return ~torch.isin(y, omitted_t)
    return ~np.isin(np.asarray(y), np.asarray(omitted, dtype=np.int64))


@dataclass(frozen=True)
class BiasFix:
    """The shift :func:`fit_bias_shift` chose and what it did to validation accuracy (fractions in [0, 1])."""

    classes: tuple[int, ...]
    shift: float  # added to the logits (output biases) of ``classes``
    val_accuracy_before: float
    val_accuracy_after: float
    searched: tuple[float, float, float]  # (low, high, step) of the grid

    def to_dict(self) -> dict:
        out = asdict(self)
        out["classes"], out["searched"] = list(self.classes), list(self.searched)
        return out


def fit_bias_shift(val_logits: Tensor, y_val: Tensor, classes: tuple[int, ...], max_shift: float = 20.0,
                   step: float = 0.05) -> BiasFix:
    """The scalar ``s`` in ``{0, step, 2·step, ..., max_shift}`` that, added to the logits of ``classes``, gives the
    highest top-1 accuracy on ``val_logits`` ``(N, C)`` with labels ``y_val`` ``(N,)`` (-1 = unlabeled, ignored).

    Ties go to the smallest shift, so a model that needs no fix gets 0 and the fit never lowers validation accuracy.
    The paper found 3.5 for MNIST without threes and 7.6 with only 7s and 8s (see the module docstring).

    The grid is searched all at once without materialising shifted logits: per row, adding ``s`` to the classes
    changes the prediction only through the contest between the best logit inside the set and the best outside it,
    so each grid point costs one comparison per row, done in chunks of ``(shifts, N)`` booleans. The result equals
    ``argmax(logits + s · onehot(classes))`` exactly, ties between equal logits included (the lower index wins).
    """
    if val_logits.ndim != 2 or y_val.shape != val_logits.shape[:1]:
        raise CompressorError(f"validation logits {tuple(val_logits.shape)} and labels {tuple(y_val.shape)} do not "
                              f"fit; expected (N, C) and (N,)")
    num_classes = val_logits.shape[1]
    _check_classes(classes, num_classes, "the validation logits' columns")
    if not (step > 0 and math.isfinite(step) and max_shift >= 0 and math.isfinite(max_shift)):
        raise CompressorError(f"bias shift search max_shift={max_shift}, step={step} is invalid; use max_shift >= 0 "
                              f"and step > 0")
    labeled = y_val >= 0  # (N,)
    if not bool(labeled.any()):
        raise CompressorError("the validation split has no labeled rows, so no bias shift can be fitted; label it")
    logits, y = val_logits[labeled].detach().float().cpu(), y_val[labeled].long().cpu()  # (n, C), (n,)
    inside = torch.zeros(num_classes, dtype=torch.bool)
    inside[list(classes)] = True  # (C,)
    if bool(inside.all()):  # shifting every class changes no prediction
        accuracy = float((logits.argmax(1) == y).double().mean())
        return BiasFix(tuple(classes), 0.0, accuracy, accuracy, (0.0, float(max_shift), float(step)))

    neg_inf = torch.tensor(float("-inf"))
    in_max, in_arg = torch.where(inside, logits, neg_inf).max(1)  # (n,) best logit inside the set, its class
    out_max, out_arg = torch.where(inside, neg_inf, logits).max(1)  # (n,) best outside
    in_right, out_right = in_arg == y, out_arg == y  # (n,) would the row be right if that side wins

    steps = math.floor(max_shift / step + 1e-9)
    shifts = torch.arange(steps + 1, dtype=torch.float64) * step  # (S,)
    correct = torch.empty(steps + 1, dtype=torch.int64)  # (S,) right rows per shift
    chunk = max(1, _GRID_CHUNK_ELEMENTS // len(y))
    for start in range(0, steps + 1, chunk):
        s = shifts[start:start + chunk].float()[:, None]  # (s, 1)
        shifted = in_max[None, :] + s  # (s, n): float32, as the model's own logits + bias would be
        inside_wins = (shifted > out_max) | ((shifted == out_max) & (in_arg < out_arg))  # (s, n)
        correct[start:start + chunk] = torch.where(inside_wins, in_right, out_right).sum(1)
    best = int(torch.nonzero(correct == correct.max())[0])  # the first (smallest) shift among the best
    n = len(y)
    return BiasFix(tuple(classes), round(float(shifts[best]), 10), float(correct[0]) / n, float(correct[best]) / n,
                   (0.0, float(max_shift), float(step)))


def apply_bias_shift(model: nn.Module, classes: tuple[int, ...], shift: float) -> nn.Module:
    """Add ``shift`` to the output bias of ``classes`` in ``model``, in place, and return ``model``.

    The output layer is the model's last ``nn.Linear`` (in ``model.modules()`` order); its ``out_features`` are the
    classes, so afterwards ``model(x)[:, classes]`` is ``shift`` higher than before (up to float rounding: the bias
    is added before the last sum, not after) and every other column is bit-for-bit unchanged. Raises
    :class:`CompressorError` when the model has no Linear, a convolution comes after it (the head is then not a
    Linear), the Linear has no bias, or a class index is out of range.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    head = layers[-1] if layers else None
    if not isinstance(head, nn.Linear):
        has_linear = any(isinstance(m, nn.Linear) for m in layers)
        what = f"a {type(head).__name__} after its last nn.Linear" if has_linear else "no nn.Linear"
        raise CompressorError(f"the student ({type(model).__name__}) has {what}, so there is no output bias to shift; "
                              f"the bias fix works for students whose output layer is an nn.Linear: {FIXABLE_FAMILIES}")
    if head.bias is None:
        raise CompressorError(f"the student's output layer ({head}) has no bias to shift; the bias fix needs one, as "
                              f"the registry's {FIXABLE_FAMILIES} students have")
    _check_classes(classes, head.out_features, f"the output layer's {head.out_features} outputs")
    with torch.no_grad():
        head.bias[list(classes)] += shift
    return model


def _check_classes(classes: tuple[int, ...], num_classes: int, what: str) -> None:
    if not classes:
        raise CompressorError("no classes were given to shift; name at least one, e.g. the omitted ones")
    bad = [c for c in classes
           if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < num_classes]
    if bad:
        raise CompressorError(f"class indices {bad} are out of range for {what}; use 0 to {num_classes - 1}")


def omitted_class_indices(config: RunConfig, ensemble: Ensemble, dataset: Dataset) -> tuple[int, ...]:
    """The class indices of --omit-classes (numbers or class names), checked before any work."""
    if not config.omit_classes:
        return ()
    omitted = parse_class_list(config.omit_classes, ensemble.class_names or dataset.class_names,
                               ensemble.num_classes)
    if not dataset.labelled:
        raise CompressorError(f"--omit-classes {config.omit_classes}: the transfer set has no labels to tell "
                              f"which rows belong to those classes; label it or drop --omit-classes")
    return omitted
