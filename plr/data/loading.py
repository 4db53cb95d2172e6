"""From a config's ``data`` section to a ``SequenceDataset``."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from ..errors import UserError
from .dataset import SequenceDataset, build_dataset, check_usable
from .readers import read_interactions


def load_dataset(data_cfg: Dict[str, Any], parts: Sequence[str] = ("train", "valid", "test")) -> SequenceDataset:
    """Read ``data_cfg["path"]`` (format detected unless ``format`` says), split it
    as the section says (``encoding``, ``max_len``, ``split``, ``min_rating``, ``k_core``,
    ``split_time``) and check that ``parts`` are non-empty (``check_usable``)."""
    if not data_cfg.get("path"):
        raise UserError("--data: a dataset path is required", "pass --data PATH (or set data.path in the config)")
    inter = read_interactions(data_cfg["path"], fmt=data_cfg.get("format", "auto"),
                              encoding=data_cfg.get("encoding", "utf-8"))
    dataset = build_dataset(inter, max_len=data_cfg["max_len"], split=data_cfg["split"],
                            min_rating=data_cfg.get("min_rating"), k_core=data_cfg.get("k_core"),
                            split_time=data_cfg.get("split_time"))
    check_usable(dataset, str(data_cfg["path"]), parts)
    return dataset
