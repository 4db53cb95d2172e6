"""A checkpoint ready to answer recommendation queries: request checks in raw
item ids, and one ``model.recommend`` call for a whole micro-batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import torch

from .catalog import ItemCatalog, UnknownItemsError


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status``, the offending ``field``."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Query:
    items: List[int]  # model ids, oldest first
    k: int
    exclude_history: bool


class Recommender:
    """``model`` (a SequentialRecommender, eval mode) + its item ``catalog``.

    ``max_k`` caps ``k`` (the answer size), below the number of items.
    """

    def __init__(self, model, catalog: ItemCatalog, max_k: int = 1000, info: Dict[str, Any] = None):
        self.model = model.eval()
        self.catalog = catalog
        self.max_k = min(max_k, model.num_items)
        self.info = dict(info or {})

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def query(self, history: Sequence[Any], k: Any, exclude_history: bool, field: str = "history") -> Query:
        """Check one request (raw ids) -> Query, or raise RequestError naming the field."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.max_k:
            raise RequestError("k", f"expected an int in [1, {self.max_k}], got {k!r}")
        if len(history) == 0:
            raise RequestError(field, "expected at least one item id, got an empty list")
        if len(history) > self.max_len:
            raise RequestError(field, f"expected at most max_len={self.max_len} item ids (send the latest "
                                      f"{self.max_len}), got {len(history)}")
        try:
            items = self.catalog.to_internal(history)
        except UnknownItemsError as e:
            shown = ", ".join(repr(m) for m in e.missing[:10]) + (" ..." if len(e.missing) > 10 else "")
            raise RequestError(field, f"expected item ids known to the model, got unknown ids {shown}") from None
        return Query(items, k, bool(exclude_history))

    @torch.no_grad()
    def run_batch(self, queries: Sequence[Query]) -> List[Dict[str, list]]:
        """One forward for all queries -> ``{"items", "scores", "titles"}`` each.

        Histories are left-padded to ``max_len`` (as ``model.recommend`` pads
        one history), the top ``max k`` is taken once and cut per query."""
        n = len(queries)
        seq = torch.zeros(n, self.max_len, dtype=torch.long)
        for row, q in enumerate(queries):
            seq[row, self.max_len - len(q.items):] = torch.tensor(q.items, dtype=torch.long)
        exclude = torch.tensor([q.exclude_history for q in queries], dtype=torch.bool)
        k_max = max(q.k for q in queries)
        scores, ids = self.model.recommend(seq, k=k_max, exclude_history=exclude)
        scores, ids = scores.cpu().tolist(), ids.cpu().tolist()
        out = []
        for row, q in enumerate(queries):
            items, values, titles = self.catalog.describe(scores[row][:q.k], ids[row][:q.k])
            out.append({"items": items, "scores": values, "titles": titles})
        return out


def load_recommender(checkpoint: str, device: str = "cpu", max_k: int = 1000) -> Recommender:
    """A Recommender for a checkpoint written by ``plr train`` (or ``model.save``)."""
    from ..models import SequentialRecommender

    model, extra = SequentialRecommender.load_with_extra(checkpoint, map_location=device)
    catalog = ItemCatalog.from_checkpoint_extra(model.num_items, extra)
    info = {"model": type(model).__name__, "dataset": extra.get("dataset"), "num_items": model.num_items,
            "max_len": model.max_len, "raw_item_ids": catalog.has_raw_ids, "config": model.config(),
            "device": str(torch.device(device))}
    return Recommender(model.to(device), catalog, max_k=max_k, info=info)
