"""Amazon Reviews 2023 benchmark files (5-core, ``timestamp_w_his`` split).

Each category comes as ``<Category>.train.csv``, ``.valid.csv`` and
``.test.csv`` (optionally gzipped) with the header
``user_id,parent_asin,rating,timestamp,history``: one row per review, the
target item ``parent_asin`` and the user's earlier items ``history``
(space-separated parent_asins). The split is by absolute time, so the given
train / valid / test membership is kept.

The PLR paper's filters are applied to the rows:

1. the target's rating is > ``min_rating`` (3);
2. the history has at least ``min_history`` items (5; 10 for CDs_and_Vinyl);
3. valid / test rows whose target item does not appear in the (filtered)
   training rows — as a target or in a history — are dropped.

Histories are kept as given (items whose own review was filtered out by the
rating filter stay in later histories).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .interactions import (STREAM_ERRORS, DataFormatError, Interactions, as_ids, explain_read_error, open_text,
                           to_float)

__all__ = ["read_amazon2023", "amazon2023_files", "SPLITS"]

SPLITS = ("train", "valid", "test")
REQUIRED = ("user_id", "parent_asin", "rating", "timestamp", "history")


def amazon2023_files(path) -> Tuple[str, List[Path]]:
    """(category, [train, valid, test] files) for a folder, a file prefix
    (``dir/Video_Games``) or one of the split files."""
    path = Path(path)
    if path.is_dir():
        cats = sorted({p.name.split(".")[0] for p in path.iterdir()
                       if any(p.name.endswith(f".{s}.csv") or p.name.endswith(f".{s}.csv.gz") for s in SPLITS)})
        if len(cats) != 1:
            raise ValueError(f"path: expected a folder with the split files of exactly one category, got {path} "
                             f"with categories {cats}; pass the prefix, e.g. {path / 'Video_Games'}")
        prefix = path / cats[0]
    else:
        name = path.name
        for s in SPLITS:
            for ext in (".csv", ".csv.gz"):
                if name.endswith(f".{s}{ext}"):
                    name = name[: -len(f".{s}{ext}")]
        prefix = path.parent / name
    files = []
    for s in SPLITS:
        cands = [prefix.parent / f"{prefix.name}.{s}.csv", prefix.parent / f"{prefix.name}.{s}.csv.gz"]
        hit = next((c for c in cands if c.exists()), None)
        if hit is None:
            raise FileNotFoundError(f"path: expected the {s} file {cands[0]} (or .gz) of the Amazon 2023 "
                                    f"timestamp_w_his benchmark, not found")
        files.append(hit)
    return prefix.name, files


def _read_split(path: Path):
    try:
        return _read_split_rows(path)
    except STREAM_ERRORS as exc:
        explain_read_error(path, exc)


def _read_split_rows(path: Path):
    with open_text(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:  # an empty split (possible for the headerless release)
            return [], [], np.zeros(0), np.zeros(0), np.array([], dtype=object)
        names = [h.strip().lower() for h in header]
        rows = list(reader)
        headerless = len(names) == len(REQUIRED) and not set(names) & set(REQUIRED)
        if headerless:  # the first release of the files had no header row
            rows.insert(0, header)
            header, names = list(REQUIRED), list(REQUIRED)
        missing = [c for c in REQUIRED if c not in names]
        if missing:
            raise DataFormatError(path, 1, f"expected the columns {','.join(REQUIRED)}, missing {missing}; "
                                  f"got {header}")
    first = 1 if headerless else 2  # line number of rows[0]
    ncol = len(header)
    lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero((lens != ncol) & (lens != 0))
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(path, i + first, f"expected {ncol} comma-separated fields ({','.join(header)}), "
                              f"got {int(lens[i])}: {rows[i]!r}")
    keep = np.flatnonzero(lens == ncol)
    if len(keep) != len(rows):
        rows = [rows[i] for i in keep]
    c = {k: names.index(k) for k in REQUIRED}

    def line_of(j):
        return int(keep[j]) + first
    user = [r[c["user_id"]] for r in rows]
    item = [r[c["parent_asin"]] for r in rows]
    for j, it in enumerate(item):
        if not it.strip():
            raise DataFormatError(path, line_of(j), "expected a parent_asin (target item), got an empty field")
    rating = to_float([r[c["rating"]] for r in rows], "rating", path, line_of)
    ts = to_float([r[c["timestamp"]] for r in rows], "timestamp", path, line_of)
    hist = np.array([r[c["history"]].strip() for r in rows], dtype=object)
    return user, item, rating, ts, hist


def _hist_len(h: str) -> int:
    # the files separate history items by single spaces
    return h.count(" ") + 1 if h else 0


def read_amazon2023(path, *, min_rating: Optional[float] = 3.0, min_history: Optional[int] = None,
                    require_train_items: bool = True) -> Interactions:
    """Read one category of the benchmark with the PLR paper's filters.

    Args:
        path: folder, file prefix (``dir/Video_Games``) or one split file.
        min_rating: keep rows with rating > min_rating (None: no filter).
        min_history: keep rows whose history has >= this many items; None =
            10 for CDs_and_Vinyl, else 5 (the paper's setting); 0 = no filter.
        require_train_items: drop valid/test rows whose target item does not
            appear in the kept training rows.
    Returns:
        ``Interactions`` with ``predefined_split`` and ``history`` set.
    """
    category, files = amazon2023_files(path)
    if min_history is None:
        min_history = 10 if category.lower().startswith("cds") else 5
    parts = [_read_split(f) for f in files]
    user = as_ids(sum((p[0] for p in parts), []))
    item = as_ids(sum((p[1] for p in parts), []))
    rating = np.concatenate([p[2] for p in parts])
    ts = np.concatenate([p[3] for p in parts])
    hist = np.concatenate([p[4] for p in parts]) if parts else np.array([], dtype=object)
    split = np.repeat(np.array(SPLITS, dtype="<U5"), [len(p[0]) for p in parts])

    keep = np.ones(len(user), dtype=bool)
    if min_rating is not None:
        keep &= rating > min_rating
    if min_history:
        hlen = np.fromiter((_hist_len(h) for h in hist), dtype=np.int64, count=len(hist))
        keep &= hlen >= min_history
    if require_train_items:
        tr = keep & (split == "train")
        known = set(item[tr].tolist())
        known.update(" ".join(hist[tr].tolist()).split())
        if item.dtype.kind in "iu":
            known = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k for k in known}
        in_train = np.fromiter((it in known for it in item.tolist()), dtype=bool, count=len(item))
        keep &= (split == "train") | in_train
    inter = Interactions(user=user, item=item, timestamp=ts, rating=rating, name=category,
                         predefined_split=split, history=hist, fmt="amazon2023")
    return inter.subset(keep)
