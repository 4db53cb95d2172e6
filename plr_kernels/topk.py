"""Top-K retrieval for serving: ``topk_v z.e_v`` over the item table (PLR Eq. 10's z_final scores the items)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _autotune, _checks, _dispatch, _extension, reference

Tensor = torch.Tensor


def _reference(z, item_emb, k, exclude_index, exclude_items):
    return reference.topk(z, item_emb, k, exclude_index=exclude_index, exclude_items=exclude_items)


# Every backend's op: (z, item_emb, k, exclude_index (-1 = none), exclude_items
# or None) -> (values [B,k] in the statistics dtype, indices [B,k] int64).


def _fake(z, item_emb, k, exclude_index, exclude_items):
    return (z.new_empty((z.shape[0], k), dtype=_checks.stats_dtype(z.dtype)),
            z.new_empty((z.shape[0], k), dtype=torch.int64))


def _calling(op_name: str):
    """The IMPLS entry calling ``torch.ops.plr_kernels.<op_name>``."""

    def impl(z, item_emb, k, exclude_index, exclude_items):
        return getattr(torch.ops.plr_kernels, op_name)(
            z.contiguous(), item_emb.contiguous(), k, _checks.NO_INDEX if exclude_index is None else exclude_index,
            None if exclude_items is None else exclude_items.contiguous())

    return impl


# Compiled: plr_kernels::topk (csrc/topk.cpp for CPU tensors, csrc/cuda/topk.cu
# for CUDA ones); csrc/ops.cpp names this module as the home of its fake.
if _extension.compiled_op_exists("plr_kernels::topk"):
    torch.library.register_fake("plr_kernels::topk", _fake)

_compiled = _calling("topk")
IMPLS = {"torch": _reference, "cpu": _compiled, "cuda": _compiled}  # one op, a kernel per device

if _dispatch.triton_importable():

    # Triton: plr_kernels/triton/rank.py, imported on first use.
    @torch.library.custom_op("plr_kernels::topk_triton", mutates_args=())
    def _triton_op(z: Tensor, item_emb: Tensor, k: int, exclude_index: int,
                   exclude_items: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        from .triton.rank import topk as kernel

        return kernel(z, item_emb, k, exclude_index, exclude_items)

    _triton_op.register_fake(_fake)
    IMPLS["triton"] = _calling("topk_triton")


def topk(
    z: torch.Tensor,
    item_emb: torch.Tensor,
    k: int,
    *,
    exclude_index: Optional[int] = None,
    exclude_items: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best items of each row by score ``z E^T``.

    Args:
        z: ``[B, d]``; item_emb: ``[V, d]`` (same dtype and device).
        k: number of items, ``1 <= k <= V`` minus the excluded index.
        exclude_index: an item never returned (the padding id 0).
        exclude_items: ``[B, L]`` int64 ids never returned for their row
            (e.g. the history); negative entries are ignored.
        backend: ``auto | triton | cpu | cuda | torch`` (``cpu`` / ``cuda``:
            the compiled kernels of ``plr_kernels._C``). ``auto``: for CUDA
            tensors the faster of ``cuda`` and ``torch``, timed once per shape
            class (plr_kernels._autotune); for CPU tensors ``cpu`` when built,
            else ``torch``.

    Returns:
        ``(values [B, k], indices [B, k])``, best first; equal scores are
        ordered by smaller item id. Values are fp32 (fp64 for fp64 inputs). A row left with fewer than ``k``
        candidates by ``exclude_items`` ends in ``(-inf, -1)`` entries.
    """
    _checks.check_rank_args(z, item_emb, exclude_index, exclude_items)
    most = item_emb.shape[0] - (exclude_index is not None)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= most:
        raise ValueError(f"k: expected an int in [1, {most}] (the number of candidate items), got {k!r}")
    if backend == "auto" and z.device.type == "cuda":
        impl = _fastest_on_gpu(z, item_emb, k, exclude_index, exclude_items)
    else:
        impl = _dispatch.resolve("topk", backend, z.device, IMPLS)
    with torch.no_grad():
        return impl(z, item_emb, k, exclude_index, exclude_items)


# ``auto`` on a GPU: the compiled CUDA kernel or the reference (``torch.topk``
# over the materialised scores), whichever measures faster for the shape
# (plr_kernels/_autotune.py). Triton is not a candidate: it measured ~3.7 ms
# slower than the reference at batch 1 on an H100 (benchmarks/RESULTS.md, issue 6).
_GPU_CANDIDATES = ("cuda", "torch")


def _fastest_on_gpu(z, item_emb, k, exclude_index, exclude_items):
    found = _dispatch.available("topk", IMPLS, z.device)
    candidates = {name: found[name] for name in _GPU_CANDIDATES if name in found}
    key = ("topk", str(z.device), z.dtype, tuple(item_emb.shape), _autotune.size_bucket(z.shape[0]),
           _autotune.size_bucket(k), exclude_items is not None)

    def call(fn):
        return lambda: fn(z, item_emb, k, exclude_index, exclude_items)

    with torch.no_grad():
        name = _autotune.fastest(key, {name: call(fn) for name, fn in candidates.items()}, z.device)
    return candidates[name]
