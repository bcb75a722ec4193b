"""Before a student trains: how good is the ensemble, member by member, and is there anything to distil?

This is the smallest honest form of DESIGN.md's diagnostics step: per-member and mixture accuracy and NLL on the
validation split, and a plain-word warning when the mixture does not beat its best member (then a student
distilled from it can at best match that one member, and training on that member alone would be cheaper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.teachers import Ensemble


def diagnose(ensemble: Ensemble, member_logits: torch.Tensor, labels: torch.Tensor, split: str = "val") -> dict:
    """Score each member and the mixture on the labelled rows of ``split``: ``member_logits`` (K, N, C), ``labels`` (N,)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return {"members": [], "mixture": None, "warnings": [f"the {split} split has no labels: accuracy unknown"]}
    member_logits, labels = member_logits[:, keep], labels[keep]
    members = []
    for member, logits in zip(ensemble.members, member_logits):
        members.append({"name": member.name, "accuracy": _accuracy(logits, labels),
                        "nll": float(F.cross_entropy(logits.double(), labels))})
    mixture_log_probs = ensemble.log_probs(member_logits.double())  # (N, C)
    mixture = {"accuracy": _accuracy(mixture_log_probs, labels),
               "nll": float(F.nll_loss(mixture_log_probs, labels))}
    best = max(members, key=lambda m: m["accuracy"])
    warnings = []
    if len(members) > 1 and mixture["accuracy"] <= best["accuracy"]:
        warnings.append(
            f"the ensemble ({mixture['accuracy']:.2%}) does not beat its best member '{best['name']}' "
            f"({best['accuracy']:.2%}) on {split}: distilling the ensemble can gain no more than that member offers")
    return {"split": split, "examples": int(keep.sum()), "members": members, "mixture": mixture,
            "best_member": best["name"], "warnings": warnings}


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == labels).double().mean())
