"""Diversity regulariser of PLR: mean KL over all ordered pairs of states (Eq. 7).

With ``l_k(v) = h_k.e_v / tau``, ``lse_k`` its log-sum-exp and
``mu_k = sum_v p_k(v) e_v``, ``KL(p_i||p_j) = (h_i - h_j).mu_i / tau - lse_i + lse_j``;
over all ordered pairs the lse terms cancel (DESIGN 4.2), so
``L_KL = 1/(K-1) sum_i (h_i - h_mean).mu_i / tau`` -- one streaming pass over
the item table suffices for the fused kernels.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference
from .vocab_pass import multi_pair_kl_compiled


def _reference(h, item_emb, temperature, exclude_index, detach_target):
    return reference.multi_pair_kl(
        h, item_emb, temperature=temperature, exclude_index=exclude_index, detach_target=detach_target
    )


# "cpu": the C++ kernels of plr_kernels._C (csrc/vocab_pass.cpp), offered only
# where _C has them (resolved with kernel="vocab_forward").
IMPLS = {"torch": _reference, "cpu": multi_pair_kl_compiled}

if _dispatch.triton_importable():
    from .vocab_pass import multi_pair_kl_triton

    IMPLS["triton"] = multi_pair_kl_triton  # plr_kernels/triton/vocab_pass.py


def check_vocab_args(name: str, x: torch.Tensor, ndim: int, item_emb, temperature, exclude_index):
    """Checks shared by the vocabulary-pass ops (KL and cross-entropy)."""
    _checks.check_tensor(name, x, ndim=ndim, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(
        "item_emb", item_emb, ndim=2, dtypes=_checks.FLOAT_DTYPES, shape=(None, x.shape[-1]), device=x.device
    )
    _checks.check_same_dtype((name, "item_emb"), (x, item_emb))
    _checks.check_positive("temperature", temperature)
    _checks.check_optional_index("exclude_index", exclude_index, item_emb.shape[0])
    if item_emb.shape[0] - (exclude_index is not None) < 1:
        raise ValueError(f"item_emb: expected at least one item besides exclude_index, got {item_emb.shape[0]} rows")


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
    check_vocab_args("h", h, 3, item_emb, temperature, exclude_index)
    if h.shape[1] < 2:
        raise ValueError(f"h: expected K >= 2 states per user (dim 1), got K={h.shape[1]}")
    impl = _dispatch.resolve("multi_pair_kl", backend, h.device, IMPLS, kernel="vocab_forward")
    return impl(h, item_emb, float(temperature), exclude_index, bool(detach_target))
