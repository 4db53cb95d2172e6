"""The vocabulary pass: softmax statistics of rows over the whole item table,
one op per backend, and the algebra that turns them into PLR's losses.

For rows ``x_r`` and the item table ``E [V,d]``, with logits
``l_r(v) = x_r.e_v / tau`` (the excluded item at -inf) and ``p_r = softmax l_r``:

    lse_r = logsumexp_v l_r(v),    mu_r = sum_v p_r(v) e_v,    t_r = l_r(y_r)

(``t_r = 0`` for rows without a target). One streaming pass over tiles of E
(online softmax) gives them without a ``[R x V]`` logit matrix; the backward
is a second pass. The ops, all ``(x, item_emb, target, temperature,
exclude_index, mu_direct) -> (lse [R], mu [R,d], t [R])`` in the statistics
dtype (``_checks.stats_dtype``), with one autograd setup/backward:

* ``plr_kernels::vocab_stats_triton`` / ``_triton_backward``: custom ops on
  the Triton kernels of plr_kernels/triton/vocab_pass.py (CUDA; CPU tensors
  under TRITON_INTERPRET=1);
* ``plr_kernels::vocab_forward`` / ``vocab_backward``: the C++/OpenMP kernels
  of csrc/vocab_pass.cpp (CPU tensors), whose fakes and autograd are
  registered here (csrc/ops.cpp names this module);
* ``torch``: the same statistics from the materialised logits.

The losses are small expressions of these O(R d) statistics (the "mu-form";
``plr_kernels.reference`` states the losses as the paper writes them and
tests/test_reference_ops.py checks the two equal):

* L_NIP of PLR Eq. 11: ``CE(z, y) = lse_z - t_z``; autograd gives
  ``dCE/dz = (mu_z - e_y) / tau`` through the backward pass.
* L_KL of PLR Eq. 7: ``KL(p_i || p_j) = (h_i - h_j).mu_i / tau - lse_i + lse_j``,
  and over the K(K-1) ordered pairs the lse terms cancel, so per user

      L_KL = 1/(K(K-1)) sum_{i != j} KL(p_i||p_j) = sum_i w_i . mu_i,
      w_i = (h_i - h_mean) / (tau (K-1)).

  Full gradient: autograd through ``w`` (direct term (mu_i - mu_mean)/(tau(K-1))
  on h_i) and through ``mu`` (the softmax covariance, streamed in the backward
  with g_mu = w, plus the direct term ``sum_i p_i(v) w_i`` of mu on e_v).

  Stop-gradient through log p_j (``detach_target``, ReaRec-ERL). Writing
  ``L = 1/(K(K-1)) [K sum_i S_i - sum_i p_i . sg(c)]`` with
  ``S_i = p_i . log p_i`` and ``c = sum_j log p_j``, and differentiating
  w.r.t. the logits l_i(v) (h and E enter only through the logits: log p_j is
  detached, and S_i, p_i are functions of l_i alone):

      dS_i/dl_i(v)          = p_i(v) (log p_i(v) - S_i)
                            = p_i(v) (l_i(v) - h_i.mu_i / tau)          (lse_i cancels)
      d(p_i.c)/dl_i(v)      = p_i(v) (c(v) - p_i.c)
                            = K p_i(v) (l_mean(v) - h_mean.mu_i / tau)  (sum_j lse_j cancels)
      dL/dl_i(v) = p_i(v) [(l_i(v) - l_mean(v)) - (h_i - h_mean).mu_i / tau] / (K-1)
                 = p_i(v) (w_i.e_v - w_i.mu_i).

  That is exactly the covariance part of the full gradient with g_mu = w: the
  stop-gradient drops the direct terms, i.e. it is the gradient of
  ``sum_i sg(w_i) . mu_i`` when mu's explicit dependence on e_v is dropped
  (``mu_direct=False``). Tested against autograd of the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _checks, _dispatch, _extension

Tensor = torch.Tensor
NO_INDEX = _checks.NO_INDEX


def _stats_fake(x, item_emb, target, temperature, exclude_index, mu_direct=True):
    dt = _checks.stats_dtype(x.dtype)
    r, d = x.shape
    return x.new_empty(r, dtype=dt), x.new_empty(r, d, dtype=dt), x.new_empty(r, dtype=dt)


def _backward_fake(x, item_emb, target, lse, g_lse, g_mu, c, g_t, temperature, exclude_index, mu_direct,
                   need_dx=True):
    return x.new_empty(x.shape[0] if need_dx else 0, x.shape[1]), torch.empty_like(item_emb)


# -- autograd shared by every backend's statistics op ----------------------------


def _setup_context(ctx, inputs, output):
    x, item_emb, target, temperature, exclude_index, mu_direct = inputs
    lse, mu, _ = output
    ctx.save_for_backward(x, item_emb, target, lse, mu)
    ctx.args = (temperature, exclude_index, mu_direct)
    ctx.set_materialize_grads(False)


def _dx_from_mu(x, item_emb, target, mu, g_lse, g_t, temperature):
    """dx without a pass over E when no gradient reaches mu: then the logit
    gradient is G_r(v) = p_r(v) g_lse_r + g_t_r [v = y_r], so
    dx_r = sum_v G_r(v) e_v / tau = (g_lse_r mu_r + g_t_r e_{y_r}) / tau
    (mu_r = sum_v p_r(v) e_v, the forward's; no term where y_r = -1)."""
    dx = torch.zeros_like(mu) if g_lse is None else g_lse.to(mu.dtype)[:, None] * mu
    if g_t is not None and target is not None:
        has = target >= 0
        e_y = item_emb[target.clamp_min(0)].to(mu.dtype)
        dx = dx + torch.where(has, g_t.to(mu.dtype), torch.zeros_like(g_t, dtype=mu.dtype))[:, None] * e_y
    return (dx / temperature).to(x.dtype)


def _backward_through(backward_op):
    """The autograd backward of a statistics op whose backward op is
    ``backward_op(x, E, target, lse, g_lse, g_mu, c, g_t, temperature,
    exclude_index, mu_direct, need_dx) -> (dx, dE)``, with ``c_r = g_mu_r . mu_r``.
    Without a gradient on mu (a cross-entropy: lse and the target logit only)
    dx comes from the forward's mu (``_dx_from_mu``) and the op passes over E
    once, for dE, instead of twice."""

    def backward(ctx, g_lse, g_mu, g_t):
        x, item_emb, target, lse, mu = ctx.saved_tensors
        need_dx, need_de = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lse is None and g_mu is None and g_t is None) or not (need_dx or need_de):
            return None, None, None, None, None, None
        temperature = ctx.args[0]
        dx = de = None
        from_mu = g_mu is None
        if need_de or not from_mu:
            c = (g_mu.to(mu.dtype) * mu).sum(-1) if g_mu is not None else None
            dx, de = backward_op(x, item_emb, target, lse, g_lse, g_mu, c, g_t, *ctx.args, not from_mu)
        if need_dx and from_mu:
            dx = _dx_from_mu(x, item_emb, target, mu, g_lse, g_t, temperature)
        return (dx if need_dx else None, de if need_de else None, None, None, None, None)

    return backward


# -- Triton: custom ops on plr_kernels/triton/vocab_pass.py ----------------------


def _define_triton_ops():
    def stats(x: Tensor, item_emb: Tensor, target: Optional[Tensor], temperature: float, exclude_index: int,
              mu_direct: bool) -> Tuple[Tensor, Tensor, Tensor]:
        from .triton import vocab_pass as kernels

        return kernels.vocab_forward(x, item_emb, target, temperature, exclude_index)

    def backward(x: Tensor, item_emb: Tensor, target: Optional[Tensor], lse: Tensor, g_lse: Optional[Tensor],
                 g_mu: Optional[Tensor], c: Optional[Tensor], g_t: Optional[Tensor], temperature: float,
                 exclude_index: int, mu_direct: bool, need_dx: bool = True) -> Tuple[Tensor, Tensor]:
        from .triton import vocab_pass as kernels

        dx, de = kernels.vocab_backward(x, item_emb, target, lse, g_lse, g_mu, c, g_t, temperature, exclude_index,
                                        mu_direct, need_dx, True)
        return (dx if need_dx else x.new_empty(0, x.shape[1])), de

    stats_op = torch.library.custom_op("plr_kernels::vocab_stats_triton", stats, mutates_args=())
    stats_op.register_fake(_stats_fake)
    backward_op = torch.library.custom_op("plr_kernels::vocab_stats_triton_backward", backward, mutates_args=())
    backward_op.register_fake(_backward_fake)
    stats_op.register_autograd(_backward_through(backward_op), setup_context=_setup_context)
    return stats_op


# -- compiled: plr_kernels::vocab_forward / vocab_backward of csrc/vocab_pass.cpp --


if _extension.compiled_op_exists("plr_kernels::vocab_forward"):
    torch.library.register_fake("plr_kernels::vocab_forward", _stats_fake)
    torch.library.register_fake("plr_kernels::vocab_backward", _backward_fake)
    torch.library.register_autograd("plr_kernels::vocab_forward",
                                    _backward_through(torch.ops.plr_kernels.vocab_backward),
                                    setup_context=_setup_context)


def _compiled_stats(x, item_emb, target, temperature, exclude_index, mu_direct):
    return torch.ops.plr_kernels.vocab_forward(x, item_emb, target, temperature, exclude_index, mu_direct)


# -- torch: the statistics from the materialised [R x V] logits -------------------


def _torch_stats(x, item_emb, target, temperature, exclude_index, mu_direct):
    acc = _checks.stats_dtype(x.dtype)
    e = item_emb.to(acc)
    logits = x.to(acc) @ e.T / temperature
    if exclude_index != NO_INDEX:
        logits = logits.index_fill(-1, torch.tensor([exclude_index], device=x.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    # mu_direct=False: E enters mu through the logits only (the stop-gradient KL).
    mu = torch.softmax(logits, dim=-1) @ (e if mu_direct else e.detach())
    if target is None:
        t = torch.zeros_like(lse)
    else:
        t = torch.where(target >= 0, logits.gather(1, target.clamp_min(0)[:, None])[:, 0], torch.zeros_like(lse))
    return lse, mu, t


# Every backend of the statistics, by dispatch name ("cpu" is offered by
# _dispatch.resolve(..., kernel="vocab_forward") only where _C has it).
STATS = {"torch": _torch_stats, "cpu": _compiled_stats}
if _dispatch.triton_importable():
    STATS["triton"] = _define_triton_ops()


def vocab_stats(x: Tensor, item_emb: Tensor, target: Optional[Tensor] = None, *, temperature: float = 1.0,
                exclude_index: Optional[int] = None, mu_direct: bool = True,
                backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """The softmax statistics of rows ``x [R,d]`` over ``item_emb [V,d]``.

    ``target [R]`` int64 (-1 = no target row) or None. Returns
    ``(lse [R], mu [R,d], t [R])`` in fp32 (fp64 for fp64 inputs),
    differentiable in ``x`` and ``item_emb``; ``mu_direct=False`` drops the
    explicit dependence of mu on E from the backward (the stop-gradient KL).
    ``backend``: ``auto | triton | cpu | torch`` as the public ops.
    """
    stats = _dispatch.resolve("vocab_stats", backend, x.device, STATS, kernel="vocab_forward")
    return stats(x, item_emb, target, float(temperature), NO_INDEX if exclude_index is None else int(exclude_index),
                 bool(mu_direct))


# -- the losses from the statistics (the mu-form) ---------------------------------


def kl_from_stats(h: Tensor, mu: Tensor, temperature: float, detach_target: bool) -> Tensor:
    """PLR Eq. 7 per user from ``mu [B,K,d]``: ``L_KL = sum_i w_i . mu_i``,
    ``w_i = (h_i - h_mean)/(tau(K-1))`` (module docstring)."""
    k = h.shape[1]
    hf = h.to(mu.dtype)
    w = (hf - hf.mean(dim=1, keepdim=True)) / (temperature * (k - 1))
    if detach_target:
        w = w.detach()
    return (w * mu).sum(dim=(-1, -2)).to(h.dtype)


def multi_pair_kl_from(stats, h, item_emb, temperature, exclude_index, detach_target):
    """PLR Eq. 7 through the statistics op ``stats`` (an entry of STATS)."""
    b, k, d = h.shape
    _, mu, _ = stats(h.reshape(b * k, d), item_emb, None, temperature, _index(exclude_index), not detach_target)
    return kl_from_stats(h, mu.view(b, k, d), temperature, detach_target)


def cross_entropy_from(stats, z, item_emb, target, temperature, exclude_index):
    """L_NIP of PLR Eq. 11 per row, ``lse_z - t_z``, through ``stats`` (in
    the statistics dtype: a reduction sums before rounding to z's dtype)."""
    lse, _, t = stats(z, item_emb, target, temperature, _index(exclude_index), True)
    return lse - t


def reasoning_losses_from(stats, states, z, item_emb, target, temperature, exclude_index, detach_target):
    """(L_KL [B], L_NIP [B]) from one pass over E for the K states and z of
    every user: rows ordered ``[h_1..h_K, z]`` per user; only the z rows carry
    a target."""
    b, k, d = states.shape
    x = torch.cat([states, z[:, None, :]], dim=1).reshape(b * (k + 1), d)
    row_target = torch.full((b, k + 1), NO_INDEX, dtype=torch.int64, device=z.device)
    row_target[:, k] = target
    lse, mu, t = stats(x, item_emb, row_target.reshape(-1), temperature, _index(exclude_index), not detach_target)
    kl = kl_from_stats(states, mu.view(b, k + 1, d)[:, :k], temperature, detach_target)
    ce = (lse.view(b, k + 1)[:, k] - t.view(b, k + 1)[:, k]).to(z.dtype)
    return kl, ce


def _index(exclude_index: Optional[int]) -> int:
    return NO_INDEX if exclude_index is None else int(exclude_index)
