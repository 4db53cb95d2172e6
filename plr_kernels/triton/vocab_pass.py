"""Triton kernels of the vocabulary pass (plr_kernels/vocab_pass.py; PLR Eq. 7 and 11): softmax statistics over
the item table without a ``[rows x V]`` logit matrix.

For query rows ``x_r`` (the K reasoning states of each user, optionally z_rea)
and the item table ``E [V,d]``, with logits ``l_r(v) = x_r.e_v / tau``:

    lse_r = logsumexp_v l_r(v)          mu_r = sum_v p_r(v) e_v      (p_r = softmax_v l_r)
    t_r   = l_r(y_r)                    (the target logit of a cross-entropy row)

Forward: one program per block of rows streams tiles of E with an online
softmax (running max m, running sum s, running ``sum p e`` rescaled by
``exp(m_old - m_new)``), fp32 accumulation (fp64 for fp64 inputs). The
excluded item (padding) gets logit -inf.

Backward (FlashAttention style): with upstream gradients g_lse [R], g_mu [R,d]
and g_t [R], the gradient w.r.t. the logits is, per (row, item),

    G_r(v) = p_r(v) * (g_lse_r + g_mu_r.e_v - g_mu_r.mu_r) + g_t_r [v = y_r]

(d lse/d l(v) = p(v); d mu/d l(v) = p(v)(e_v - mu), the softmax covariance),
recomputing ``p_r(v) = exp(l_r(v) - lse_r)`` tile by tile. Then

    dX_r = sum_v G_r(v) e_v / tau
    dE_v = sum_r G_r(v) x_r / tau  (+ sum_r p_r(v) g_mu_r, the direct term of mu)

dX is reduced over item tiles by one kernel (grid over row blocks), dE over row
blocks by another (grid over item tiles): no atomics, deterministic. The
direct term is optional (``MU_DIRECT``): the stop-gradient KL needs the logit
path only (see ``plr_kernels/vocab_pass.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import stats_dtype
from ._matmul import dot_f64

_NEG_INF = tl.constexpr(float("-inf"))  # globals in @triton.jit code must be constexpr


@triton.jit
def _logits_tile(x, E, cols, doffs, V, D, stride_e, inv_tau, exclude,
                 F64: tl.constexpr, PREC: tl.constexpr):
    """Tile of logits ``x.e_v / tau`` [BM,BN] (-inf for out-of-range or excluded
    items) and the loaded tile of E [BN,BD]."""
    cmask = cols < V
    e = tl.load(E + cols[:, None].to(tl.int64) * stride_e + doffs[None, :],
                mask=cmask[:, None] & (doffs[None, :] < D), other=0.0)
    if F64:
        s = dot_f64(x, tl.trans(e))
    else:
        s = tl.dot(x, tl.trans(e), input_precision=PREC)
    s = s * inv_tau
    valid = cmask & (cols != exclude)
    s = tl.where(valid[None, :], s, _NEG_INF)
    return s, e


@triton.jit
def _vocab_fwd_kernel(X, E, TGT, LSE, MU, TLOGIT, R, V, D, stride_x, stride_e, stride_mu,
                      inv_tau, exclude, HAS_TGT: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    doffs = tl.arange(0, BLOCK_D)
    dmask = doffs < D
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + doffs[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], _NEG_INF, acc_t)
    s_i = tl.zeros([BLOCK_M], acc_t)
    acc = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    if HAS_TGT:
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
        t_logit = tl.zeros([BLOCK_M], acc_t)
    for start in range(0, V, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s, e = _logits_tile(x, E, cols, doffs, V, D, stride_e, inv_tau, exclude, F64, PREC)
        if HAS_TGT:
            # The target logit from the same tile of the same dot (exactly one hit).
            t_logit += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A tile with no valid item keeps m = -inf: shift by 0 to avoid -inf - -inf.
        m_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        s_i = s_i * alpha + tl.sum(p, axis=1)
        if F64:
            pe = dot_f64(p, e)
        else:
            pe = tl.dot(p.to(e.dtype), e, input_precision=PREC)
        acc = acc * alpha[:, None] + pe
        m_i = m_new
    lse = m_i + tl.log(s_i)
    mu = acc / s_i[:, None]
    tl.store(LSE + rows, lse, mask=rmask)
    tl.store(MU + rows[:, None].to(tl.int64) * stride_mu + doffs[None, :], mu,
             mask=rmask[:, None] & dmask[None, :])
    if HAS_TGT:
        tl.store(TLOGIT + rows, t_logit, mask=rmask)


@triton.jit
def _grad_logits_tile(x, gmu, lse, glse, c, gt, tgt, rmask, E, cols, doffs, V, D, stride_e, inv_tau,
                      exclude, HAS_GLSE: tl.constexpr, HAS_GMU: tl.constexpr, HAS_TGT: tl.constexpr,
                      F64: tl.constexpr, PREC: tl.constexpr):
    """G = p * (g_lse + g_mu.e_v - g_mu.mu) + g_t [v = y] on one tile, with p and E."""
    s, e = _logits_tile(x, E, cols, doffs, V, D, stride_e, inv_tau, exclude, F64, PREC)
    p = tl.exp(s - lse[:, None])
    p = tl.where(rmask[:, None], p, 0.0)
    w = tl.zeros_like(p)
    if HAS_GLSE:
        w += glse[:, None]
    if HAS_GMU:
        if F64:
            u = dot_f64(gmu, tl.trans(e))
        else:
            u = tl.dot(gmu, tl.trans(e.to(tl.float32)), input_precision=PREC)
        w += u - c[:, None]
    g = p * w
    if HAS_TGT:
        g += tl.where(cols[None, :] == tgt[:, None], gt[:, None], 0.0)
    return g, p, e


@triton.jit
def _load_row_grads(rows, rmask, doffs, D, X, GMU, LSE, GLSE, C, GT, TGT, stride_x, stride_g,
                    HAS_GLSE: tl.constexpr, HAS_GMU: tl.constexpr, HAS_TGT: tl.constexpr,
                    F64: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    m2 = rmask[:, None] & (doffs[None, :] < D)
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + doffs[None, :], mask=m2, other=0.0)
    lse = tl.load(LSE + rows, mask=rmask, other=0.0)
    glse = tl.zeros_like(lse)
    c = tl.zeros_like(lse)
    gt = tl.zeros_like(lse)
    tgt = tl.full(lse.shape, -1, tl.int64)
    gmu = tl.zeros(x.shape, acc_t)
    if HAS_GLSE:
        glse = tl.load(GLSE + rows, mask=rmask, other=0.0)
    if HAS_GMU:
        gmu = tl.load(GMU + rows[:, None].to(tl.int64) * stride_g + doffs[None, :], mask=m2, other=0.0)
        c = tl.load(C + rows, mask=rmask, other=0.0)
    if HAS_TGT:
        gt = tl.load(GT + rows, mask=rmask, other=0.0)
        tgt = tl.load(TGT + rows, mask=rmask, other=-1)
    return x, gmu, lse, glse, c, gt, tgt


@triton.jit
def _vocab_bwd_dx_kernel(X, E, TGT, LSE, GLSE, GMU, C, GT, DX, R, V, D, stride_x, stride_e, stride_g,
                         stride_dx, inv_tau, exclude, HAS_GLSE: tl.constexpr, HAS_GMU: tl.constexpr,
                         HAS_TGT: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    doffs = tl.arange(0, BLOCK_D)
    x, gmu, lse, glse, c, gt, tgt = _load_row_grads(rows, rmask, doffs, D, X, GMU, LSE, GLSE, C, GT, TGT,
                                                    stride_x, stride_g, HAS_GLSE, HAS_GMU, HAS_TGT, F64)
    dx = tl.zeros([BLOCK_M, BLOCK_D], acc_t)
    for start in range(0, V, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        g, p, e = _grad_logits_tile(x, gmu, lse, glse, c, gt, tgt, rmask, E, cols, doffs, V, D, stride_e,
                                    inv_tau, exclude, HAS_GLSE, HAS_GMU, HAS_TGT, F64, PREC)
        if F64:
            dx += dot_f64(g, e)
        else:
            dx += tl.dot(g, e.to(tl.float32), input_precision=PREC)
    dx = dx * inv_tau
    tl.store(DX + rows[:, None].to(tl.int64) * stride_dx + doffs[None, :], dx,
             mask=rmask[:, None] & (doffs[None, :] < D))


@triton.jit
def _vocab_bwd_de_kernel(X, E, TGT, LSE, GLSE, GMU, C, GT, DE, R, V, D, stride_x, stride_e, stride_g,
                         stride_de, inv_tau, exclude, HAS_GLSE: tl.constexpr, HAS_GMU: tl.constexpr,
                         HAS_TGT: tl.constexpr, MU_DIRECT: tl.constexpr, F64: tl.constexpr,
                         PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    acc_t = tl.float64 if F64 else tl.float32
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    doffs = tl.arange(0, BLOCK_D)
    de = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    de_direct = tl.zeros([BLOCK_N, BLOCK_D], acc_t)
    for start in range(0, R, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < R
        x, gmu, lse, glse, c, gt, tgt = _load_row_grads(rows, rmask, doffs, D, X, GMU, LSE, GLSE, C, GT, TGT,
                                                        stride_x, stride_g, HAS_GLSE, HAS_GMU, HAS_TGT, F64)
        g, p, e = _grad_logits_tile(x, gmu, lse, glse, c, gt, tgt, rmask, E, cols, doffs, V, D, stride_e,
                                    inv_tau, exclude, HAS_GLSE, HAS_GMU, HAS_TGT, F64, PREC)
        if F64:
            de += dot_f64(tl.trans(g), x)
            if MU_DIRECT:
                de_direct += dot_f64(tl.trans(p), gmu)
        else:
            de += tl.dot(tl.trans(g), x.to(tl.float32), input_precision=PREC)
            if MU_DIRECT:
                de_direct += tl.dot(tl.trans(p), gmu, input_precision=PREC)
    de = de * inv_tau + de_direct
    tl.store(DE + cols[:, None].to(tl.int64) * stride_de + doffs[None, :], de,
             mask=(cols[:, None] < V) & (doffs[None, :] < D))


# ---------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------


# (BLOCK_M, BLOCK_N) under TRITON_INTERPRET=1: small for tests; the CPU memory
# script (benchmarks/vocab_memory.py) raises them, the interpreter's cost being per tile.
INTERPRET_BLOCKS = (16, 32)


def _config(d: int, dtype: torch.dtype, interpreting: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_D, precision). Fixed configs: the interpreter
    cannot autotune. Dot dims stay >= 16 and powers of two (GPU limits)."""
    block_d = max(16, triton.next_power_of_2(d))
    if interpreting:
        block_m, block_n = INTERPRET_BLOCKS
    elif block_d > 128 or dtype == torch.float64:
        # The whole row (d <= BLOCK_D) lives in registers: smaller tiles for wide d.
        # Untuned: no GPU was available when this was written (see the issue note).
        block_m, block_n = 32, 32
    else:
        block_m, block_n = 64, 64
    # fp32 follows torch's own matmul setting (tf32 only when the user allowed it).
    prec = "tf32" if (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return block_m, block_n, block_d, prec


def _warps(block_d: int) -> int:
    return 8 if block_d >= 128 else 4


def _on_cpu(t: torch.Tensor) -> bool:
    """CPU tensors reach a Triton kernel only under TRITON_INTERPRET=1 (tests)."""
    return t.device.type == "cpu"


def vocab_forward(x: torch.Tensor, item_emb: torch.Tensor, target, temperature: float, exclude_index: int):
    """``x [R,d]``, ``item_emb [V,d]``, ``target [R]`` int64 (-1 = no target) or None.

    Returns ``lse [R]``, ``mu [R,d]``, ``t_logit [R]`` (zeros without target),
    in fp32 (fp64 for fp64 inputs)."""
    x, item_emb = x.contiguous(), item_emb.contiguous()
    r, d = x.shape
    v = item_emb.shape[0]
    f64 = x.dtype == torch.float64
    acc_dtype = stats_dtype(x.dtype)
    lse = torch.empty(r, dtype=acc_dtype, device=x.device)
    mu = torch.empty(r, d, dtype=acc_dtype, device=x.device)
    t_logit = torch.zeros(r, dtype=acc_dtype, device=x.device)
    if r == 0:
        return lse, mu, t_logit
    bm, bn, bd, prec = _config(d, x.dtype, _on_cpu(x))
    has_tgt = target is not None
    tgt = target.contiguous() if has_tgt else lse  # dummy pointer when unused
    _vocab_fwd_kernel[(triton.cdiv(r, bm),)](
        x, item_emb, tgt, lse, mu, t_logit, r, v, d, x.stride(0), item_emb.stride(0), mu.stride(0),
        1.0 / temperature, exclude_index, HAS_TGT=has_tgt, F64=f64, PREC=prec,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=_warps(bd),
    )
    return lse, mu, t_logit


def vocab_backward(x, item_emb, target, lse, g_lse, g_mu, c, g_t, temperature: float, exclude_index: int,
                   mu_direct: bool, need_dx: bool, need_de: bool):
    """Gradients ``(dx [R,d], dE [V,d])`` (None where not needed) of a loss with
    upstream ``g_lse [R]``, ``g_mu [R,d]``, ``g_t [R]`` (each may be None) and
    ``c = sum_d g_mu * mu`` [R]. fp32 accumulation, results in the input dtype."""
    x, item_emb = x.contiguous(), item_emb.contiguous()
    r, d = x.shape
    v = item_emb.shape[0]
    f64 = x.dtype == torch.float64
    bm, bn, bd, prec = _config(d, x.dtype, _on_cpu(x))
    has_glse, has_gmu, has_tgt = g_lse is not None, g_mu is not None, (g_t is not None and target is not None)
    acc_dtype = lse.dtype
    dummy = lse
    args = [
        x, item_emb, target.contiguous() if has_tgt else dummy, lse,
        g_lse.to(acc_dtype).contiguous() if has_glse else dummy,
        g_mu.to(acc_dtype).contiguous() if has_gmu else dummy,
        c.to(acc_dtype).contiguous() if has_gmu else dummy,
        g_t.to(acc_dtype).contiguous() if has_tgt else dummy,
    ]
    g_stride = d
    flags = dict(HAS_GLSE=has_glse, HAS_GMU=has_gmu, HAS_TGT=has_tgt)
    dx = de = None
    if need_dx:
        dx = torch.empty(r, d, dtype=acc_dtype, device=x.device)
        if r:
            _vocab_bwd_dx_kernel[(triton.cdiv(r, bm),)](
                *args, dx, r, v, d, x.stride(0), item_emb.stride(0), g_stride, dx.stride(0),
                1.0 / temperature, exclude_index, **flags, F64=f64, PREC=prec,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=_warps(bd),
            )
        dx = dx.to(x.dtype)
    if need_de:
        de = torch.empty(v, d, dtype=acc_dtype, device=x.device)
        _vocab_bwd_de_kernel[(triton.cdiv(v, bn),)](
            *args, de, r, v, d, x.stride(0), item_emb.stride(0), g_stride, de.stride(0),
            1.0 / temperature, exclude_index, **flags, MU_DIRECT=bool(mu_direct and has_gmu), F64=f64,
            PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=_warps(bd),
        )
        de = de.to(item_emb.dtype)
    return dx, de
