"""Next-item cross-entropy over the full item table, L_NIP of PLR Eq. 11.

``CE(z, y) = lse_v(z.e_v / tau) - z.e_y / tau`` and ``dCE/dz = (mu_z - e_y) / tau``
(DESIGN 4.2): the fused kernels stream the item table and never store the
``[B x V]`` logits.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference
from .multi_pair_kl import check_vocab_args
from .vocab_pass import linear_cross_entropy_compiled

REDUCTIONS = ("mean", "sum", "none")


def _reference(z, item_emb, target, temperature, exclude_index, reduction):
    return reference.linear_cross_entropy(
        z, item_emb, target, temperature=temperature, exclude_index=exclude_index, reduction=reduction
    )


# "cpu": the C++ kernels of plr_kernels._C (csrc/vocab_pass.cpp), offered only
# where _C has them (resolved with kernel="vocab_forward").
IMPLS = {"torch": _reference, "cpu": linear_cross_entropy_compiled}

if _dispatch.triton_importable():
    from .vocab_pass import linear_cross_entropy_triton

    IMPLS["triton"] = linear_cross_entropy_triton  # plr_kernels/triton/vocab_pass.py


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
    check_vocab_args("z", z, 2, item_emb, temperature, exclude_index)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    _checks.check_choice("reduction", reduction, REDUCTIONS)
    impl = _dispatch.resolve("linear_cross_entropy", backend, z.device, IMPLS, kernel="vocab_forward")
    return impl(z, item_emb, target, float(temperature), exclude_index, reduction)
