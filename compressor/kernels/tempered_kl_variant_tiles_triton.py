"""What the Triton kernels of the later soft terms share, per tile of BLOCK_N rows × BLOCK_C columns: each member's
row statistics (mean and 1 / (std + eps) for ls, log w_k − lse_k at T for the arithmetic mixture, the geometric
mixture's lse), the mixture's log p formed tile by tile from them (as the kd kernel does, never a (K, N, C) buffer),
the student's log-sum-exps, and the hard term's gradient. Used by :mod:`.tempered_kl_variants_triton` (dkd, ls) and
:mod:`.tempered_kl_dist_triton`.
"""

from __future__ import annotations

from compressor.kernels.tempered_kl_triton import _online_lse_update, _pairwise_lse_update, tl, triton


@triton.jit
def _columns(start, row_mask, row_off, C, BLOCK_C: tl.constexpr):
    """Column block ``start`` of the rows: its column indices, the tile's mask and the elements' offsets."""
    cols = start + tl.arange(0, BLOCK_C)
    mask = row_mask[:, None] & (cols[None, :] < C)
    return cols, mask, row_off + cols[None, :]


@triton.jit
def _pick(tile, k, kidx):
    """Column k of a (BLOCK_N, BLOCK_K) per-member tile, as (BLOCK_N,)."""
    return tl.sum(tl.where(kidx[None, :] == k, tile, 0.0), axis=1)


@triton.jit
def _row_moments(ptr, row_off, row_mask, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """A row's mean and 1 / (std + eps), std divided by C − 1 (two passes: the mean, then the squares)."""
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):
        cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
        total += tl.sum(tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32), axis=1)
    mean = total / C
    squares = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):
        cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
        z = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, z - mean[:, None], 0.0)
        squares += tl.sum(centred * centred, axis=1)
    return mean, 1.0 / (tl.sqrt(squares / (C - 1)) + 1e-7)  # the reference's STANDARDISE_EPS


@triton.jit
def _member_stats(t_ptr, w_ptr, row_off, row_mask, C, K, member_stride, inv_t, GEOMETRIC: tl.constexpr,
                  STANDARDISE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per member: its row mean and 1 / (std + eps) (ls; else 0 and 1) and log w_k − lse_k(z_k / T) (arithmetic),
    as (BLOCK_N, BLOCK_K) tiles; and the geometric mixture's lse (BLOCK_N,)."""
    kidx = tl.arange(0, BLOCK_K)
    b_tile = tl.full([BLOCK_N, BLOCK_K], float("-inf"), tl.float32)
    mean_tile = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    inv_tile = tl.full([BLOCK_N, BLOCK_K], 1.0, tl.float32)
    t_k = t_ptr
    for k in range(K):
        mean_k = tl.zeros([BLOCK_N], tl.float32)
        inv_k = tl.full([BLOCK_N], 1.0, tl.float32)
        if STANDARDISE:
            mean_k, inv_k = _row_moments(t_k, row_off, row_mask, C, BLOCK_N, BLOCK_C)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        d = tl.zeros([BLOCK_N], tl.float32)
        if not GEOMETRIC:
            for start in range(0, C, BLOCK_C):
                cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
                z = tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32)
                m, d = _online_lse_update(m, d, tl.where(mask, (z - mean_k[:, None]) * (inv_k * inv_t)[:, None],
                                                         float("-inf")))
        b_tile = tl.where(kidx[None, :] == k, (tl.log(tl.load(w_ptr + k)) - m - tl.log(d))[:, None], b_tile)
        mean_tile = tl.where(kidx[None, :] == k, mean_k[:, None], mean_tile)
        inv_tile = tl.where(kidx[None, :] == k, inv_k[:, None], inv_tile)
        t_k += member_stride
    m_g = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_g = tl.zeros([BLOCK_N], tl.float32)
    if GEOMETRIC:
        for start in range(0, C, BLOCK_C):
            cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
            g = _geometric_logits(t_ptr, w_ptr, offs, mask, K, member_stride, mean_tile, inv_tile, inv_t, BLOCK_N,
                                  BLOCK_C, BLOCK_K)
            m_g, d_g = _online_lse_update(m_g, d_g, tl.where(mask, g, float("-inf")))
    return b_tile, mean_tile, inv_tile, m_g + tl.log(d_g)


@triton.jit
def _geometric_logits(t_ptr, w_ptr, offs, mask, K, member_stride, mean_tile, inv_tile, inv_t, BLOCK_N: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k w_k z_k / T over one tile, z_k each member's (standardised) logits."""
    kidx = tl.arange(0, BLOCK_K)
    g = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    t_k = t_ptr
    for k in range(K):
        z = tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(w_ptr + k) * (z - _pick(mean_tile, k, kidx)[:, None]) * (_pick(inv_tile, k, kidx) * inv_t)[:, None]
        t_k += member_stride
    return g


@triton.jit
def _log_p_block(t_ptr, w_ptr, offs, mask, K, member_stride, b_tile, mean_tile, inv_tile, lse_g, inv_t,
                 GEOMETRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """The mixture's log p over one tile (−inf where masked), from the member statistics."""
    if GEOMETRIC:
        g = _geometric_logits(t_ptr, w_ptr, offs, mask, K, member_stride, mean_tile, inv_tile, inv_t, BLOCK_N,
                              BLOCK_C, BLOCK_K)
        return tl.where(mask, g - lse_g[:, None], float("-inf"))
    kidx = tl.arange(0, BLOCK_K)
    big_m = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float32)
    big_s = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    t_k = t_ptr
    for k in range(K):
        z = tl.load(t_k + offs, mask=mask, other=0.0).to(tl.float32)
        a = (z - _pick(mean_tile, k, kidx)[:, None]) * (_pick(inv_tile, k, kidx) * inv_t)[:, None] \
            + tl.max(tl.where(kidx[None, :] == k, b_tile, float("-inf")), axis=1)[:, None]
        big_m, big_s = _pairwise_lse_update(big_m, big_s, tl.where(mask, a, float("-inf")))
        t_k += member_stride
    return big_m + tl.log(big_s)


@triton.jit
def _student_lse(s_ptr, row_off, row_mask, C, mean_s, inv_s, inv_t, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """The student's log-sum-exp at T (of its standardised logits for ls: mean_s, inv_s) and at 1 (raw)."""
    m_q = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_q = tl.zeros([BLOCK_N], tl.float32)
    m_1 = tl.full([BLOCK_N], float("-inf"), tl.float32)
    d_1 = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, C, BLOCK_C):
        cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m_q, d_q = _online_lse_update(m_q, d_q, tl.where(mask, (s - mean_s[:, None]) * (inv_s * inv_t)[:, None],
                                                         float("-inf")))
        m_1, d_1 = _online_lse_update(m_1, d_1, tl.where(mask, s, float("-inf")))
    return m_q + tl.log(d_q), m_1 + tl.log(d_1)


@triton.jit
def _hard(s, lse_1, cols, y, has_label):
    """The hard term's gradient (before (1 − α) / N) over one tile."""
    return tl.where(has_label[:, None], tl.exp(s - lse_1[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0),
                    0.0)


@triton.jit
def _mixture_tile(t_ptr, w_ptr, start, row_mask, row_off, C, K, member_stride, stats, inv_t, GEOMETRIC: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    """Column block ``start``: its columns, mask and offsets (as :func:`_columns`) and the mixture's log p there,
    from ``stats`` (what :func:`_member_stats` returned)."""
    cols, mask, offs = _columns(start, row_mask, row_off, C, BLOCK_C)
    b_tile, mean_tile, inv_tile, lse_g = stats
    log_p = _log_p_block(t_ptr, w_ptr, offs, mask, K, member_stride, b_tile, mean_tile, inv_tile, lse_g, inv_t,
                         GEOMETRIC, BLOCK_N, BLOCK_C, BLOCK_K)
    return cols, mask, offs, log_p
