"""The fused vocabulary pass (DESIGN 4.2): autograd, ``torch.library`` ops and
the fused (Triton and compiled C++) implementations of ``multi_pair_kl``,
``linear_cross_entropy`` and the combined :func:`reasoning_losses`.

Everything rests on one op, ``plr_kernels::vocab_stats(x, E, target)`` ->
``(lse [R], mu [R,d], t [R])`` with ``l_r(v) = x_r.e_v / tau``,
``lse_r = logsumexp_v l_r(v)``, ``mu_r = sum_v p_r(v) e_v`` and ``t_r = l_r(y_r)``,
computed by one streaming pass over the item table, plus its backward op (a
second streaming pass). Its ``impl`` argument names the kernels that do the
passes: ``"triton"`` (``triton/vocab_pass.py``) or ``"compiled"``
(``torch.ops.plr_kernels.vocab_forward / vocab_backward`` of ``plr_kernels._C``,
the C++/OpenMP kernels of ``csrc/vocab_pass.cpp`` for CPU tensors); the
autograd wiring below is the same for both. The losses are then small
expressions of these O(R d) statistics:

* PLR Eq. 11, L_NIP:  ``CE(z, y) = lse_z - t_z``; autograd gives
  ``dCE/dz = (mu_z - e_y) / tau`` through the backward pass.
* PLR Eq. 7, L_KL: ``KL(p_i || p_j) = (h_i - h_j).mu_i / tau - lse_i + lse_j``,
  and over the K(K-1) ordered pairs the lse terms cancel, so per user

      L_KL = 1/(K(K-1)) sum_{i != j} KL(p_i||p_j) = sum_i w_i . mu_i,
      w_i = (h_i - h_mean) / (tau (K-1)).

  Full gradient: autograd through ``w`` (direct term (mu_i - mu_mean)/(tau(K-1))
  on h_i) and through ``mu`` (the softmax covariance, streamed in the backward
  with g_mu = w, plus the direct term ``sum_i p_i(v) w_i`` of mu on e_v).

  Stop-gradient through log p_j (``detach_target``, ReaRec-ERL). The reference
  writes ``L = 1/(K(K-1)) [K sum_i S_i - sum_i p_i . sg(c)]`` with
  ``S_i = p_i . log p_i`` and ``c = sum_j log p_j``. Differentiating w.r.t. the
  logits l_i(v) (h and E enter only through the logits: log p_j is detached,
  and S_i, p_i are functions of l_i alone):

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

_NO_INDEX = -1


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# torch.library ops (names unique in the plr_kernels namespace)
# ---------------------------------------------------------------------------


IMPL_NAMES = ("triton", "compiled")


def _check_impl(impl: str) -> None:
    if impl not in IMPL_NAMES:
        raise ValueError(f"impl: expected one of {list(IMPL_NAMES)}, got {impl!r}")


@torch.library.custom_op("plr_kernels::vocab_stats", mutates_args=())
def vocab_stats_op(x: torch.Tensor, item_emb: torch.Tensor, target: Optional[torch.Tensor], temperature: float,
                   exclude_index: int, mu_direct: bool,
                   impl: str = "triton") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [R,d]``, ``item_emb [V,d]``, ``target [R]`` (-1 = none) ->
    ``(lse [R], mu [R,d], t [R])`` in fp32 (fp64 for fp64 inputs).
    ``mu_direct=False`` drops the explicit dependence of mu on E from the
    backward (the stop-gradient KL, module docstring). ``impl``: ``"triton"``
    or ``"compiled"`` (``torch.ops.plr_kernels.vocab_forward``)."""
    _check_impl(impl)
    if impl == "compiled":
        lse, mu, t = torch.ops.plr_kernels.vocab_forward(x, item_emb, target, temperature, exclude_index)
        return lse, mu, t
    from .triton.vocab_pass import vocab_forward

    return vocab_forward(x, item_emb, target, temperature, exclude_index)


@vocab_stats_op.register_fake
def _(x, item_emb, target, temperature, exclude_index, mu_direct, impl="triton"):
    dt = _stats_dtype(x)
    r, d = x.shape
    return x.new_empty(r, dtype=dt), x.new_empty(r, d, dtype=dt), x.new_empty(r, dtype=dt)


@torch.library.custom_op("plr_kernels::vocab_stats_backward", mutates_args=())
def vocab_stats_backward_op(x: torch.Tensor, item_emb: torch.Tensor, target: Optional[torch.Tensor],
                            lse: torch.Tensor, mu: torch.Tensor, g_lse: Optional[torch.Tensor],
                            g_mu: Optional[torch.Tensor], g_t: Optional[torch.Tensor], temperature: float,
                            exclude_index: int, mu_direct: bool,
                            impl: str = "triton") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dx [R,d], dE [V,d])`` for upstream gradients of ``(lse, mu, t)``."""
    _check_impl(impl)
    c = (g_mu.to(mu.dtype) * mu).sum(-1) if g_mu is not None else None  # c_r = g_mu_r . mu_r
    if impl == "compiled":
        dx, de = torch.ops.plr_kernels.vocab_backward(x, item_emb, target, lse, g_lse, g_mu, c, g_t, temperature,
                                                      exclude_index, mu_direct)
        return dx, de
    from .triton.vocab_pass import vocab_backward

    dx, de = vocab_backward(x, item_emb, target, lse, g_lse, g_mu, c, g_t, temperature, exclude_index,
                            mu_direct, True, True)
    return dx, de


@vocab_stats_backward_op.register_fake
def _(x, item_emb, target, lse, mu, g_lse, g_mu, g_t, temperature, exclude_index, mu_direct, impl="triton"):
    return torch.empty_like(x), torch.empty_like(item_emb)


def _setup_context(ctx, inputs, output):
    x, item_emb, target, temperature, exclude_index, mu_direct, impl = inputs
    lse, mu, _ = output
    ctx.save_for_backward(x, item_emb, target, lse, mu)
    ctx.args = (temperature, exclude_index, mu_direct, impl)
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lse, g_mu, g_t):
    x, item_emb, target, lse, mu = ctx.saved_tensors
    if g_lse is None and g_mu is None and g_t is None:
        return None, None, None, None, None, None, None
    dx, de = vocab_stats_backward_op(x, item_emb, target, lse, mu, g_lse, g_mu, g_t, *ctx.args)
    return (dx if ctx.needs_input_grad[0] else None, de if ctx.needs_input_grad[1] else None,
            None, None, None, None, None)


vocab_stats_op.register_autograd(_backward, setup_context=_setup_context)


def vocab_stats(x, item_emb, target=None, *, temperature=1.0, exclude_index=None, mu_direct=True, impl="triton"):
    """Functional form of ``plr_kernels::vocab_stats``; ``impl`` = ``"triton"``
    or ``"compiled"`` (the ``plr_kernels._C`` kernels)."""
    return vocab_stats_op(x, item_emb, target, float(temperature),
                          _NO_INDEX if exclude_index is None else int(exclude_index), bool(mu_direct), impl)


# ---------------------------------------------------------------------------
# The losses on top of the statistics
# ---------------------------------------------------------------------------


def _kl_from_stats(h: torch.Tensor, mu: torch.Tensor, temperature: float, detach_target: bool) -> torch.Tensor:
    """``L_KL = sum_i w_i . mu_i`` per user, ``w_i = (h_i - h_mean)/(tau(K-1))`` (PLR Eq. 7)."""
    k = h.shape[1]
    hf = h.to(mu.dtype)
    w = (hf - hf.mean(dim=1, keepdim=True)) / (temperature * (k - 1))
    if detach_target:
        w = w.detach()
    return (w * mu).sum(dim=(-1, -2)).to(h.dtype)


def _reduce(loss: torch.Tensor, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(dtype)


def _multi_pair_kl(h, item_emb, temperature, exclude_index, detach_target, impl):
    b, k, d = h.shape
    _, mu, _ = vocab_stats(h.reshape(b * k, d), item_emb, None, temperature=temperature,
                           exclude_index=exclude_index, mu_direct=not detach_target, impl=impl)
    return _kl_from_stats(h, mu.view(b, k, d), temperature, detach_target)


def _linear_cross_entropy(z, item_emb, target, temperature, exclude_index, reduction, impl):
    lse, _, t = vocab_stats(z, item_emb, target, temperature=temperature, exclude_index=exclude_index, impl=impl)
    return _reduce(lse - t, reduction, z.dtype)


def _reasoning_losses(states, z, item_emb, target, temperature, exclude_index, detach_target, impl):
    """One pass over E for the K states and z of every user: rows ordered
    ``[h_1..h_K, z]`` per user; only the z rows carry a target."""
    b, k, d = states.shape
    x = torch.cat([states, z[:, None, :]], dim=1).reshape(b * (k + 1), d)
    row_target = torch.full((b, k + 1), _NO_INDEX, dtype=torch.int64, device=z.device)
    row_target[:, k] = target
    lse, mu, t = vocab_stats(x, item_emb, row_target.reshape(-1), temperature=temperature,
                             exclude_index=exclude_index, mu_direct=not detach_target, impl=impl)
    mu = mu.view(b, k + 1, d)[:, :k]
    kl = _kl_from_stats(states, mu, temperature, detach_target)
    ce = (lse.view(b, k + 1)[:, k] - t.view(b, k + 1)[:, k]).to(z.dtype)
    return kl, ce


def multi_pair_kl_triton(h, item_emb, temperature, exclude_index, detach_target):
    return _multi_pair_kl(h, item_emb, temperature, exclude_index, detach_target, "triton")


def multi_pair_kl_compiled(h, item_emb, temperature, exclude_index, detach_target):
    return _multi_pair_kl(h, item_emb, temperature, exclude_index, detach_target, "compiled")


def linear_cross_entropy_triton(z, item_emb, target, temperature, exclude_index, reduction):
    return _linear_cross_entropy(z, item_emb, target, temperature, exclude_index, reduction, "triton")


def linear_cross_entropy_compiled(z, item_emb, target, temperature, exclude_index, reduction):
    return _linear_cross_entropy(z, item_emb, target, temperature, exclude_index, reduction, "compiled")


def reasoning_losses_triton(states, z, item_emb, target, temperature, exclude_index, detach_target):
    return _reasoning_losses(states, z, item_emb, target, temperature, exclude_index, detach_target, "triton")


def reasoning_losses_compiled(states, z, item_emb, target, temperature, exclude_index, detach_target):
    return _reasoning_losses(states, z, item_emb, target, temperature, exclude_index, detach_target, "compiled")


# ---------------------------------------------------------------------------
# Public combined entry point
# ---------------------------------------------------------------------------


def _reasoning_losses_reference(states, z, item_emb, target, temperature, exclude_index, detach_target):
    from . import reference

    kl = reference.multi_pair_kl(states, item_emb, temperature=temperature, exclude_index=exclude_index,
                                 detach_target=detach_target)
    ce = reference.linear_cross_entropy(z, item_emb, target, temperature=temperature,
                                        exclude_index=exclude_index, reduction="none")
    return kl, ce


# "cpu": the C++ kernels of plr_kernels._C (csrc/vocab_pass.cpp), offered by
# _dispatch.resolve(..., kernel="vocab_forward") only where _C has them.
IMPLS = {"torch": _reasoning_losses_reference, "cpu": reasoning_losses_compiled}


def _triton_importable() -> bool:
    from . import _dispatch

    return _dispatch.triton_importable()


if _triton_importable():
    IMPLS["triton"] = reasoning_losses_triton


def reasoning_losses(
    states: torch.Tensor,
    z: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_index: Optional[int] = None,
    detach_target: bool = False,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PLR's two vocabulary losses from one pass over the item table.

    Args:
        states: ``[B, K, d]`` the K = T*M reasoning states of each user, K >= 2.
        z: ``[B, d]`` the vector scored for next-item prediction (``z_rea``).
        item_emb: ``[V, d]``; target: ``[B]`` int64, never ``exclude_index``.
        temperature, exclude_index, detach_target: as in :func:`multi_pair_kl`.
        backend: ``auto | triton | cpu | torch`` (``cpu``: the compiled C++
            kernels of ``plr_kernels._C``, picked by ``auto`` for CPU tensors).

    Returns:
        ``(kl [B], ce [B])``: ``multi_pair_kl(states, ...)`` (PLR Eq. 7) and
        ``linear_cross_entropy(z, ..., reduction="none")`` (L_NIP, Eq. 11). The
        fused backends read E once for the K+1 rows of every user.
    """
    from . import _checks, _dispatch
    from .multi_pair_kl import check_vocab_args

    check_vocab_args("states", states, 3, item_emb, temperature, exclude_index)
    if states.shape[1] < 2:
        raise ValueError(f"states: expected K >= 2 states per user (dim 1), got K={states.shape[1]}")
    _checks.check_tensor("z", z, ndim=2, dtypes=(states.dtype,), shape=(states.shape[0], states.shape[2]),
                         device=states.device)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    impl = _dispatch.resolve("reasoning_losses", backend, states.device, IMPLS, kernel="vocab_forward")
    return impl(states, z, item_emb, target, float(temperature), exclude_index, bool(detach_target))
