"""Triton kernels of stream-isolated causal attention (PLR Eq. 4-5).

One program per (user b, head h) holds the queries of all M streams of the
step (``BLOCK_M >= M`` rows, padded rows masked) and

* reads the shared prefix K/V ONCE for all streams: online softmax over
  prefix tiles of ``BLOCK_N`` keys (``s = q k^T * scale``, invalid keys at
  -inf), then the S keys of each stream's own reasoning tokens (one
  per-row dot product each), merged into the same running (max, sum) --
  the log-sum-exp merge ``lse = m + log(l)`` in the accumulation dtype;
* the backward recomputes ``P = exp(s - lse)`` and, with
  ``Delta_m = dO_m . O_m``, ``dS = P * (dP - Delta)``, gives
  ``dQ = dS K * scale``, ``dK = dS^T Q * scale``, ``dV = P~^T dO`` (``P~`` the
  dropped, rescaled probabilities). dK/dV of the prefix are summed over the
  M streams inside the program, no atomics: deterministic.

Attention dropout (the reference's layout): the keep-mask ``[B,H,M,N+S]``,
prefix keys first, is ``Philox(seed, offset) >= p`` with the int64 offset
``((b*H + h)*M + m)*(N+S) + j``, regenerated identically in the backward and
by :func:`dropout_mask` (the debug path). The seed is read from a 1-element
int64 tensor so that a fresh seed per call does not recompile.

Accumulation is fp32 (fp64 for fp64 inputs, whose lse is then fp64 too).
Python floats reach a kernel as fp32, so ``scale`` and ``1/(1-p)`` are passed
as an fp32 pair ``hi + lo`` that is exact to ~1e-16 in fp64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import stats_dtype
from ._attention_tiles import (bwd_prefix_tile, bwd_stream_keys, fwd_prefix_tiles, fwd_stream_keys, key_valid,
                               kv_tile, load_seed)
from ._attention_tiles import keep as _keep
from ._matmul import dot as _dot

__all__ = ["forward", "backward", "dropout_mask", "block_sizes"]


@triton.jit
def _fwd_kernel(
    Q, KP, VP, KS, VS, PM, O, LSE, SEED,
    sq_b, sq_h, sq_m, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    sks_b, sks_h, sks_m, sks_s, sks_d,
    svs_b, svs_h, svs_m, svs_s, svs_d,
    spm_b, spm_n,
    H, M, N, S, D,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    acc_t = LSE.dtype.element_ty  # fp32 accumulation, fp64 for fp64 inputs
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d, mask=md_ok, other=0.0)
    row = pid * M + offs_m  # (b*H + h)*M + m, int64
    NS = N + S
    seed = load_seed(SEED, DROPOUT)

    # Running max starts finite so that a fully padded prefix (all scores
    # -inf) gives exp(-inf - finite) = 0, never inf - inf = NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, acc_t)
    l_i = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)

    # Shared prefix, read once for all M streams (Eq. 4: every valid prefix key).
    m_i, l_i, acc = fwd_prefix_tiles(
        q, KP + b * skp_b + h * skp_h, VP + b * svp_b + h * svp_h, PM + b * spm_b, skp_n, skp_d, svp_n, svp_d,
        spm_n, N, N, offs_m, offs_d, d_ok, m_i, l_i, acc, seed, row, NS,
        scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
        False, HAS_MASK, DROPOUT, PRECISION, F64, BLOCK_N)
    # The stream's own keys 1..S (Eq. 4-5), merged into the same lse.
    ks_rows = KS + b * sks_b + h * sks_h + offs_m[:, None] * sks_m
    vs_rows = VS + b * svs_b + h * svs_h + offs_m[:, None] * svs_m
    m_i, l_i, acc = fwd_stream_keys(
        q, ks_rows, vs_rows, sks_s, sks_d, svs_s, svs_d, offs_d, md_ok, N, S, m_i, l_i, acc, seed, row, NS,
        scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT)

    o = acc / l_i[:, None]
    tl.store(O + pid * M * D + offs_m[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=md_ok)
    tl.store(LSE + pid * M + offs_m, (m_i + tl.log(l_i)).to(LSE.dtype.element_ty), mask=m_ok)


@triton.jit
def _bwd_kernel(
    Q, KP, VP, KS, VS, PM, O, DO, LSE, SEED,
    DQ, DKP, DVP, DKS, DVS,
    sq_b, sq_h, sq_m, sq_d,
    skp_b, skp_h, skp_n, skp_d,
    svp_b, svp_h, svp_n, svp_d,
    sks_b, sks_h, sks_m, sks_s, sks_d,
    svs_b, svs_h, svs_m, svs_s, svs_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    spm_b, spm_n,
    H, M, N, S, D,
    scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    acc_t = LSE.dtype.element_ty  # fp32 accumulation, fp64 for fp64 inputs
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    row = pid * M + offs_m
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :] * sq_d, mask=md_ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_m + offs_d[None, :] * sdo_d,
                 mask=md_ok, other=0.0)
    o = tl.load(O + pid * M * D + offs_m[:, None] * D + offs_d[None, :], mask=md_ok, other=0.0)
    lse = tl.load(LSE + pid * M + offs_m, mask=m_ok, other=0.0).to(acc_t)
    # Delta_m = sum_j P_mj dP_mj = dO_m . O_m (dropout included: O uses P~).
    delta = tl.sum(do.to(acc_t) * o.to(acc_t), 1)
    NS = N + S
    seed = load_seed(SEED, DROPOUT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], acc_t)

    KPb = KP + b * skp_b + h * skp_h
    VPb = VP + b * svp_b + h * svp_h
    for start in range(0, N, BLOCK_N):
        n_idx = start + offs_n
        nd_ok = (n_idx < N)[:, None] & d_ok[None, :]
        k = kv_tile(KPb, skp_n, skp_d, n_idx, offs_d, nd_ok)
        v = kv_tile(VPb, svp_n, svp_d, n_idx, offs_d, nd_ok)
        valid = m_ok[:, None] & key_valid(PM + b * spm_b, spm_n, n_idx, N, offs_m, HAS_MASK, False)
        pd, ds = bwd_prefix_tile(q, k, v, do, valid, lse, delta, seed, row, n_idx, NS,
                                 scale_hi, scale_lo, dropout_p, keep_hi, keep_lo,
                                 DROPOUT, PRECISION, F64)
        # Sums over the M streams of this (b, h): dV = P~^T dO, dK = dS^T Q * scale.
        dv = _dot(tl.trans(pd).to(do.dtype), do, PRECISION, F64).to(acc_t)
        dk = _dot(tl.trans(ds).to(q.dtype), q, PRECISION, F64).to(acc_t)
        dk = dk * scale_hi + dk * scale_lo
        dq += _dot(ds.to(k.dtype), k, PRECISION, F64).to(acc_t)
        out = pid * N * D + n_idx[:, None] * D + offs_d[None, :]
        tl.store(DKP + out, dk.to(DKP.dtype.element_ty), mask=nd_ok)
        tl.store(DVP + out, dv.to(DVP.dtype.element_ty), mask=nd_ok)

    ks_rows = KS + b * sks_b + h * sks_h + offs_m[:, None] * sks_m
    vs_rows = VS + b * svs_b + h * svs_h + offs_m[:, None] * svs_m
    dq = bwd_stream_keys(
        q, do, ks_rows, vs_rows, DKS, DVS, pid * M * S * D + offs_m[:, None] * (S * D),
        sks_s, sks_d, svs_s, svs_d, offs_d, md_ok, m_ok, N, S, D,
        lse, delta, dq, seed, row, NS,
        scale_hi, scale_lo, dropout_p, keep_hi, keep_lo, DROPOUT)
    dq = dq * scale_hi + dq * scale_lo
    tl.store(DQ + pid * M * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _mask_kernel(OUT, SEED, M, NS, dropout_p, BLOCK: tl.constexpr):
    """The keep-mask [B,H,M,N+S] exactly as the forward/backward draw it."""
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(SEED)
    for start in range(0, M * NS, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        ok = idx < M * NS
        row = pid * M + idx // NS
        keep = _keep(seed, row, idx % NS, NS, dropout_p)
        tl.store(OUT + pid * M * NS + idx, keep.to(tl.int8), mask=ok)


# ------------------------------------------------------------------ host side


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def block_sizes(m: int, n: int, d: int, block_n=None, itemsize: int = 2):
    """(BLOCK_M, BLOCK_N, BLOCK_D): powers of two >= 16 (GPU tl.dot needs K >= 16
    for 16-bit inputs); the remainder is masked. A K/V tile stays <= 16 KiB."""
    block_d = _pow2(d)
    if block_n is None:
        block_n = min(_pow2(n), max(16, min(64, 16384 // (block_d * itemsize))))
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n: expected a power of two >= 16, got {block_n}")
    return _pow2(m), block_n, block_d


def _split(x: float):
    """x as an fp32 pair hi + lo (exact to ~1e-16): kernel float args are fp32."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    return hi, float(torch.tensor(x - hi, dtype=torch.float32))


# Accumulation (and lse) dtype; the kernels read it off the lse pointer.
_acc = stats_dtype


def _precision(dtype):
    # fp32 inputs follow torch's matmul TF32 switch (off by default), so the
    # kernel matches an fp32 reference; 16-bit and fp64 dots are exact-input.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def launch_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed):
    """What the launchers of both forms (this module and causal_stream_attention.py)
    check and derive: one dtype and device, the seed tensor, the int8 view of
    the mask and its strides, ``scale`` and ``1/(1-p)`` as fp32 pairs.
    Returns ``(pm, spm, scalars, consts)``."""
    for name, t in (("q", q), ("k_prefix", k_prefix), ("v_prefix", v_prefix),
                    ("k_stream", k_stream), ("v_stream", v_stream)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    if k_stream.shape[-2] < 1:
        raise ValueError("k_stream: expected S >= 1")
    if dropout_p > 0.0 and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError("seed: expected a 1-element int64 tensor when dropout_p > 0")
    if prefix_mask is None:
        pm, spm, has_mask = q, (0, 0), False  # never read
    else:
        pm = prefix_mask.view(torch.int8) if prefix_mask.dtype == torch.bool else prefix_mask
        spm, has_mask = pm.stride(), True
    scale_hi, scale_lo = _split(scale)
    keep_hi, keep_lo = _split(1.0 / (1.0 - dropout_p))
    consts = dict(HAS_MASK=has_mask, DROPOUT=dropout_p > 0.0, PRECISION=_precision(q.dtype),
                  F64=q.dtype == torch.float64)
    return pm, spm, (scale_hi, scale_lo, float(dropout_p), keep_hi, keep_lo), consts


def _common(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, block_n):
    pm, spm, scalars, consts = launch_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale,
                                           dropout_p, seed)
    b, h, m, d = q.shape
    n, s = k_prefix.shape[2], k_stream.shape[3]
    block_m, bn, block_d = block_sizes(m, n, d, block_n, q.element_size())
    args = (*q.stride(), *k_prefix.stride(), *v_prefix.stride(), *k_stream.stride(), *v_stream.stride())
    consts.update(BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=block_d)
    return (b, h, m, n, s, d), pm, spm, args, (h, m, n, s, d, *scalars), consts


def forward(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, block_n=None):
    """-> ``o [B,H,M,D]`` (q's dtype), ``lse [B,H,M]`` (fp32; fp64 for fp64 inputs).

    ``seed``: 1-element int64 tensor on q's device (read only when dropout_p > 0).
    """
    (b, h, m, n, s, d), pm, spm, args, scalars, consts = _common(
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, block_n)
    o = torch.empty((b, h, m, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, m), dtype=_acc(q.dtype), device=q.device)
    if b * h == 0:
        return o, lse
    _fwd_kernel[(b * h,)](
        q, k_prefix, v_prefix, k_stream, v_stream, pm, o, lse, seed if seed is not None else q,
        *args, *spm, *scalars, **consts, num_warps=4,
    )
    return o, lse


def backward(do, q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, o, lse, scale, dropout_p, seed,
             block_n=None):
    """-> ``dq, dk_prefix, dv_prefix, dk_stream, dv_stream`` (contiguous, inputs' dtype)."""
    (b, h, m, n, s, d), pm, spm, args, scalars, consts = _common(
        q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed, block_n)
    o, lse = o.contiguous(), lse.contiguous()
    dq = torch.empty((b, h, m, d), dtype=q.dtype, device=q.device)
    dkp = torch.empty((b, h, n, d), dtype=q.dtype, device=q.device)
    dvp = torch.empty_like(dkp)
    dks = torch.empty((b, h, m, s, d), dtype=q.dtype, device=q.device)
    dvs = torch.empty_like(dks)
    if b * h == 0:
        return dq, dkp, dvp, dks, dvs
    _bwd_kernel[(b * h,)](
        q, k_prefix, v_prefix, k_stream, v_stream, pm, o, do, lse, seed if seed is not None else q,
        dq, dkp, dvp, dks, dvs,
        *args, *do.stride(), *spm, *scalars, **consts, num_warps=4,
    )
    return dq, dkp, dvp, dks, dvs


def dropout_mask(b, h, m, n, s, dropout_p, seed: torch.Tensor) -> torch.Tensor:
    """Debug: the bool keep-mask ``[B,H,M,N+S]`` the kernels use for ``seed``
    (a 1-element int64 tensor; its device is the output's)."""
    out = torch.empty((b, h, m, n + s), dtype=torch.int8, device=seed.device)
    if out.numel():
        _mask_kernel[(b * h,)](out, seed, m, n + s, float(dropout_p), BLOCK=256)
    return out.view(torch.bool)
