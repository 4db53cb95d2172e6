"""Full-ranking evaluation: the exact rank of each target item (Recall@K, NDCG@K).

``rank[b] = 1 + #{v candidate : s_b(v) > s_b(target_b)}`` with ``s = z E^T``,
never materialising the ``[B x V]`` score matrix in the compiled kernels.
Recall@K = [rank <= K]; NDCG@K = 1 / log2(rank + 1) if rank <= K.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, _dispatch, _extension, reference

TIES = ("optimistic", "pessimistic")
Tensor = torch.Tensor


def _reference(z, item_emb, target, exclude_index, exclude_items, ties):
    return reference.target_rank(
        z, item_emb, target, exclude_index=exclude_index, exclude_items=exclude_items, ties=ties
    )


# Every backend's op: (z, item_emb, target, exclude_index (-1 = none),
# exclude_items or None, pessimistic) -> rank int64 [B].


def _fake(z, item_emb, target, exclude_index, exclude_items, pessimistic):
    return z.new_empty((z.shape[0],), dtype=torch.int64)


def _calling(op_name: str):
    """The IMPLS entry calling ``torch.ops.plr_kernels.<op_name>``."""

    def impl(z, item_emb, target, exclude_index, exclude_items, ties):
        return getattr(torch.ops.plr_kernels, op_name)(
            z.contiguous(), item_emb.contiguous(), target.contiguous(),
            _checks.NO_INDEX if exclude_index is None else exclude_index,
            None if exclude_items is None else exclude_items.contiguous(), ties == "pessimistic")

    return impl


# Compiled: plr_kernels::target_rank (csrc/target_rank.cpp for CPU tensors,
# csrc/cuda/target_rank.cu for CUDA ones); csrc/ops.cpp names this module as
# the home of its fake.
if _extension.compiled_op_exists("plr_kernels::target_rank"):
    torch.library.register_fake("plr_kernels::target_rank", _fake)

_compiled = _calling("target_rank")
IMPLS = {"torch": _reference, "cpu": _compiled, "cuda": _compiled}  # one op, a kernel per device

if _dispatch.triton_importable():

    # Triton: plr_kernels/triton/rank.py, imported on first use.
    @torch.library.custom_op("plr_kernels::target_rank_triton", mutates_args=())
    def _triton_op(z: Tensor, item_emb: Tensor, target: Tensor, exclude_index: int, exclude_items: Optional[Tensor],
                   pessimistic: bool) -> Tensor:
        from .triton.rank import target_rank as kernel

        return kernel(z, item_emb, target, exclude_index, exclude_items, pessimistic)

    _triton_op.register_fake(_fake)
    IMPLS["triton"] = _calling("target_rank_triton")


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
    _checks.check_rank_args(z, item_emb, exclude_index, exclude_items)
    _checks.check_targets(target, z.shape[0], item_emb.shape[0], exclude_index, z.device)
    _checks.check_choice("ties", ties, TIES)
    impl = _dispatch.resolve("target_rank", backend, z.device, IMPLS)
    with torch.no_grad():
        return impl(z, item_emb, target, exclude_index, exclude_items, ties)
