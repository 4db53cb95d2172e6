"""Tile steps shared by the Triton kernels of both attention forms (PLR Eq. 4-5):
plr_kernels/triton/stream_attention.py (one program per (b, h), rows = the M
streams) and plr_kernels/triton/causal_stream_attention.py (rows r = n*M + m,
each row cut at its prefix end n). The forms differ only in which rows a
program holds and in the causal cut, a ``CAUSAL`` constexpr here.

Row ``row`` is the global row index of the dropout keep-mask (``(b*H + h)*M + m``
for the plain form, ``(b*H + h)*N*M + r`` for the causal one). Pointer
arguments named ``*_ROWS`` are ``[rows, 1]`` blocks already offset to each
row's (b, h, n, m); ``KP``, ``VP``, ``PM`` are offset to (b, h) / b.
Scalars ``scale`` and ``1/(1-p)`` come as fp32 pairs ``hi + lo``.
"""

import triton
import triton.language as tl

from ._matmul import dot as _dot


@triton.jit
def keep(seed, row, j, NS, p):
    """Keep-mask entry of (row, key j): Philox uniform >= p."""
    return tl.rand(seed, row * NS + j) >= p


@triton.jit
def load_seed(SEED, DROPOUT: tl.constexpr):
    """The dropout seed (read only when DROPOUT)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    return seed


@triton.jit
def kv_tile(P, sn, sd, n_idx, offs_d, nd_ok):
    """The ``[BLOCK_N, BLOCK_D]`` tile of prefix keys (or values) ``n_idx``."""
    return tl.load(P + n_idx[:, None] * sn + offs_d[None, :] * sd, mask=nd_ok, other=0.0)


@triton.jit
def key_valid(PM, spm_n, n_idx, N, n_r, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    """``[rows, keys]``: key j exists, is unpadded and (CAUSAL) j <= n(row)."""
    n_ok = n_idx < N
    if HAS_MASK:
        pm = tl.load(PM + n_idx * spm_n, mask=n_ok, other=0)
        n_ok = n_ok & (pm != 0)
    valid = n_ok[None, :]
    if CAUSAL:
        valid = valid & (n_idx[None, :] <= n_r[:, None])
    return valid


@triton.jit
def fwd_prefix_tiles(
    q, KP, VP, PM, skp_n, skp_d, svp_n, svp_d, spm_n, n_end, N, n_r, offs_d, d_ok,
    m_i, l_i, acc, seed, row, NS,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    F64: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax over the prefix keys ``0..n_end-1`` in tiles of BLOCK_N
    (``s = q k^T * scale``, invalid keys at -inf). -> ``(m_i, l_i, acc)``."""
    acc_t = acc.dtype
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n_end, BLOCK_N):
        n_idx = start + offs_n
        nd_ok = (n_idx < N)[:, None] & d_ok[None, :]
        k = kv_tile(KP, skp_n, skp_d, n_idx, offs_d, nd_ok)
        qk = _dot(q, tl.trans(k), PRECISION, F64).to(acc_t)
        s = qk * scale_hi + qk * scale_lo
        s = tl.where(key_valid(PM, spm_n, n_idx, N, n_r, HAS_MASK, CAUSAL), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            kp = keep(seed, row[:, None], n_idx[None, :], NS, dropout_p)
            p = tl.where(kp, p * keep_hi + p * keep_lo, 0.0)
        v = kv_tile(VP, svp_n, svp_d, n_idx, offs_d, nd_ok)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, F64).to(acc_t)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def fwd_stream_keys(
    q, KS_ROWS, VS_ROWS, sks_s, sks_d, svs_s, svs_d, offs_d, rd_ok, N, S,
    m_i, l_i, acc, seed, row, NS,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    DROPOUT: tl.constexpr,
):
    """Each row's own stream keys 1..S (itself and its earlier tokens, no other
    stream): one dot product per row, merged into the same running (max, sum).
    -> ``(m_i, l_i, acc)``."""
    acc_t = acc.dtype
    qa = q.to(acc_t)
    for j in range(0, S):
        ks = tl.load(KS_ROWS + j * sks_s + offs_d[None, :] * sks_d, mask=rd_ok, other=0.0)
        qk = tl.sum(qa * ks.to(acc_t), 1)
        s = qk * scale_hi + qk * scale_lo
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        l_i = l_i * alpha + p
        if DROPOUT:
            kp = keep(seed, row, N + j, NS, dropout_p)
            p = tl.where(kp, p * keep_hi + p * keep_lo, 0.0)
        vs = tl.load(VS_ROWS + j * svs_s + offs_d[None, :] * svs_d, mask=rd_ok, other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * vs.to(acc_t)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def bwd_prefix_tile(
    q, k, v, do, valid, lse, delta, seed, row, n_idx, NS,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
):
    """One prefix tile of the backward: ``P = exp(s - lse)`` on ``valid``
    ``[rows, keys]`` (0 elsewhere), ``dS = P * (dP - Delta)``.
    -> ``(P~, dS)``, ``P~`` the dropped, rescaled probabilities."""
    acc_t = lse.dtype
    qk = _dot(q, tl.trans(k), PRECISION, F64).to(acc_t)
    s = qk * scale_hi + qk * scale_lo
    p = tl.where(valid, tl.exp(tl.where(valid, s, 0.0) - lse[:, None]), 0.0)
    dp = _dot(do, tl.trans(v), PRECISION, F64).to(acc_t)
    if DROPOUT:
        kp = keep(seed, row[:, None], n_idx[None, :], NS, dropout_p)
        pd = tl.where(kp, p * keep_hi + p * keep_lo, 0.0)
        dp = tl.where(kp, dp * keep_hi + dp * keep_lo, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    return pd, ds


@triton.jit
def bwd_stream_keys(
    q, do, KS_ROWS, VS_ROWS, DKS, DVS, out_rows, sks_s, sks_d, svs_s, svs_d, offs_d, rd_ok, r_ok, N, S, D,
    lse, delta, dq, seed, row, NS,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    DROPOUT: tl.constexpr,
):
    """Backward of each row's own stream keys: stores ``dK_s, dV_s``
    (contiguous, row offsets ``out_rows [rows, 1]``, then S, D) and returns
    ``dq`` plus their ``dS K_s`` (unscaled, like the prefix part)."""
    acc_t = dq.dtype
    qa = q.to(acc_t)
    doa = do.to(acc_t)
    for j in range(0, S):
        ks = tl.load(KS_ROWS + j * sks_s + offs_d[None, :] * sks_d, mask=rd_ok, other=0.0).to(acc_t)
        vs = tl.load(VS_ROWS + j * svs_s + offs_d[None, :] * svs_d, mask=rd_ok, other=0.0).to(acc_t)
        qk = tl.sum(qa * ks, 1)
        s = qk * scale_hi + qk * scale_lo
        p = tl.where(r_ok, tl.exp(s - lse), 0.0)
        dp = tl.sum(doa * vs, 1)
        if DROPOUT:
            kp = keep(seed, row, N + j, NS, dropout_p)
            pd = tl.where(kp, p * keep_hi + p * keep_lo, 0.0)
            dp = tl.where(kp, dp * keep_hi + dp * keep_lo, 0.0)
        else:
            pd = p
        ds = p * (dp - delta)
        dks = ds[:, None] * qa
        dks = dks * scale_hi + dks * scale_lo
        dq += ds[:, None] * ks
        out = out_rows + j * D + offs_d[None, :]
        tl.store(DKS + out, dks.to(DKS.dtype.element_ty), mask=rd_ok)
        tl.store(DVS + out, (pd[:, None] * doa).to(DVS.dtype.element_ty), mask=rd_ok)
    return dq
