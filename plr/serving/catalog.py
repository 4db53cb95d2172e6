"""Raw item ids <-> the model's ids 1..num_items, and item titles, as a
checkpoint stores them (``extra["item_raw_ids"]``, ``extra["item_titles"]``,
written by plr.training.dataset_extra). Shared by ``plr recommend`` and
``plr serve``."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

PADDING = 0


class UnknownItemsError(ValueError):
    """Raw ids the checkpoint does not know; ``missing`` lists them."""

    def __init__(self, missing: List[str]):
        self.missing = missing
        super().__init__(f"unknown item ids: {missing[:5]}{' ...' if len(missing) > 5 else ''}")


class ItemCatalog:
    """The item vocabulary of a checkpoint.

    ``raw_ids[i]`` is the raw id of the model's item ``i`` (index 0 = padding,
    ``None``); without a stored vocabulary the raw id of item ``i`` is ``str(i)``.
    """

    def __init__(self, num_items: int, raw_ids: Optional[Sequence[Optional[str]]] = None,
                 titles: Optional[Sequence[Any]] = None):
        if raw_ids is not None and len(raw_ids) != num_items + 1:
            raise ValueError(f"raw_ids: expected {num_items + 1} entries (index 0 = padding), got {len(raw_ids)}")
        self.num_items = num_items
        self.has_raw_ids = raw_ids is not None
        self.raw_ids: List[Optional[str]] = (
            [None if r is None else str(r) for r in raw_ids] if raw_ids is not None
            else [None] + [str(i) for i in range(1, num_items + 1)])
        self.titles: List[str] = [("" if t is None else str(t)) for t in (titles or [])]
        self._index: Dict[str, int] = {r: i for i, r in enumerate(self.raw_ids) if r is not None and i != PADDING}

    @classmethod
    def from_checkpoint_extra(cls, num_items: int, extra: Dict[str, Any]) -> "ItemCatalog":
        return cls(num_items, extra.get("item_raw_ids"), extra.get("item_titles"))

    def to_internal(self, raw: Sequence[Any]) -> List[int]:
        """Raw ids (ints or strings, compared as strings) -> model ids; raises
        :class:`UnknownItemsError` listing every id it does not know."""
        keys = [str(r) for r in raw]
        missing = [k for k in keys if k not in self._index]
        if missing:
            raise UnknownItemsError(list(dict.fromkeys(missing)))
        return [self._index[k] for k in keys]

    def title(self, item: int) -> str:
        return self.titles[item] if 0 <= item < len(self.titles) else ""

    def describe(self, scores: Sequence[float], items: Sequence[int]) -> Tuple[List[str], List[float], List[str]]:
        """One row of ``model.recommend`` -> (raw ids, scores, titles), best first.
        The ``-1`` ids that mark "no candidate left" (k above the candidates) are dropped."""
        kept = [(s, i) for s, i in zip(scores, items) if i >= 1]
        return ([self.raw_ids[i] for _, i in kept], [float(s) for s, _ in kept], [self.title(i) for _, i in kept])
