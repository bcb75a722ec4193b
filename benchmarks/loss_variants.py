"""The later soft terms (dkd, ls, dist) as a user writes them by hand in eager PyTorch, for
``bench_tempered_kl.py --variant``: the baselines the fused paths must beat, and the memory-bound floor.

Each eager formula follows the papers' public code for one teacher (mdistiller's DKD with its ``− 1000 · mask``
trick, Sun et al.'s standardisation, DIST's centred cosine similarities), fed the ensemble's arithmetic mixture, with
the hard term as ``F.cross_entropy`` over all N rows; the tests check each against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.kernels.tempered_kl_reference import tempered_kl_reference


def variant_providers(variant: str, device: torch.device, temperature: float, alpha: float):
    """(name, fn(s, t, y) -> loss or None, reason when None) for ``variant``: eager formula, reference, the fused
    path of the device (on CUDA with torch.compile of the eager formula beside it), and the floor."""
    eager = EAGER[variant]
    yield "eager_formula", lambda s, t, y: eager(s, t, y, temperature, alpha), ""
    yield "reference", lambda s, t, y: tempered_kl_reference(s, t, y, temperature, alpha, variant=variant), ""
    if device.type == "cpu":
        from compressor.kernels.tempered_kl_variants_cpu import tempered_kl_variants_cpu
        yield "cpu", lambda s, t, y: tempered_kl_variants_cpu(s, t, y, temperature, alpha, variant=variant), ""
    else:  # on CUDA also torch.compile of the eager formula (its cold compile is timed apart, as for kd)
        compiled = torch.compile(eager, dynamic=False)
        yield "compile", lambda s, t, y: compiled(s, t, y, temperature, alpha), ""
        from compressor.kernels.tempered_kl_variants_triton import tempered_kl_variants_triton
        yield "triton", lambda s, t, y: tempered_kl_variants_triton(s, t, y, temperature, alpha, variant=variant), ""
    yield "floor", floor, ""


def floor(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Read the K + 1 logit arrays once and write one (N, C) array (the Σ over members, plus the student): what any
    loss that returns a gradient must at least move. Its "loss" is a sum, differentiable, so fwd+bwd times it too."""
    return (t.sum(0) + s).sum()


def _hard(s, y, alpha):
    return (1 - alpha) * F.cross_entropy(s, y, ignore_index=-1, reduction="sum") / s.shape[0]


def eager_dkd(s, t, y, temperature, alpha, beta=8.0):
    """mdistiller's DKD on the mixture; an unlabeled row's target is the mixture's argmax."""
    p = torch.softmax(t / temperature, dim=-1).mean(0)
    target = torch.where(y >= 0, y, p.argmax(-1))
    gt = F.one_hot(target, s.shape[1]).to(s.dtype)
    q = torch.softmax(s / temperature, dim=-1)
    p_b = torch.stack([(p * gt).sum(1), (p * (1 - gt)).sum(1)], 1)
    q_b = torch.stack([(q * gt).sum(1), (q * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(q_b), p_b, reduction="sum") / s.shape[0]
    p_rest = torch.softmax(torch.log(p) - 1000.0 * gt, dim=-1)
    log_q_rest = F.log_softmax(s / temperature - 1000.0 * gt, dim=-1)
    nckd = F.kl_div(log_q_rest, p_rest, reduction="sum") / s.shape[0]
    return alpha * temperature ** 2 * (tckd + beta * nckd) + _hard(s, y, alpha)


def eager_ls(s, t, y, temperature, alpha):
    """KD on logits standardised per row, as Sun et al.'s code."""
    def standardise(z):
        return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + 1e-7)
    p = torch.softmax(standardise(t) / temperature, dim=-1).mean(0)
    kl = F.kl_div(F.log_softmax(standardise(s) / temperature, -1), p, reduction="batchmean")
    return alpha * temperature ** 2 * kl + _hard(s, y, alpha)


def eager_dist(s, t, y, temperature, alpha):
    """DIST's inter- and intra-class relations (β = γ = 1) on the mixture."""
    p = torch.softmax(t / temperature, dim=-1).mean(0)
    q = torch.softmax(s / temperature, dim=-1)

    def pearson(a, b, dim):
        return F.cosine_similarity(a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True), dim=dim, eps=1e-8)
    inter = 1 - pearson(q, p, 1).mean()
    intra = 1 - pearson(q, p, 0).mean()
    return alpha * temperature ** 2 * (inter + intra) + _hard(s, y, alpha)


EAGER = {"dkd": eager_dkd, "ls": eager_ls, "dist": eager_dist}
