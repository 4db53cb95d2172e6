"""Argument checks shared by the public ops.

Every error names the argument, what was expected and what was received, so
a user calling ``plr_kernels`` from their own model sees at once what to fix.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64,)
NO_INDEX = -1  # "none" in the int arguments of the ops (exclude_index, per-row targets)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    device: Optional[torch.device] = None,
) -> None:
    """Raise TypeError/ValueError unless ``t`` is a tensor of the given form.

    ``shape`` entries that are ``None`` are free.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            want = ", ".join(_short(d) for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({want}), got {_short(t.dtype)}")
    if shape is not None:
        ok = len(shape) == t.dim() and all(s is None or s == n for s, n in zip(shape, t.shape))
        if not ok:
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    first = tensors[0].dtype
    for name, t in zip(names[1:], tensors[1:]):
        if t.dtype != first:
            raise TypeError(f"{name}: expected dtype {_short(first)} (as {names[0]}), got {_short(t.dtype)}")


def check_index_range(name: str, idx: torch.Tensor, low: int, high: int) -> None:
    """All entries of ``idx`` must lie in ``[low, high)``. Value checks read the
    data (a host sync): skipped while torch.compile traces, where the caller
    (e.g. ``SequentialRecommender.prepare_sequences``) checked the values eagerly."""
    if idx.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < low or hi >= high:
        bad = lo if lo < low else hi
        raise ValueError(f"{name}: expected ids in [{low}, {high - 1}], got {bad}")


def check_optional_index(name: str, value, size: int) -> None:
    """``value`` is None or an int in ``[0, size)``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected None or an int, got {type(value).__name__}")
    if not 0 <= value < size:
        raise ValueError(f"{name}: expected None or an id in [0, {size - 1}], got {value}")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_exclude_items(exclude_items, batch: int, num_items: int, device) -> None:
    """``exclude_items [B,L]`` int64; negative entries are padding (ignored)."""
    if exclude_items is None:
        return
    check_tensor("exclude_items", exclude_items, ndim=2, dtypes=INDEX_DTYPES, device=device)
    if exclude_items.shape[0] != batch:
        raise ValueError(f"exclude_items: expected {batch} rows (as z), got {exclude_items.shape[0]}")
    if exclude_items.numel() and int(exclude_items.max()) >= num_items:
        raise ValueError(
            f"exclude_items: expected ids below num_items={num_items} (negative = none), "
            f"got {int(exclude_items.max())}"
        )


def check_targets(target, batch: int, num_items: int, exclude_index, device) -> None:
    """``target [B]`` int64 item ids in ``[0, V)``, none equal to ``exclude_index``."""
    check_tensor("target", target, ndim=1, dtypes=INDEX_DTYPES, shape=(batch,), device=device)
    check_index_range("target", target, 0, num_items)
    if exclude_index is not None and not torch.compiler.is_compiling() and bool((target == exclude_index).any()):
        raise ValueError(f"target: expected no entry equal to exclude_index={exclude_index}, got one")


def check_attention_scalars(scale, dropout_p, seed) -> None:
    """``scale`` None or > 0, ``dropout_p`` in [0, 1), ``seed`` None or an int."""
    if scale is not None:
        check_positive("scale", scale)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed: expected None or an int, got {type(seed).__name__}")


# -- dtype rules ---------------------------------------------------------------


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of softmax statistics (lse, mu) and accumulated scores that
    every backend returns: float64 for float64 inputs, else float32 (16-bit
    inputs accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- per-op argument checks (every backend of an op runs the same ones) --------


def check_vocab_args(name: str, x, ndim: int, item_emb, temperature, exclude_index) -> None:
    """The vocabulary-pass ops (multi_pair_kl, linear_cross_entropy,
    reasoning_losses): rows ``x`` named ``name`` of ``ndim`` dims ending in d,
    ``item_emb [V, d]`` of the same dtype and device, ``temperature > 0``,
    ``exclude_index`` None or an item id, at least one item left."""
    check_tensor(name, x, ndim=ndim, dtypes=FLOAT_DTYPES)
    check_tensor("item_emb", item_emb, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, x.shape[-1]), device=x.device)
    check_same_dtype((name, "item_emb"), (x, item_emb))
    check_positive("temperature", temperature)
    check_optional_index("exclude_index", exclude_index, item_emb.shape[0])
    if item_emb.shape[0] - (exclude_index is not None) < 1:
        raise ValueError(f"item_emb: expected at least one item besides exclude_index, got {item_emb.shape[0]} rows")


def check_num_states(name: str, states) -> None:
    """``states [B, K, d]`` holds K >= 2 states per user (Eq. 7 needs a pair)."""
    if states.shape[1] < 2:
        raise ValueError(f"{name}: expected K >= 2 states per user (dim 1), got K={states.shape[1]}")


def check_rank_args(z, item_emb, exclude_index, exclude_items) -> None:
    """The ranking ops (target_rank, topk): ``z [B, d]``, ``item_emb [V, d]``
    of the same dtype and device, ``exclude_index``, ``exclude_items [B, L]``."""
    check_tensor("z", z, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("item_emb", item_emb, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, z.shape[1]), device=z.device)
    check_same_dtype(("z", "item_emb"), (z, item_emb))
    check_optional_index("exclude_index", exclude_index, item_emb.shape[0])
    check_exclude_items(exclude_items, z.shape[0], item_emb.shape[0], z.device)


def check_stream_attention_args(q, k_prefix, v_prefix, k_stream, v_stream, prefix_mask, scale, dropout_p, seed,
                                *, causal_prefix: bool = False) -> None:
    """stream_attention: ``q [B,H,M,D]``, ``k/v_prefix [B,H,N,D]``,
    ``k/v_stream [B,H,M,S,D]`` (S >= 1); with ``causal_prefix`` one more
    position dim N: ``q [B,H,N,M,D]``, ``k/v_stream [B,H,N,M,S,D]``;
    ``prefix_mask [B,N]`` bool; the scalars of :func:`check_attention_scalars`."""
    lead = 1 if causal_prefix else 0  # the extra position dim n of the causal-prefix form
    check_tensor("q", q, ndim=4 + lead, dtypes=FLOAT_DTYPES)
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    rows = q.shape[2:-1]  # (M,) or (N, M)
    n = q.shape[2] if causal_prefix else (
        k_prefix.shape[2] if isinstance(k_prefix, torch.Tensor) and k_prefix.dim() == 4 else None)
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        check_tensor(name, t, ndim=4, shape=(b, h, n, d), device=q.device)
    s_dim = 3 + lead
    s = k_stream.shape[s_dim] if isinstance(k_stream, torch.Tensor) and k_stream.dim() == 5 + lead else None
    for name, t in (("k_stream", k_stream), ("v_stream", v_stream)):
        check_tensor(name, t, ndim=5 + lead, shape=(b, h, *rows, s, d), device=q.device)
    if s == 0:
        raise ValueError("k_stream: expected S >= 1 (the current reasoning token is its own key), got S=0")
    check_same_dtype(("q", "k_prefix", "v_prefix", "k_stream", "v_stream"), (q, k_prefix, v_prefix, k_stream, v_stream))
    if prefix_mask is not None:
        check_tensor("prefix_mask", prefix_mask, dtypes=(torch.bool,), shape=(b, n), device=q.device)
    check_attention_scalars(scale, dropout_p, seed)
