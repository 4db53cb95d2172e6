"""Full-ranking evaluation: the exact rank of each target item (DESIGN 4.3).

``rank[b] = 1 + #{v candidate : s_b(v) > s_b(target_b)}`` with ``s = z E^T``,
never materialising the ``[B x V]`` score matrix in the compiled kernels.
Recall@K = [rank <= K]; NDCG@K = 1 / log2(rank + 1) if rank <= K.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, reference

TIES = ("optimistic", "pessimistic")


def _compiled(z, item_emb, target, exclude_index, exclude_items, ties):
    return torch.ops.plr_kernels.target_rank(
        z.contiguous(),
        item_emb.contiguous(),
        target.contiguous(),
        -1 if exclude_index is None else exclude_index,
        None if exclude_items is None else exclude_items.contiguous(),
        ties == "pessimistic",
    )


def _reference(z, item_emb, target, exclude_index, exclude_items, ties):
    return reference.target_rank(
        z, item_emb, target, exclude_index=exclude_index, exclude_items=exclude_items, ties=ties
    )


def _triton(z, item_emb, target, exclude_index, exclude_items, ties):
    from .triton.rank import target_rank as kernel  # plr_kernels/triton/rank.py

    return kernel(z, item_emb, target, exclude_index, exclude_items, ties == "pessimistic")


IMPLS = {"torch": _reference, "cpu": _compiled, "cuda": _compiled}
if _dispatch.triton_importable():
    IMPLS["triton"] = _triton


def check_rank_args(z, item_emb, exclude_index, exclude_items):
    """Checks shared by ``target_rank`` and ``topk``."""
    _checks.check_tensor("z", z, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor(
        "item_emb", item_emb, ndim=2, dtypes=_checks.FLOAT_DTYPES, shape=(None, z.shape[1]), device=z.device
    )
    _checks.check_same_dtype(("z", "item_emb"), (z, item_emb))
    _checks.check_optional_index("exclude_index", exclude_index, item_emb.shape[0])
    _checks.check_exclude_items(exclude_items, z.shape[0], item_emb.shape[0], z.device)


def target_rank(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    target: torch.Tensor,
    *,
    exclude_index: Optional[int] = None,
    exclude_items: Optional[torch.Tensor] = None,
    ties: str = "optimistic",
    backend: str = "auto",
) -> torch.Tensor:
    """Exact 1-based rank of ``target`` among all items, scored by ``z E^T``.

    Args:
        z: ``[B, d]`` user representations (e.g. PLR's ``z_final``, Eq. 10).
        item_emb: ``[V, d]`` item table, same dtype and device as ``z``.
        target: ``[B]`` int64 item ids in ``[0, V)``.
        exclude_index: an item that is never a candidate (the padding id 0).
        exclude_items: ``[B, L]`` int64 ids that are no candidates for their
            row (e.g. the history); negative entries are ignored. The target
            itself is never excluded.
        ties: ``"optimistic"`` counts items scoring strictly higher than the
            target, ``"pessimistic"`` counts higher-or-equal ones.
        backend: ``auto | triton | cpu | cuda | torch`` (see ``plr_kernels``).

    Returns:
        ``[B]`` int64, 1 = best. No gradient.
    """
    check_rank_args(z, item_emb, exclude_index, exclude_items)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    _checks.check_choice("ties", ties, TIES)
    impl = _dispatch.resolve("target_rank", backend, z.device, IMPLS)
    with torch.no_grad():
        return impl(z, item_emb, target, exclude_index, exclude_items, ties)
