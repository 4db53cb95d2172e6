"""Triton kernels of full-ranking evaluation and top-K retrieval (plr_kernels/target_rank.py, plr_kernels/topk.py).

Scores ``s_b(v) = z_b.e_v`` are streamed over tiles of the item table; the
``[B x V]`` score matrix is never stored (O(B) memory for ranks, O(B k) for
top-K). Scores are accumulated in fp32 (fp64 for fp64 inputs) with IEEE dots.

target_rank: ``rank_b = 1 + #{v candidate : s_b(v) > s_b(y_b)}`` (optimistic) or
``>=`` (pessimistic). Candidates: every item except the target itself,
``exclude_index`` and the non-negative ids of the row's ``exclude_items``.
A NaN candidate beats nothing; a NaN target is beaten by every candidate.
The target's own score is computed by the *same* ``tl.dot`` of the same shape
as every streamed tile (a tile whose column j holds the target of row j; its
diagonal is kept), so exact ties compare equal.

topk: each program keeps a running top-k buffer per row and merges every tile
into it by k rounds of selection on the key (score descending, item id
ascending): ties go to the smaller id, excluded items carry the id sentinel
``V`` so they rank after every real item and come out as ``(-inf, -1)``;
items scoring NaN are excluded the same way.
Tiles that cannot improve any row of the block are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import stats_dtype
from ._matmul import dot_f64

_NEG_INF = tl.constexpr(float("-inf"))  # globals in @triton.jit code must be constexpr
MAX_K = 1024  # the running top-k buffer [BLOCK_M, next_pow2(k)] lives in registers


@triton.jit
def _score_tile(z, E, cols, doffs, V, D, stride_e, F64: tl.constexpr):
    e = tl.load(E + cols[:, None].to(tl.int64) * stride_e + doffs[None, :],
                mask=(cols[:, None] < V) & (doffs[None, :] < D), other=0.0)
    if F64:
        s = dot_f64(z, tl.trans(e))
    else:
        s = tl.dot(z.to(tl.float32), tl.trans(e.to(tl.float32)), input_precision="ieee")
    return s


@triton.jit
def _excluded_tile(rows, rmask, cols, V, exclude, HIST, L, stride_h, HAS_HIST: tl.constexpr):
    """[BM,BN] True where item ``cols`` is no candidate for row ``rows`` (out of
    range, exclude_index or in the row's history; negative history ids match nothing)."""
    ex = (cols[None, :] >= V) | (cols[None, :] == exclude) | (rows[:, None] < 0)  # (the last: [BM,BN] shape)
    if HAS_HIST:
        for j in range(0, L):
            hj = tl.load(HIST + rows.to(tl.int64) * stride_h + j, mask=rmask, other=-1)
            ex = ex | (cols[None, :] == hj[:, None])
    return ex


@triton.jit
def _rank_kernel(Z, E, TGT, HIST, OUT, B, V, D, L, stride_z, stride_e, stride_h, exclude,
                 HAS_HIST: tl.constexpr, PESSIMISTIC: tl.constexpr, F64: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    doffs = tl.arange(0, BLOCK_D)
    z = tl.load(Z + rows[:, None].to(tl.int64) * stride_z + doffs[None, :],
                mask=rmask[:, None] & (doffs[None, :] < D), other=0.0)
    tgt = tl.load(TGT + rows, mask=rmask, other=0)
    # Target scores: column j of this tile is the target of row j (BLOCK_N >= BLOCK_M),
    # scored by the same dot as the streamed tiles; keep the diagonal.
    jj = tl.arange(0, BLOCK_N)
    tcols = tl.load(TGT + tl.program_id(0) * BLOCK_M + jj, mask=(jj < BLOCK_M) & (tl.program_id(0) * BLOCK_M + jj < B),
                    other=V)
    st = _score_tile(z, E, tcols, doffs, V, D, stride_e, F64)
    diag = tl.arange(0, BLOCK_M)[:, None] == jj[None, :]
    s_t = tl.sum(tl.where(diag, st, 0.0), axis=1)
    count = tl.zeros([BLOCK_M], tl.int64)
    for start in range(0, V, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _score_tile(z, E, cols, doffs, V, D, stride_e, F64)
        ex = _excluded_tile(rows, rmask, cols, V, exclude, HIST, L, stride_h, HAS_HIST)
        ex = ex | (cols[None, :] == tgt[:, None])  # the target is not its own competitor
        if PESSIMISTIC:
            beats = s >= s_t[:, None]
        else:
            beats = s > s_t[:, None]
        beats = beats | (s_t != s_t)[:, None]  # a NaN target ranks last
        count += tl.sum((beats & ~ex).to(tl.int64), axis=1)
    tl.store(OUT + rows, count + 1, mask=rmask)


@triton.jit
def _topk_kernel(Z, E, HIST, VALS, IDX, B, V, D, L, stride_z, stride_e, stride_h, exclude, k,
                 HAS_HIST: tl.constexpr, F64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    doffs = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, BLOCK_K)
    z = tl.load(Z + rows[:, None].to(tl.int64) * stride_z + doffs[None, :],
                mask=rmask[:, None] & (doffs[None, :] < D), other=0.0)
    # Running top-k, best first; empty slots are (-inf, V): after every real item.
    bv = tl.full([BLOCK_M, BLOCK_K], _NEG_INF, acc_t)
    bi = tl.full([BLOCK_M, BLOCK_K], V, tl.int64)
    for start in range(0, V, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _score_tile(z, E, cols, doffs, V, D, stride_e, F64)
        ex = _excluded_tile(rows, rmask, cols, V, exclude, HIST, L, stride_h, HAS_HIST)
        ex = ex | (s != s)  # NaN scores are no candidates
        ci = tl.where(ex, V, cols[None, :].to(tl.int64))
        s = tl.where(ex, _NEG_INF, s)
        # Skip the merge unless some row has a tile item before its k-th entry.
        kth_v = tl.sum(tl.where(kk[None, :] == k - 1, bv, 0.0), axis=1)
        kth_i = tl.sum(tl.where(kk[None, :] == k - 1, bi, 0), axis=1)
        better = (s > kth_v[:, None]) | ((s == kth_v[:, None]) & (ci < kth_i[:, None]))
        if tl.sum((better & rmask[:, None]).to(tl.int32)) > 0:
            nv = tl.full([BLOCK_M, BLOCK_K], _NEG_INF, acc_t)
            ni = tl.full([BLOCK_M, BLOCK_K], V, tl.int64)
            for j in range(0, k):
                # Best remaining key over buffer and tile: max score, then min id.
                m = tl.maximum(tl.max(bv, axis=1), tl.max(s, axis=1))
                i_b = tl.min(tl.where(bv == m[:, None], bi, V), axis=1)
                i_s = tl.min(tl.where(s == m[:, None], ci, V), axis=1)
                i = tl.minimum(i_b, i_s)
                nv = tl.where(kk[None, :] == j, m[:, None], nv)
                ni = tl.where(kk[None, :] == j, i[:, None], ni)
                # Remove the chosen real item (ids are unique across buffer and tile).
                taken_b = (bi == i[:, None]) & (i[:, None] < V)
                taken_s = (ci == i[:, None]) & (i[:, None] < V)
                bv = tl.where(taken_b, _NEG_INF, bv)
                bi = tl.where(taken_b, V, bi)
                s = tl.where(taken_s, _NEG_INF, s)
                ci = tl.where(taken_s, V, ci)
            bv = nv
            bi = ni
    out = rows[:, None].to(tl.int64) * k + kk[None, :]
    omask = rmask[:, None] & (kk[None, :] < k)
    tl.store(VALS + out, bv, mask=omask)
    tl.store(IDX + out, tl.where(bi >= V, -1, bi), mask=omask)


def _blocks(d: int, interpreting: bool):
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting:
        return 16, 32, block_d
    return (32, 64, block_d) if block_d <= 256 else (16, 32, block_d)


def _hist(exclude_items, z):
    if exclude_items is None:
        return z, 0, 0, False
    h = exclude_items.contiguous()
    return h, h.shape[1], h.stride(0), h.shape[1] > 0


def target_rank(z, item_emb, target, exclude_index, exclude_items, pessimistic: bool):
    """int64 ``[B]`` exact ranks; see the module docstring."""
    z, item_emb, target = z.contiguous(), item_emb.contiguous(), target.contiguous()
    b, d = z.shape
    v = item_emb.shape[0]
    out = torch.empty(b, dtype=torch.int64, device=z.device)
    if b == 0:
        return out
    bm, bn, bd = _blocks(d, z.device.type == "cpu")
    hist, n_hist, stride_h, has_hist = _hist(exclude_items, z)
    _rank_kernel[(triton.cdiv(b, bm),)](
        z, item_emb, target, hist, out, b, v, d, n_hist, z.stride(0), item_emb.stride(0), stride_h,
        -1 if exclude_index is None else exclude_index, HAS_HIST=has_hist, PESSIMISTIC=bool(pessimistic),
        F64=z.dtype == torch.float64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )
    return out


def topk(z, item_emb, k: int, exclude_index, exclude_items):
    """``(values [B,k], indices [B,k])``; see the module docstring."""
    z, item_emb = z.contiguous(), item_emb.contiguous()
    b, d = z.shape
    v = item_emb.shape[0]
    f64 = z.dtype == torch.float64
    vals = torch.empty(b, k, dtype=stats_dtype(z.dtype), device=z.device)
    idx = torch.empty(b, k, dtype=torch.int64, device=z.device)
    if b == 0:
        return vals, idx
    if k > MAX_K and z.device.type != "cpu":
        raise ValueError(f"k: the triton topk keeps the top k in registers and supports k <= {MAX_K}, "
                         f"got {k}; use backend='torch' for larger k")
    bm, bn, bd = _blocks(d, z.device.type == "cpu")
    hist, n_hist, stride_h, has_hist = _hist(exclude_items, z)
    _topk_kernel[(triton.cdiv(b, bm),)](
        z, item_emb, hist, vals, idx, b, v, d, n_hist, z.stride(0), item_emb.stride(0), stride_h,
        -1 if exclude_index is None else exclude_index, k, HAS_HIST=has_hist, F64=f64,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=max(16, triton.next_power_of_2(k)),
    )
    return vals, idx
