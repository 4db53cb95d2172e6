"""PLR's two vocabulary losses from one pass over the item table: the
diversity KL of the reasoning states (PLR Eq. 7) and the next-item
cross-entropy of ``z_rea`` (L_NIP of Eq. 11).

The fused backends read E once for the K+1 rows of every user (the K states
and z) through the vocabulary pass of plr_kernels/vocab_pass.py; the
reference computes the two losses separately.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import _checks, _dispatch, reference, vocab_pass


def _reference(states, z, item_emb, target, temperature, exclude_index, detach_target):
    kl = reference.multi_pair_kl(states, item_emb, temperature=temperature, exclude_index=exclude_index,
                                 detach_target=detach_target)
    ce = reference.linear_cross_entropy(z, item_emb, target, temperature=temperature,
                                        exclude_index=exclude_index, reduction="none")
    return kl, ce


# "cpu" is offered only where _C has vocab_forward (resolved with kernel="vocab_forward").
IMPLS = {"torch": _reference}
IMPLS.update({name: functools.partial(vocab_pass.reasoning_losses_from, stats)
              for name, stats in vocab_pass.STATS.items() if name != "torch"})


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
        temperature, exclude_index, detach_target: as in :func:`plr_kernels.multi_pair_kl`.
        backend: ``auto | triton | cpu | torch`` (``cpu``: the compiled C++
            kernels of ``plr_kernels._C``, picked by ``auto`` for CPU tensors).

    Returns:
        ``(kl [B], ce [B])``: ``multi_pair_kl(states, ...)`` (PLR Eq. 7) and
        ``linear_cross_entropy(z, ..., reduction="none")`` (L_NIP, Eq. 11).
    """
    _checks.check_vocab_args("states", states, 3, item_emb, temperature, exclude_index)
    _checks.check_num_states("states", states)
    _checks.check_tensor("z", z, ndim=2, dtypes=(states.dtype,), shape=(states.shape[0], states.shape[2]),
                         device=states.device)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    impl = _dispatch.resolve("reasoning_losses", backend, states.device, IMPLS, kernel="vocab_forward")
    return impl(states, z, item_emb, target, float(temperature), exclude_index, bool(detach_target))
