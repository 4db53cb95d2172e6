"""Triton kernels of the causal-prefix form of stream-isolated attention (PLR Eq. 4-5
for every prefix of a sequence; plr_kernels/causal_stream_attention.py).

Rows r = n*M + m (stream m of prefix end n, in position order), R = N*M per
(b, h). The causal cut is a mask on the tile (row, key): row r sees prefix
key j iff j <= n(r) and ``prefix_mask[b, j]``.

* Forward: one program per (b, h, block of BLOCK_R rows) -- the M streams
  of consecutive positions -- streams the shared prefix tiles of BLOCK_N keys
  up to the block's last position (online softmax, invalid keys at -inf),
  then the S keys of each row's own stream, merged into the same running
  (max, sum): ``lse = m + log(l)``. A prefix tile is read once per row block,
  for all its positions and streams.
* Backward, FlashAttention-2 style, no atomics (deterministic):
  ``_bwd_dkdv_kernel``: one program per (b, h, block of prefix keys) sums
  ``dK = scale * dS^T Q`` and ``dV = P~^T dO`` over the rows of positions
  n >= the block's first key; ``_bwd_dq_kernel``: one program per
  (b, h, block of rows) gives ``dQ = scale * dS K`` and the own-stream
  ``dK_s, dV_s``; ``dS = P * (dP - Delta)``, ``Delta_r = dO_r . O_r``.

Dropout: the keep-mask ``[B,H,N,M,N+S]`` is ``Philox(seed, row*(N+S) + j) >= p``
with ``row = (b*H + h)*R + r`` -- the non-causal kernel's mask with M' = N*M
rows (``keep`` of plr_kernels/triton/_attention_tiles.py), so :func:`dropout_mask`
is that kernel's debug mask. The tile steps both forms share are in that file.
Scalars as in plr_kernels/triton/stream_attention.py (fp32 hi + lo pairs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._attention_tiles import (bwd_prefix_tile, bwd_stream_keys, fwd_prefix_tiles, fwd_stream_keys, key_valid,
                               kv_tile, load_seed)
from ._matmul import dot as _dot
from .stream_attention import _acc, _pow2, launch_args
from .stream_attention import dropout_mask as _flat_dropout_mask

__all__ = ["forward", "backward", "dropout_mask"]


@triton.jit
def _rows(pid_r, M, R, BLOCK_R: tl.constexpr):
    """Rows of this block, their positions n and streams m, and validity."""
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    return r, r // M, r % M, r < R


@triton.jit
def _fwd_kernel(
    Q, KP, VP, KS, VS, PM, O, LSE, SEED,
    sq_b, sq_h, sq_n, sq_m, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    sks_b, sks_h, sks_n, sks_m, sks_s, sks_d,
    svs_b, svs_h, svs_n, svs_m, svs_s, svs_d,
    spm_b, spm_n,
    H, M, N, S, D,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = N * M
    r, n_r, m_r, r_ok = _rows(tl.program_id(1).to(tl.int64), M, R, BLOCK_R)
    acc_t = LSE.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rd_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + n_r[:, None] * sq_n + m_r[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=rd_ok, other=0.0)
    row = bh * R + r
    NS = N + S
    seed = load_seed(SEED, DROPOUT)

    # Finite start: a row with no visible prefix key gets exp(-inf - finite) = 0.
    m_i = tl.full([BLOCK_R], -1.0e30, acc_t)
    l_i = tl.zeros([BLOCK_R], acc_t)
    acc = tl.zeros([BLOCK_R, BLOCK_D], acc_t)

    # Prefix tiles up to the last position of the block (keys beyond it are cut for every row).
    n_end = tl.minimum(N, (tl.minimum(tl.program_id(1).to(tl.int64) * BLOCK_R + BLOCK_R, R) - 1) // M + 1)
    m_i, l_i, acc = fwd_prefix_tiles(
        q, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h, PM + b * spm_b, skp_n, skp_d, svp_n, svp_d,
        spm_n, n_end, N, n_r, offs_d, d_ok, m_i, l_i, acc, seed, row, NS,
        scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
        True, HAS_MASK, DROPOUT, PRECISION, F64, BLOCK_N)
    # The row's own stream keys 1..S (never another stream's or position's).
    ks_rows = KS + b * sks_b + h * sks_h + n_r[:, None] * sks_n + m_r[:, None] * sks_m
    vs_rows = VS + b * svs_b + h * svs_h + n_r[:, None] * svs_n + m_r[:, None] * svs_m
    m_i, l_i, acc = fwd_stream_keys(
        q, ks_rows, vs_rows, sks_s, sks_d, svs_s, svs_d, offs_d, rd_ok, N, S, m_i, l_i, acc, seed, row, NS,
        scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT)

    o = acc / l_i[:, None]
    tl.store(O + row[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=rd_ok)
    tl.store(LSE + row, (m_i + tl.log(l_i)).to(LSE.dtype.element_ty), mask=r_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, KP, VP, PM, O, DO, LSE, SEED, DKP, DVP,
    sq_b, sq_h, sq_n, sq_m, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    sdo_b, sdo_h, sdo_n, sdo_m, sdo_d,
    spm_b, spm_n,
    H, M, N, S, D,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = N * M
    acc_t = LSE.dtype.element_ty
    n0 = tl.program_id(1).to(tl.int64) * BLOCK_N
    n_idx = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nd_ok = (n_idx < N)[:, None] & d_ok[None, :]
    k = kv_tile(KP + b * skp_b + h * skp_h, skp_n, skp_d, n_idx, offs_d, nd_ok)
    v = kv_tile(VP + b * svp_b + h * svp_h, svp_n, svp_d, n_idx, offs_d, nd_ok)
    NS = N + S
    seed = load_seed(SEED, DROPOUT)
    dk = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    dv = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    # Only the rows of positions n >= n0 see a key of this block.
    for r0 in range(n0 * M, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        n_r = r // M
        m_r = r % M
        r_ok = r < R
        rd_ok = r_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + n_r[:, None] * sq_n + m_r[:, None] * sq_m + offs_d[None, :] * sq_d,
                    mask=rd_ok, other=0.0)
        do = tl.load(DO + b * sdo_b + h * sdo_h + n_r[:, None] * sdo_n + m_r[:, None] * sdo_m
                     + offs_d[None, :] * sdo_d, mask=rd_ok, other=0.0)
        row = bh * R + r
        o = tl.load(O + row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
        lse = tl.load(LSE + row, mask=r_ok, other=0.0).to(acc_t)
        delta = tl.sum(do.to(acc_t) * o.to(acc_t), 1)
        valid = r_ok[:, None] & key_valid(PM + b * spm_b, spm_n, n_idx, N, n_r, HAS_MASK, True)
        pd, ds = bwd_prefix_tile(q, k, v, do, valid, lse, delta, seed, row, n_idx, NS,
                                 scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT, PRECISION, F64)
        dv += _dot(tl.trans(pd).to(do.dtype), do, PRECISION, F64).to(acc_t)
        dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION, F64).to(acc_t)
    dk = dk * scale_hi + dk * scale_lo
    out = bh * N * D + n_idx[:, None] * D + offs_d[None, :]
    tl.store(DKP + out, dk.to(DKP.dtype.element_ty), mask=nd_ok)
    tl.store(DVP + out, dv.to(DVP.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, KP, VP, KS, VS, PM, O, DO, LSE, SEED, DQ, DKS, DVS,
    sq_b, sq_h, sq_n, sq_m, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    sks_b, sks_h, sks_n, sks_m, sks_s, sks_d,
    svs_b, svs_h, svs_n, svs_m, svs_s, svs_d,
    sdo_b, sdo_h, sdo_n, sdo_m, sdo_d,
    spm_b, spm_n,
    H, M, N, S, D,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    h = bh % H
    R = N * M
    r, n_r, m_r, r_ok = _rows(tl.program_id(1).to(tl.int64), M, R, BLOCK_R)
    acc_t = LSE.dtype.element_ty
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rd_ok = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + n_r[:, None] * sq_n + m_r[:, None] * sq_m + offs_d[None, :] * sq_d,
                mask=rd_ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + n_r[:, None] * sdo_n + m_r[:, None] * sdo_m
                 + offs_d[None, :] * sdo_d, mask=rd_ok, other=0.0)
    row = bh * R + r
    o = tl.load(O + row[:, None] * D + offs_d[None, :], mask=rd_ok, other=0.0)
    lse = tl.load(LSE + row, mask=r_ok, other=0.0).to(acc_t)
    delta = tl.sum(do.to(acc_t) * o.to(acc_t), 1)
    NS = N + S
    seed = load_seed(SEED, DROPOUT)
    dq = tl.zeros([BLOCK_R, BLOCK_D], acc_t)

    KPb = KP + b * skp_b + h * skp_h
    VPb = VP + b * svp_b + h * svp_h
    n_end = tl.minimum(N, (tl.minimum(tl.program_id(1).to(tl.int64) * BLOCK_R + BLOCK_R, R) - 1) // M + 1)
    for start in range(0, n_end, BLOCK_N):
        n_idx = start + offs_n
        nd_ok = (n_idx < N)[:, None] & d_ok[None, :]
        k = kv_tile(KPb, skp_n, skp_d, n_idx, offs_d, nd_ok)
        v = kv_tile(VPb, svp_n, svp_d, n_idx, offs_d, nd_ok)
        valid = r_ok[:, None] & key_valid(PM + b * spm_b, spm_n, n_idx, N, n_r, HAS_MASK, True)
        pd, ds = bwd_prefix_tile(q, k, v, do, valid, lse, delta, seed, row, n_idx, NS,
                                 scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT, PRECISION, F64)
        dq += _dot(ds.to(k.dtype), k, PRECISION, F64).to(acc_t)

    ks_rows = KS + b * sks_b + h * sks_h + n_r[:, None] * sks_n + m_r[:, None] * sks_m
    vs_rows = VS + b * svs_b + h * svs_h + n_r[:, None] * svs_n + m_r[:, None] * svs_m
    dq = bwd_stream_keys(
        q, do, ks_rows, vs_rows, DKS, DVS, row[:, None] * (S * D),
        sks_s, sks_d, svs_s, svs_d, offs_d, rd_ok, r_ok, N, S, D,
        lse, delta, dq, seed, row, NS, scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT)
    dq = dq * scale_hi + dq * scale_lo
    tl.store(DQ + row[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rd_ok)


# ------------------------------------------------------------------ host side


def block_sizes(r: int, n: int, d: int, itemsize: int = 2, block_r=None, block_n=None):
    """(BLOCK_R, BLOCK_N, BLOCK_D): powers of two >= 16 (GPU tl.dot needs K >= 16
    for 16-bit inputs); BLOCK_R rows of (n, m), a K/V tile <= 16 KiB."""
    block_d = _pow2(d)
    if block_n is None:
        block_n = min(_pow2(n), max(16, min(64, 16384 // (block_d * itemsize))))
    if block_r is None:
        block_r = min(_pow2(r), 64)
    for name, value in (("block_r", block_r), ("block_n", block_n)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {value}")
    return block_r, block_n, block_d


def _common(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, blocks):
    pm, spm, scalars, consts = launch_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale,
                                           dropout_p, seed)
    b, h, n, m, d = q.shape
    s = k_stream.shape[4]
    block_r, block_n, block_d = block_sizes(n * m, n, d, q.element_size(), *blocks)
    consts.update(BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_D=block_d)
    return (b, h, n, m, s, d), pm, spm, (h, m, n, s, d, *scalars), consts


def forward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, block_r=None,
            block_n=None):
    """-> ``o [B,H,N,M,D]`` (q's dtype), ``lse [B,H,N,M]`` (fp32; fp64 for fp64 inputs).

    ``seed``: 1-element int64 tensor (read only when dropout_p > 0); ``block_r``,
    ``block_n``: tile sizes (default: :func:`block_sizes`)."""
    (b, h, n, m, s, d), pm, spm, scalars, consts = _common(
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, (block_r, block_n))
    o = torch.empty((b, h, n, m, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, n, m), dtype=_acc(q.dtype), device=q.device)
    if b * h * n * m == 0:
        return o, lse
    grid = (b * h, triton.cdiv(n * m, consts["BLOCK_R"]))
    _fwd_kernel[grid](
        q, k_prefix, v_prefix, k_stream, v_stream, pm, o, lse, seed if seed is not None else q,
        *q.stride(), *k_prefix.stride(), *v_prefix.stride(), *k_stream.stride(), *v_stream.stride(), *spm,
        *scalars, **consts, num_warps=4,
    )
    return o, lse


def backward(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale, dropout_p, seed,
             block_r=None, block_n=None):
    """-> ``dq, dk_prefix, dv_prefix, dk_stream, dv_stream`` (contiguous, inputs' dtype)."""
    (b, h, n, m, s, d), pm, spm, scalars, consts = _common(
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, (block_r, block_n))
    o, lse = o.contiguous(), lse.contiguous()
    dq = torch.empty((b, h, n, m, d), dtype=q.dtype, device=q.device)
    dkp = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dvp = torch.empty_like(dkp)
    dks = torch.empty((b, h, n, m, s, d), dtype=q.dtype, device=q.device)
    dvs = torch.empty_like(dks)
    if b * h * n == 0:
        return dq, dkp, dvp, dks, dvs
    if m == 0:
        return dq, dkp.zero_(), dvp.zero_(), dks, dvs
    sd = seed if seed is not None else q
    strides_q = (*q.stride(), *k_prefix.stride(), *v_prefix.stride())
    _bwd_dkdv_kernel[(b * h, triton.cdiv(n, consts["BLOCK_N"]))](
        q, k_prefix, v_prefix, pm, o, do, lse, sd, dkp, dvp,
        *strides_q, *do.stride(), *spm, *scalars, **consts, num_warps=4,
    )
    _bwd_dq_kernel[(b * h, triton.cdiv(n * m, consts["BLOCK_R"]))](
        q, k_prefix, v_prefix, k_stream, v_stream, pm, o, do, lse, sd, dq, dks, dvs,
        *strides_q, *k_stream.stride(), *v_stream.stride(), *do.stride(), *spm, *scalars, **consts,
        num_warps=4,
    )
    return dq, dkp, dvp, dks, dvs


def dropout_mask(b, h, n, m, s, dropout_p, seed: torch.Tensor) -> torch.Tensor:
    """Debug: the bool keep-mask ``[B,H,N,M,N+S]`` the kernels use for ``seed``
    (a 1-element int64 tensor): the non-causal kernels' mask with N*M rows."""
    return _flat_dropout_mask(b, h, n * m, n, s, dropout_p, seed).view(b, h, n, m, n + s)
