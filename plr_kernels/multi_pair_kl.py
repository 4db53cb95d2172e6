"""Diversity regulariser of PLR: mean KL over all ordered pairs of states (Eq. 7).

With ``l_k(v) = h_k.e_v / tau``, ``lse_k`` its log-sum-exp and
``mu_k = sum_v p_k(v) e_v``, ``KL(p_i||p_j) = (h_i - h_j).mu_i / tau - lse_i + lse_j``;
over all ordered pairs the lse terms cancel (plr_kernels/vocab_pass.py), so
``L_KL = 1/(K-1) sum_i (h_i - h_mean).mu_i / tau`` -- one streaming pass over
the item table suffices for the fused kernels.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _checks, _dispatch, reference, vocab_pass


def _reference(h, item_emb, temperature, exclude_index, detach_target):
    return reference.multi_pair_kl(
        h, item_emb, temperature=temperature, exclude_index=exclude_index, detach_target=detach_target
    )


# The fused backends: the mu-form through the vocabulary pass of each backend
# (plr_kernels/vocab_pass.py); "cpu" is offered only where _C has
# vocab_forward (resolved with kernel="vocab_forward").
IMPLS = {"torch": _reference}
IMPLS.update({name: functools.partial(vocab_pass.multi_pair_kl_from, stats)
              for name, stats in vocab_pass.STATS.items() if name != "torch"})


def multi_pair_kl(
    h: torch.Tensor,
    item_emb: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_index: Optional[int] = None,
    detach_target: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over the K(K-1) ordered pairs of ``KL(p_i || p_j)``, per user.

    Args:
        h: ``[B, K, d]`` the K = T*M reasoning states of each user, K >= 2.
        item_emb: ``[V, d]`` the item table.
        temperature: tau of ``p_k = softmax(h_k E^T / tau)``.
        exclude_index: an item left out of every softmax (the padding id 0).
        detach_target: stop the gradient through ``log p_j`` (ReaRec-ERL).
        backend: ``auto | triton | cpu | torch`` (``cpu``: the compiled C++
            kernels of ``plr_kernels._C``, picked by ``auto`` for CPU tensors).

    Returns:
        ``[B]``, differentiable in ``h`` and ``item_emb``.
    """
    _checks.check_vocab_args("h", h, 3, item_emb, temperature, exclude_index)
    _checks.check_num_states("h", h)
    impl = _dispatch.resolve("multi_pair_kl", backend, h.device, IMPLS, kernel="vocab_forward")
    return impl(h, item_emb, float(temperature), exclude_index, bool(detach_target))
