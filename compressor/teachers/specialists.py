"""Specialist ensembles (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", §5).

A generalist classifies all C classes; each specialist m classifies its subset S_m of classes the generalist
confuses, plus one "dustbin" class for everything else. This module holds the parts that are mathematics, not jobs:

- :func:`parse_subsets` and :func:`find_subsets`: the subsets, given by name or found as the paper finds them, by
  K-means on the columns of the (uncentred, normalised) covariance of the generalist's predicted probabilities;
- :class:`Specialist` (training form, (N, |S|+1) logits) and :class:`ExpandedSpecialist` (ensemble form, (N, C)
  logits whose softmax puts the dustbin's probability evenly on the classes outside S_m, so every member of a
  specialist ensemble has the same output shape and the teacher cache, validation and export need no special case);
- :func:`dustbin_shift`: the log-odds correction for training on a set where S_m is oversampled;
- :func:`specialist_log_probs`: the combination, per input, of the generalist with the specialists active for it.

Training the specialists, one process each, is :mod:`compressor.training.specialist_training`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compressor.core.errors import CompressorError

COMBINE = "specialists"        # Ensemble.combine of a specialist ensemble
EM_ITERATIONS = 100            # fixed, so the combination is deterministic and traceable (no data-dependent loop)
Subsets = list[tuple[int, ...]]


def parse_subsets(text: str, class_names: Sequence[str] | None, num_classes: int) -> Subsets:
    """``"shirt,t-shirt,pullover;sandal,sneaker"`` (names or 0-based indices, ``;`` between subsets) → subsets.

    Raises CompressorError naming the problem for an unknown name, a class named twice, overlapping subsets, a subset
    holding every class (nothing left for its dustbin) or an empty one.
    """
    lookup = {name.strip().lower(): k for k, name in enumerate(class_names or [])}
    subsets: Subsets = []
    seen: dict[int, int] = {}
    for m, part in enumerate(p for p in text.split(";")):
        items = [item.strip() for item in part.split(",") if item.strip()]
        if not items:
            raise CompressorError(f"--subsets {text!r}: subset {m + 1} is empty; separate subsets with ';' and "
                                  f"classes with ','")
        subset = []
        for item in items:
            if item.lstrip("-").isdigit():
                k = int(item)
                if not 0 <= k < num_classes:
                    raise CompressorError(f"--subsets: class {k} is out of range for {num_classes} classes "
                                          f"(0 to {num_classes - 1})")
            elif item.lower() in lookup:
                k = lookup[item.lower()]
            elif not lookup:
                raise CompressorError(f"--subsets names class {item!r} but the generalist declares no class names; "
                                      f"give class indices (0 to {num_classes - 1}) instead")
            else:
                raise CompressorError(f"--subsets: unknown class {item!r}; the classes are "
                                      f"{', '.join(class_names)}")
            if k in subset:
                raise CompressorError(f"--subsets: class {item!r} is named twice in subset {m + 1}; name it once")
            if k in seen:
                raise CompressorError(f"--subsets: class {item!r} is in subsets {seen[k] + 1} and {m + 1}; "
                                      f"specialists' subsets must not overlap")
            seen[k] = m
            subset.append(k)
        if len(subset) == num_classes:
            raise CompressorError(f"--subsets: subset {m + 1} holds all {num_classes} classes, leaving its "
                                  f"specialist no dustbin; a specialist covers a few confusable classes")
        subsets.append(tuple(sorted(subset)))
    return subsets


def prediction_covariance(probs: Tensor) -> Tensor:
    """The (C, C) covariance, over the rows, of predicted probabilities ``probs`` (N, C), in float64."""
    p = probs.double()
    centred = p - p.mean(dim=0, keepdim=True)  # (N, C)
    return centred.T @ centred / max(len(p) - 1, 1)  # (C, C)


def shared_probability(probs: Tensor) -> Tensor:
    """The (C, C) mean over rows of p_i · p_j for probabilities ``probs`` (N, C), in float64: off the diagonal, how
    much probability classes i and j take together, which is large exactly when the generalist confuses them."""
    p = probs.double()
    return p.T @ p / max(len(p), 1)  # (C, C)


def find_subsets(probs: Tensor, num_specialists: int, clusters: int | None = None, seed: int = 0) -> tuple[Subsets, dict]:
    """Confusable subsets as the paper finds them: K-means on the columns of the generalist's prediction covariance.

    ``probs`` (N, C) are the generalist's probabilities on the transfer set. The columns clustered are those of the
    uncentred covariance E[p pᵀ] scaled to a unit diagonal (the cosine similarity of the classes' probability
    columns): the centred covariance's columns are dominated by each class's own variance, so K-means on them
    separates the classes with the most variance, not the confused ones (on Fashion-MNIST it isolated trouser and bag
    and lumped every garment and shoe together). ``clusters`` groups (default ``num_specialists + 1``: one group is
    left for the classes confused with nothing); the ``num_specialists`` groups of two or more classes sharing the
    most probability (off-diagonal E[p_i p_j] summed within the group) become the subsets, most confused first.
    Returns (subsets, details) with the covariance, the similarity and every cluster with its score, for the metadata.
    """
    from sklearn.cluster import KMeans

    num_classes = probs.shape[1]
    if not 1 <= num_specialists < num_classes:
        raise CompressorError(f"--num-specialists {num_specialists}: give between 1 and {num_classes - 1} for "
                              f"{num_classes} classes (each specialist covers at least two of them)")
    k = min(num_classes, clusters or num_specialists + 1)
    if k < num_specialists:
        raise CompressorError(f"--clusters {k} is fewer than --num-specialists {num_specialists}")
    shared = shared_probability(probs)  # (C, C)
    scale = shared.diagonal().clamp_min(1e-30).sqrt()  # (C,)
    similarity = shared / scale[:, None] / scale[None, :]  # (C, C), unit diagonal
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(similarity.numpy())  # (C,)
    scored = []
    for j in range(k):
        group = [int(c) for c in np.flatnonzero(labels == j)]
        block = shared[group][:, group]
        scored.append({"classes": group, "shared_probability": float(block.sum() - block.diagonal().sum())})
    scored.sort(key=lambda g: (-g["shared_probability"], g["classes"]))
    eligible = [g for g in scored if len(g["classes"]) >= 2]
    if len(eligible) < num_specialists:
        raise CompressorError(f"K-means with {k} clusters found only {len(eligible)} groups of two or more classes; "
                              f"lower --num-specialists to {max(len(eligible), 1)}, change --clusters, or name the "
                              f"subsets with --subsets")
    subsets = [tuple(g["classes"]) for g in eligible[:num_specialists]]

    def rounded(matrix: Tensor) -> list[list[float]]:
        return [[round(float(v), 8) for v in row] for row in matrix]

    details = {"method": "k-means on the columns of the generalist's prediction covariance (uncentred, unit "
                         "diagonal) over the transfer set (Hinton et al. 2015, §5)",
               "clusters": scored, "covariance": rounded(prediction_covariance(probs)),
               "similarity": rounded(similarity)}
    return subsets, details


def dustbin_shift(subset_fraction: float, trained_fraction: float = 0.5) -> float:
    """Logits to add to a specialist's dustbin after training on a set where its subset made ``trained_fraction``
    of the rows instead of its natural ``subset_fraction``.

    A classifier trained under class priors π_train learns log-odds shifted by log(π_train / π_natural); the
    correction removes that shift: the subset's odds against the dustbin were multiplied by
    (t / (1 − t)) / (f / (1 − f)), so the dustbin's logit rises by its log, log((1 − f) / f) for t = ½. The paper's
    wording, "the log of the proportion by which the specialist class is oversampled", log(½ / f), counts the
    subset's oversampling but not the dustbin's undersampling from 1 − f to ½, which adds log(2(1 − f)) (about
    log 2 for a rare subset); only the odds form recovers the natural posterior exactly (tests/compressor/
    test_specialists.py checks it on exact Bayes tables).
    """
    f, t = subset_fraction, trained_fraction
    if not (0 < f < 1 and 0 < t < 1):
        raise ValueError(f"fractions must lie strictly between 0 and 1, got subset {f}, trained {t}")
    return math.log(t / (1 - t)) - math.log(f / (1 - f))


class Specialist(nn.Module):
    """A specialist in training form: ``base`` (N, ...) → (N, C) logits, read as (N, |S|+1) logits over its subset
    and a dustbin whose logit is the log-sum-exp of the other classes' logits plus ``shift``.

    Started from the generalist's weights, it predicts at first exactly what the generalist predicts with the other
    classes merged (shift 0), and fine-tuning sharpens it on its subset.
    """

    def __init__(self, base: nn.Module, subset: Sequence[int], num_classes: int, shift: float = 0.0):
        super().__init__()
        outside = [c for c in range(num_classes) if c not in set(subset)]
        self.base = base
        self.register_buffer("subset", torch.tensor(list(subset), dtype=torch.long))
        self.register_buffer("outside", torch.tensor(outside, dtype=torch.long))
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x: Tensor) -> Tensor:
        z = self.base(x)  # (N, C)
        inside = z.index_select(1, self.subset)  # (N, S)
        dustbin = torch.logsumexp(z.index_select(1, self.outside), dim=1, keepdim=True) + self.shift  # (N, 1)
        return torch.cat([inside, dustbin], dim=1)  # (N, S + 1)


class ExpandedSpecialist(nn.Module):
    """A specialist in ensemble form: (N, C) logits, the subset's logits in place and the dustbin's logit less
    log(C − |S|) on every other class, so the softmax gives the subset's probabilities exactly and shares the
    dustbin's evenly; summing those back recovers the dustbin. A matrix product, so it traces and exports."""

    def __init__(self, specialist: Specialist, num_classes: int):
        super().__init__()
        subset = specialist.subset.tolist()
        size, outside = len(subset), num_classes - len(subset)
        place = torch.zeros(size + 1, num_classes)  # (S + 1, C): where each specialist output goes
        place[torch.arange(size), torch.tensor(subset)] = 1.0
        place[size, specialist.outside] = 1.0
        offset = torch.zeros(num_classes)
        offset[specialist.outside] = -math.log(outside)
        self.specialist = specialist
        self.register_buffer("place", place)
        self.register_buffer("offset", offset)

    def forward(self, x: Tensor) -> Tensor:
        return self.specialist(x) @ self.place + self.offset  # (N, S + 1) @ (S + 1, C) → (N, C)


def subset_masks(subsets: Subsets, num_classes: int, like: Tensor) -> Tensor:
    """(M, C) with 1 where class c is in specialist m's subset, on ``like``'s device and dtype."""
    masks = torch.zeros(len(subsets), num_classes, dtype=like.dtype, device=like.device)
    for m, subset in enumerate(subsets):
        masks[m, list(subset)] = 1.0
    return masks


def active_specialists(generalist_logits: Tensor, masks: Tensor, top_n: int = 1) -> Tensor:
    """(N, M) 1.0 where specialist m is active for row n: its subset holds one of the generalist's top-n classes."""
    kth = generalist_logits.topk(top_n, dim=1).values[:, -1:]  # (N, 1)
    top = (generalist_logits >= kth).to(masks.dtype)  # (N, C): the top-n classes (ties included)
    return (top @ masks.T > 0).to(masks.dtype)  # (N, M)


def specialist_log_probs(member_logits: Tensor, subsets: Subsets, top_n: int = 1,
                         iterations: int = EM_ITERATIONS) -> Tensor:
    """The specialist ensemble's prediction, log q (N, C), from member logits (1 + M, N, C): the generalist first,
    then the M specialists in :class:`ExpandedSpecialist` form, ``subsets[m]`` being specialist m's classes.

    Per row, q minimises KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m), where q_m is q over S_m with the rest of its mass
    on the dustbin. Dropping constants, that is maximising Σ_c a_c log q_c + Σ_m b_m log Σ_{c ∉ S_m} q_c with
    a = p_g + Σ_m p_m on S_m and b_m = p_m(dustbin): a multinomial likelihood with the dustbin counts censored to a
    set of classes. We solve it by expectation-maximisation rather than gradient descent on q's logits (written by
    hand because no library solves this batched): each step spreads b_m over the classes outside S_m in proportion
    to q and renormalises, so q stays a distribution, needs no step size, never lowers the (concave) objective, and
    starts from the generalist (with one active specialist, the start is the exact optimum). A fixed number of steps keeps it deterministic
    and traceable. A row with no active specialist gets the generalist's log-probabilities exactly.
    """
    if member_logits.ndim != 3 or member_logits.shape[0] != len(subsets) + 1:
        raise ValueError(f"member logits {tuple(member_logits.shape)} do not fit a generalist and {len(subsets)} "
                         f"specialists; expected ({len(subsets) + 1}, N, C)")
    logits = member_logits if member_logits.dtype == torch.float64 else member_logits.float()
    generalist_log_probs = F.log_softmax(logits[0], dim=-1)  # (N, C)
    if not subsets:
        return generalist_log_probs
    masks = subset_masks(subsets, logits.shape[-1], logits)  # (M, C)
    outside = 1.0 - masks  # (M, C)
    active = active_specialists(logits[0], masks, top_n)  # (N, M)
    p_g = generalist_log_probs.exp()  # (N, C)
    p_m = F.softmax(logits[1:], dim=-1)  # (M, N, C)
    a = p_g + torch.einsum("nm,mnc,mc->nc", active, p_m, masks)  # (N, C): mass that names its class
    b = active * torch.einsum("mnc,mc->nm", p_m, outside)  # (N, M): dustbin mass, censored to outside S_m
    # Start from the generalist: each dustbin spread over its classes as the generalist spreads its own mass there
    # (plus the smallest normal number, so a class whose probability underflowed to 0 is not stuck there; anything
    # larger, even float32's eps, would swamp the small probabilities of a confident generalist). With one active specialist this is already
    # the optimum in closed form: S_m's classes get a_c / 2 and the rest the generalist's shape scaled to hold
    # (Σ_{c ∉ S_m} p_g(c) + b_m) / 2; the steps below matter when top_n > 1 activates several specialists.
    tiny = torch.finfo(logits.dtype).tiny
    spread = p_g + tiny  # (N, C)
    r = a + spread * ((b / (spread @ outside.T)) @ outside)  # (N, C)
    q = r / r.sum(dim=1, keepdim=True)
    for _ in range(iterations):
        outside_mass = (q @ outside.T).clamp_min(tiny)  # (N, M): q's mass on each active dustbin's classes
        r = a + q * ((b / outside_mass) @ outside)  # (N, C): E-step, b_m shared in proportion to q
        q = r / r.sum(dim=1, keepdim=True)  # M-step
    combined = q.clamp_min(tiny).log()  # (N, C)
    return torch.where(active.sum(dim=1, keepdim=True) > 0, combined, generalist_log_probs)


def check_metadata(spec: dict, num_members: int, num_classes: int | None, where: str) -> Subsets:
    """Validate a specialist ensemble's ``specialists`` metadata and return its subsets; CompressorError naming
    ``where`` when it does not fit the members."""
    subsets = [tuple(int(c) for c in s) for s in spec.get("subsets", [])]
    if len(subsets) != num_members - 1:
        raise CompressorError(f"{where}: {len(subsets)} specialist subsets for {num_members - 1} specialists (the "
                              f"first member is the generalist); rebuild it with compress specialists")
    flat = [c for s in subsets for c in s]
    if len(flat) != len(set(flat)) or (num_classes is not None and any(not 0 <= c < num_classes for c in flat)):
        raise CompressorError(f"{where}: specialist subsets {subsets} overlap or name classes outside the "
                              f"{num_classes} the members predict; rebuild it with compress specialists")
    if int(spec.get("top_n", 1)) < 1:
        raise CompressorError(f"{where}: specialists top_n must be at least 1")
    return subsets
