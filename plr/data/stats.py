"""Dataset statistics for ``plr data stats``."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np

from .interactions import Interactions

__all__ = ["dataset_stats", "format_stats"]


def dataset_stats(data: Union[str, Path, Interactions], fmt: str = "auto") -> dict:
    """Statistics of an interaction log (a path read with ``read_interactions``
    or an ``Interactions``): users, items, interactions, sparsity, and the
    per-user sequence length distribution (min, p25, median, p75, max, mean)."""
    if not isinstance(data, Interactions):
        from .readers import read_interactions
        data = read_interactions(data, fmt=fmt)
    n = len(data)
    users = data.num_users
    items = data.num_items
    pairs = _distinct_pairs(data) if n else 0
    if n:
        _, lens = np.unique(data.user, return_counts=True)
        q = np.percentile(lens, [25, 50, 75])
        length = {"min": int(lens.min()), "p25": float(q[0]), "median": float(q[1]), "p75": float(q[2]),
                  "max": int(lens.max()), "mean": float(lens.mean())}
    else:
        length = {k: 0 for k in ("min", "p25", "median", "p75", "max", "mean")}
    out = {
        "name": data.name, "format": data.fmt, "users": users, "items": items, "interactions": n,
        # Over distinct (user, item) pairs: a repeated interaction fills no new cell.
        "sparsity": float(1.0 - pairs / (users * items)) if users and items else float("nan"),
        "duplicates": n - pairs,
        "sequence_length": length,
        "timestamps": "yes" if data.has_timestamps else "line order",
        "ratings": "no" if data.rating is None or n == 0 else
        f"{float(data.rating.min()):g}..{float(data.rating.max()):g}",
        "titles": len(data.item_titles),
    }
    if data.user_catalog is not None:
        out["catalog_users"] = int(len(data.user_catalog))
    if data.item_catalog is not None:
        out["catalog_items"] = int(len(data.item_catalog))
    if data.predefined_split is not None:
        out["split_rows"] = {s: int((data.predefined_split == s).sum()) for s in ("train", "valid", "test")}
    return out


def _distinct_pairs(data: Interactions) -> int:
    """Distinct (user, item) pairs among the rows."""
    _, u = np.unique(data.user, return_inverse=True)
    _, i = np.unique(data.item, return_inverse=True)
    return int(len(np.unique(u.reshape(-1).astype(np.int64) * (int(i.max()) + 1) + i.reshape(-1))))


def format_stats(stats: dict) -> str:
    """A readable multi-line rendering of ``dataset_stats``' dict."""
    lines = [f"dataset      {stats.get('name', '')} ({stats.get('format', '')})"]
    for key in ("users", "items", "interactions"):
        lines.append(f"{key:<12} {stats[key]:,}")
    if stats.get("duplicates"):
        lines.append(f"{'duplicates':<12} {stats['duplicates']:,} repeated (user, item) pairs (kept as interactions; "
                     "sparsity counts distinct pairs)")
    elif stats["interactions"]:
        lines.append(f"{'duplicates':<12} none: no item recurs in a user's history, so no target is ever a history "
                     "item (excluding the history, eval.exclude_history: true, cannot hide one)")
    sp = stats.get("sparsity", float("nan"))
    lines.append(f"{'sparsity':<12} {sp:.4%}" if sp == sp else f"{'sparsity':<12} n/a")
    ln = stats["sequence_length"]
    lines.append(f"{'seq length':<12} min {ln['min']}, p25 {ln['p25']:g}, median {ln['median']:g}, "
                 f"p75 {ln['p75']:g}, max {ln['max']}, mean {ln['mean']:.2f}")
    for key in ("timestamps", "ratings", "titles", "catalog_users", "catalog_items"):
        if key in stats:
            val = stats[key]
            lines.append(f"{key.replace('_', ' '):<12} {val:,}" if isinstance(val, int) else f"{key:<12} {val}")
    if "split_rows" in stats:
        sr = stats["split_rows"]
        lines.append(f"{'split rows':<12} train {sr['train']:,}, valid {sr['valid']:,}, test {sr['test']:,}")
    return "\n".join(lines)
