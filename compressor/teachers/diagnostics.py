"""Before a student trains: how good is the ensemble, member by member, and is there anything to distil?

:func:`diagnose` scores the teachers on the validation split and on the transfer set and says, in plain words, when
distillation cannot pay:

- each member's and the mixture's top-1, NLL and ECE (15 bins) on validation, and how often each pair of members
  disagrees (an ensemble of members that always agree is one model, and its mixture gains nothing);
- the mixture against its best member: when it does not beat it, distilling the ensemble can give at most what
  training on that member would;
- the teachers on the transfer set (a seeded sample of at most 10,000 rows): their accuracy against its labels and
  the mean entropy of their soft targets, beside the same on validation. Teachers that get many transfer rows
  wrong pass those errors on as targets; teachers that fit the transfer set no better than unseen data are
  undertrained, and their soft targets carry little the labels do not;
- **the fit**: member weights and one temperature chosen to minimise the mixture's NLL on validation (L-BFGS in
  float64), with NLL and ECE before and after. It is recorded, not applied: the run distils the ensemble as given,
  and the fit tells whether the members are badly weighted or over-confident;
- **seen validation rows**: teachers trained on a whole official training set have seen the validation rows carved
  from it, so their validation accuracy stands above their test accuracy. Then (or with ``--teachers-saw-val``)
  the fit and the transfer-set check are made on half of the test split instead, and a note says why, rather
  than a false "undertrained" alarm.

ECE and the other metrics come from ``compressor.core.metrics.classification_metrics``, the function the report's rows
use, so the figures here and there are computed the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from compressor.kernels import ensemble_log_probs
from compressor.teachers.ensemble import Ensemble
from compressor.core.metrics import classification_metrics

TRANSFER_SAMPLE = 10_000     # transfer rows scored (seeded sample): enough for a 1-point estimate, cheap at any N
MAX_TRANSFER_ERROR = 0.05    # teachers wrong on more than this share of transfer rows: their errors are taught
MIN_FIT_GAP = 0.01           # transfer accuracy must beat validation accuracy by this much, or the teachers underfit
SEEN_GAP = 0.01              # validation above test by more than this (and than 2 standard errors): val was seen


def diagnose(ensemble: Ensemble, member_logits: torch.Tensor, labels: torch.Tensor, split: str = "val",
             transfer_logits: torch.Tensor | None = None, transfer_labels: torch.Tensor | None = None,
             test_logits: torch.Tensor | None = None, test_labels: torch.Tensor | None = None,
             teachers_saw_val: bool = False) -> dict:
    """Score the teachers on the labelled rows of ``split`` and, when given, on the transfer set; fit weights and a
    temperature; collect plain-word warnings.

    ``member_logits`` (K, N, C) with ``labels`` (N,) are the held-out split; ``transfer_logits`` (K, S, C) with
    ``transfer_labels`` (S,) are the transfer rows picked by :func:`transfer_sample`. -1 marks an unlabeled row.
    With the test split's ``test_logits`` and ``test_labels``, teachers that score clearly better on ``split`` than
    on test (or ``teachers_saw_val``, the user's word) are taken to have trained on it, as teachers trained on a
    whole official training set have: the fit and the under-training check then use half of the test split.
    """
    seen = seen_validation(ensemble, member_logits, labels, test_logits, test_labels, teachers_saw_val,
                           transfer_logits, transfer_labels)
    if seen is not None and seen["seen"]:
        half = torch.arange(0, len(test_labels), 2)  # every other test row: the half they surely did not see
        result = diagnose(ensemble, test_logits[:, half], test_labels[half], "half of the test split",
                          transfer_logits, transfer_labels)
        result["seen_validation"] = seen
        result["warnings"].insert(0, seen["note"])
        return result
    keep = labels >= 0
    if not bool(keep.any()):
        return {"members": [], "mixture": None, "warnings": [f"the {split} split has no labels: accuracy unknown"]}
    member_logits, labels = member_logits[:, keep].double(), labels[keep]
    y = labels.numpy()
    mixture_log_probs = ensemble.log_probs(member_logits)  # (N, C)
    # A specialist's (N, C) logits spread its dustbin over the other classes, so its top-1 means nothing alone:
    # a specialist ensemble is scored as its generalist and its combination, and has no weights to fit.
    classifiers = member_logits[:1] if ensemble.specialist_subsets is not None else member_logits
    members = [{"name": member.name, **_scores(logits, y)} for member, logits in zip(ensemble.members, classifiers)]
    mixture = _scores(mixture_log_probs, y)
    best = max(members, key=lambda m: m["accuracy"])
    result = {"split": split, "examples": int(keep.sum()), "members": members, "mixture": mixture,
              "best_member": best["name"], "disagreement": disagreement(classifiers),
              "fit": fit_ensemble(member_logits, labels, ensemble.combine) if classifiers is member_logits else None,
              "transfer": None, "seen_validation": seen, "warnings": []}
    if len(member_logits) > 1 and mixture["accuracy"] <= best["accuracy"]:
        result["warnings"].append(
            f"the ensemble ({mixture['accuracy']:.2%}) does not beat its best member '{best['name']}' "
            f"({best['accuracy']:.2%}) on {split}: distilling the ensemble can gain no more than that member offers")
    if transfer_logits is not None and transfer_labels is not None:
        result["transfer"] = transfer_fit(ensemble, transfer_logits, transfer_labels, mixture_log_probs, y)
        result["warnings"] += _transfer_warnings(result["transfer"], split)
    return result


def disagreement(member_logits: torch.Tensor) -> dict:
    """How often members' top-1 answers differ: the (K, K) matrix of pairwise rates and its off-diagonal mean."""
    answers = member_logits.argmax(dim=-1)  # (K, N)
    rates = (answers[:, None, :] != answers[None, :, :]).double().mean(dim=-1)  # (K, K)
    k = len(answers)
    mean = float(rates.sum() / (k * (k - 1))) if k > 1 else 0.0
    return {"pairwise": [[round(float(v), 6) for v in row] for row in rates], "mean": mean}


def fit_ensemble(member_logits: torch.Tensor, labels: torch.Tensor, combine: str = "arithmetic") -> dict:
    """Member weights (K,) and one temperature minimising the mixture's NLL on (K, N, C) logits with labels (N,).

    Weights are a softmax of free parameters and the temperature an exponential, so both stay valid; L-BFGS in
    float64 from the uniform, T = 1 start. Returns weights, temperature, and NLL / ECE before and after.
    """
    logits = member_logits.detach().double()
    k = logits.shape[0]
    raw_weights = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def mixture(raw_w, log_temperature):
        return ensemble_log_probs(logits / log_temperature.exp(), 1.0, torch.softmax(raw_w, 0), combine)

    def closure():
        optimiser.zero_grad()
        loss = F.nll_loss(mixture(raw_weights, log_t), labels)
        loss.backward()
        return loss

    optimiser = torch.optim.LBFGS([raw_weights, log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")
    optimiser.step(closure)
    with torch.no_grad():
        before = mixture(torch.zeros(k, dtype=torch.float64), torch.zeros((), dtype=torch.float64))
        after = mixture(raw_weights, log_t)
    y = labels.numpy()
    scored_before, scored_after = _scores(before, y), _scores(after, y)
    if scored_after["nll"] > scored_before["nll"]:  # never report a fit worse than where it started
        weights, temperature, scored_after = [1.0 / k] * k, 1.0, scored_before
    else:
        weights, temperature = torch.softmax(raw_weights.detach(), 0).tolist(), float(log_t.detach().exp())
    return {"weights": [round(w, 6) for w in weights], "temperature": round(temperature, 6),
            "nll_before": scored_before["nll"], "nll_after": scored_after["nll"],
            "ece_before": scored_before["ece"], "ece_after": scored_after["ece"],
            "accuracy_after": scored_after["accuracy"]}


def seen_validation(ensemble: Ensemble, val_logits: torch.Tensor, val_labels: torch.Tensor,
                    test_logits: torch.Tensor | None, test_labels: torch.Tensor | None, flagged: bool,
                    train_logits: torch.Tensor | None = None, train_labels: torch.Tensor | None = None) -> dict | None:
    """Whether the teachers trained on the validation rows: the mixture's top-1 on validation above its top-1 on
    test by more than SEEN_GAP and two standard errors of the difference and, where labelled training rows
    (``train_logits``, (K, S, C)) are given, within two standard errors of their top-1 (seen rows score like the
    rows the teachers trained on; a test file drawn a little differently from the training file scores lower on its
    own, and unseen validation rows below the training rows); or the user says so. None without labels on both
    splits."""
    if test_logits is None or test_labels is None:
        return None
    accuracy = {}
    for name, logits, labels in (("val", val_logits, val_labels), ("test", test_logits, test_labels),
                                 ("train", train_logits, train_labels)):
        keep = labels >= 0 if labels is not None else None
        if keep is None or not bool(keep.any()):
            if name == "train":
                continue
            return None
        right = ensemble.log_probs(logits[:, keep].double()).argmax(1) == labels[keep]  # (n,)
        accuracy[name] = (float(right.double().mean()), int(keep.sum()))
    (p_val, n_val), (p_test, n_test) = accuracy["val"], accuracy["test"]
    error = 2 * float(np.sqrt(p_val * (1 - p_val) / n_val + p_test * (1 - p_test) / n_test))
    gap = p_val - p_test
    p_train, n_train = accuracy.get("train", (None, 0))
    like_train = p_train is None or p_train - p_val <= 2 * float(np.sqrt(p_train * (1 - p_train) / n_train
                                                                          + p_val * (1 - p_val) / n_val))
    detected = gap > max(SEEN_GAP, error) and like_train
    beside_train = "" if p_train is None else f", as high as the {p_train:.2%} on training rows"
    why = ("--teachers-saw-val says so" if flagged else
           f"{p_val:.2%} on validation against {p_test:.2%} on test, {gap:.1%} apart (more than 2 standard errors)"
           f"{beside_train}")
    note = (f"the teachers most likely trained on the validation rows ({why}), as teachers trained on a whole "
            f"official training set have: the fit of weights and temperature and the under-training check use half "
            f"of the test split instead, and validation accuracy only chooses the student's best epoch")
    return {"seen": flagged or detected, "flagged": flagged, "detected": detected, "val_accuracy": p_val,
            "test_accuracy": p_test, "train_accuracy": p_train, "gap": gap, "two_standard_errors": error,
            "note": note}


def transfer_sample(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Sorted indices of at most TRANSFER_SAMPLE labelled transfer rows, a seeded sample when there are more."""
    labelled = torch.nonzero(labels >= 0).flatten()  # (M_labelled,)
    if len(labelled) > TRANSFER_SAMPLE:
        generator = torch.Generator().manual_seed(seed)
        labelled = labelled[torch.randperm(len(labelled), generator=generator)[:TRANSFER_SAMPLE]].sort().values
    return labelled


def transfer_fit(ensemble: Ensemble, transfer_logits: torch.Tensor, transfer_labels: torch.Tensor,
                 heldout_log_probs: torch.Tensor, heldout_labels: np.ndarray) -> dict:
    """The mixture's accuracy and mean soft-target entropy (nats, T = 1) on transfer rows (K, S, C) with labels
    (S,), beside the same on the held-out split."""
    keep = transfer_labels >= 0
    if not bool(keep.any()):
        return {"examples": 0}
    log_probs = ensemble.log_probs(transfer_logits[:, keep].double())  # (S, C)
    y = transfer_labels[keep].numpy()
    return {"examples": int(keep.sum()),
            "accuracy": float((log_probs.argmax(1).numpy() == y).mean()), "entropy": _entropy(log_probs),
            "heldout_accuracy": float((heldout_log_probs.argmax(1).numpy() == heldout_labels).mean()),
            "heldout_entropy": _entropy(heldout_log_probs)}


def _transfer_warnings(transfer: dict, split: str) -> list[str]:
    if not transfer.get("examples"):
        return []
    warnings = []
    error = 1.0 - transfer["accuracy"]
    if error > MAX_TRANSFER_ERROR:
        warnings.append(
            f"the teachers disagree with the labels on {error:.1%} of the transfer set (sample of "
            f"{transfer['examples']:,}): their soft targets teach those errors to the student; train the teachers "
            f"longer or on this data, or lower --alpha so the labels weigh more")
    if transfer["accuracy"] - transfer["heldout_accuracy"] < MIN_FIT_GAP and error > MAX_TRANSFER_ERROR / 2:
        warnings.append(
            f"the teachers fit the transfer set ({transfer['accuracy']:.2%}) no better than unseen {split} data "
            f"({transfer['heldout_accuracy']:.2%}): they look undertrained, and an undertrained ensemble leaves "
            f"little for a student to learn that the labels do not already teach")
    return warnings


def _scores(scores: torch.Tensor, labels: np.ndarray) -> dict:
    """Top-1, NLL and ECE of (N, C) logits or log-probabilities against labels (N,)."""
    metrics = classification_metrics(scores.detach().double().numpy(), labels)
    return {"accuracy": metrics["top1"], "nll": metrics["nll"], "ece": metrics["ece"]}


def _entropy(log_probs: torch.Tensor) -> float:
    """Mean entropy in nats of (N, C) log-probabilities; a zero probability contributes 0 (not 0 · -inf)."""
    terms = (log_probs.exp() * log_probs).nan_to_num(0.0)  # (N, C)
    return float(-terms.sum(dim=1).mean())
