"""Next-item cross-entropy over the full item table, L_NIP of PLR Eq. 11.

``CE(z, y) = lse_v(z.e_v / tau) - z.e_y / tau`` and ``dCE/dz = (mu_z - e_y) / tau``
(plr_kernels/vocab_pass.py): the fused kernels stream the item table and never store the
``[B x V]`` logits.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _checks, _dispatch, reference, vocab_pass

REDUCTIONS = ("mean", "sum", "none")


def _reference(z, item_emb, target, temperature, exclude_index, reduction):
    return reference.linear_cross_entropy(
        z, item_emb, target, temperature=temperature, exclude_index=exclude_index, reduction=reduction
    )


def _fused(stats, z, item_emb, target, temperature, exclude_index, reduction):
    loss = vocab_pass.cross_entropy_from(stats, z, item_emb, target, temperature, exclude_index)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.mean()
    return loss.to(z.dtype)


# The fused backends: lse - t through the vocabulary pass of each backend
# (plr_kernels/vocab_pass.py); "cpu" is offered only where _C has
# vocab_forward (resolved with kernel="vocab_forward").
IMPLS = {"torch": _reference}
IMPLS.update({name: functools.partial(_fused, stats) for name, stats in vocab_pass.STATS.items() if name != "torch"})


def linear_cross_entropy(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    *,
    temperature: float = 1.0,
    exclude_index: Optional[int] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax cross-entropy of ``z E^T / tau`` against ``target``.

    Args:
        z: ``[B, d]`` (PLR trains with ``z_rea``).
        item_emb: ``[V, d]``.
        target: ``[B]`` int64 ids in ``[0, V)``, never ``exclude_index``.
        temperature: tau.
        exclude_index: an item left out of the softmax (the padding id 0).
        reduction: ``mean`` / ``sum`` -> scalar, ``none`` -> ``[B]``.
        backend: ``auto | triton | cpu | torch`` (``cpu``: the compiled C++
            kernels of ``plr_kernels._C``, picked by ``auto`` for CPU tensors).
    """
    _checks.check_vocab_args("z", z, 2, item_emb, temperature, exclude_index)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    impl = _dispatch.resolve("linear_cross_entropy", backend, z.device, IMPLS, kernel="vocab_forward")
    return impl(z, item_emb, target, float(temperature), exclude_index, reduction)
