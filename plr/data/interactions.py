"""The ``Interactions`` container, ``DataFormatError`` and small text helpers.

An ``Interactions`` holds one row per user-item interaction as parallel numpy
arrays with the *raw* ids of the source (int64 when every id is a plain
integer, else str); ``plr.data.dataset.build_dataset`` remaps them.
"""

from __future__ import annotations

import contextvars
import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["DataFormatError", "Interactions"]


class DataFormatError(ValueError):
    """A data file does not have the expected format.

    The message names the file, the 1-based line number (when one applies)
    and what was expected there.
    """

    def __init__(self, path, line: Optional[int], message: str):
        self.path = str(path)
        self.line = line
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass
class Interactions:
    """Raw interaction log: parallel arrays, one entry per interaction.

    Attributes:
        user, item: raw ids (numpy int64 or str arrays).
        timestamp: float64; the line order when the source has no time.
        rating: float64 array or None when the source has no rating.
        item_titles: raw item id -> title (may be empty).
        name: a short dataset name (folder or file stem).
        predefined_split: None, or an array of "train" / "valid" / "test" per row.
        history: None, or (amazon2023) one space-separated string of raw item
            ids per row: the user's history before that row, as given by the source.
        has_timestamps: False when ``timestamp`` is only the line order.
        user_catalog, item_catalog: raw ids declared by metadata files
            (users.dat, movies.dat, items.tsv, .item), possibly None.
        fmt: the format the rows were read with.
    """

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    rating: Optional[np.ndarray] = None
    item_titles: Dict = field(default_factory=dict)
    name: str = ""
    predefined_split: Optional[np.ndarray] = None
    history: Optional[np.ndarray] = None
    has_timestamps: bool = True
    user_catalog: Optional[np.ndarray] = None
    item_catalog: Optional[np.ndarray] = None
    fmt: str = ""

    def __post_init__(self):
        n = len(self.user)
        for attr in ("item", "timestamp", "rating", "predefined_split", "history"):
            arr = getattr(self, attr)
            if arr is not None and len(arr) != n:
                raise ValueError(f"Interactions.{attr}: expected {n} entries (one per row of user), got {len(arr)}")
        self.timestamp = np.asarray(self.timestamp, dtype=np.float64)
        if self.rating is not None:
            self.rating = np.asarray(self.rating, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.user)

    @property
    def num_users(self) -> int:
        """Distinct users among the rows."""
        return int(len(np.unique(self.user))) if len(self) else 0

    @property
    def num_items(self) -> int:
        """Distinct items among the rows (history items not counted)."""
        return int(len(np.unique(self.item))) if len(self) else 0

    def subset(self, mask_or_index) -> "Interactions":
        """A new ``Interactions`` with the selected rows (boolean mask or index array)."""
        def pick(a):
            return None if a is None else a[mask_or_index]
        return Interactions(user=self.user[mask_or_index], item=self.item[mask_or_index],
                            timestamp=self.timestamp[mask_or_index], rating=pick(self.rating),
                            item_titles=self.item_titles, name=self.name,
                            predefined_split=pick(self.predefined_split), history=pick(self.history),
                            has_timestamps=self.has_timestamps, user_catalog=self.user_catalog,
                            item_catalog=self.item_catalog, fmt=self.fmt)

    def __repr__(self) -> str:
        return (f"Interactions(name={self.name!r}, fmt={self.fmt!r}, rows={len(self)}, users={self.num_users}, "
                f"items={self.num_items}, rating={'yes' if self.rating is not None else 'no'}, "
                f"titles={len(self.item_titles)}, predefined_split={self.predefined_split is not None})")


# ----------------------------------------------------------------------------- helpers

# The text encoding of data files when a reader names none: ``read_interactions(...,
# encoding=...)`` (``data.encoding``) sets it for the duration of one read.
DEFAULT_ENCODING: contextvars.ContextVar = contextvars.ContextVar("plr_data_encoding", default="utf-8")


def open_text(path, encoding: Optional[str] = None):
    """Open a text file for reading; gzip (by suffix or magic bytes) is transparent."""
    encoding = encoding or DEFAULT_ENCODING.get()
    path = Path(path)
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if path.suffix == ".gz" or magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, newline="")
    return open(path, "r", encoding=encoding, newline="")


def read_text(path, encoding: Optional[str] = None) -> str:
    """The whole (possibly gzipped) file as one string (``encoding``: default
    ``DEFAULT_ENCODING``, utf-8). Undecodable bytes, a byte-order mark and a
    truncated or corrupt gzip file are ``DataFormatError``s naming the file (and the line)."""
    encoding = encoding or DEFAULT_ENCODING.get()
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFormatError(path, None, f"truncated or corrupt gzip file ({exc}); download or compress it "
                              "again") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, line, f"bytes {raw[exc.start:exc.start + 4]!r} are not valid {encoding} "
                              f"(the encoding tried, data.encoding); name the file's encoding, e.g. "
                              f"--set data.encoding=latin-1, or convert the file, e.g. "
                              f"iconv -f latin1 -t utf-8 FILE > FILE.utf8") from None
    if text.startswith("\ufeff"):
        raise DataFormatError(path, 1, "the file starts with a byte-order mark (BOM), which would become part of "
                              "the first column name; save it as UTF-8 without BOM (e.g. sed -i '1s/^\\xEF\\xBB"
                              "\\xBF//' FILE)")
    return text


# What streaming a bad file through open_text raises; ``explain_read_error`` turns it into a DataFormatError.
STREAM_ERRORS = (UnicodeDecodeError, EOFError, gzip.BadGzipFile, zlib.error)


def explain_read_error(path, exc: BaseException, encoding: Optional[str] = None):
    """Raise the ``DataFormatError`` of ``read_text`` (file, line, what to do) for
    an error met while streaming ``path``; re-raise ``exc`` if there is none."""
    read_text(path, encoding)
    raise exc


_POW10 = 10 ** np.arange(19, dtype=np.int64)


def split_lines(text: str) -> List[str]:
    """Lines split on "\n" only (titles may hold other Unicode line breaks),
    "\r\n" endings accepted, no trailing empty line."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def as_ids(values: Sequence) -> np.ndarray:
    """Raw ids as an array: int64 when every value is an integer written
    canonically (no leading zero, sign or space, so "007" stays a distinct
    string id), else str."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind in "iu":
            return values.astype(np.int64)
        values = values.astype(str).tolist()
    values = list(values)
    if not values:
        return np.array([], dtype=np.int64)
    try:
        ints = np.fromiter(map(int, values), dtype=np.int64, count=len(values))
    except (ValueError, TypeError, OverflowError):
        return np.asarray(values, dtype=str)
    # Canonical text of an int has exactly its digit count (+1 for a minus sign).
    digits = np.maximum(np.searchsorted(_POW10, np.abs(ints), side="right"), 1) + (ints < 0)
    if int(digits.sum()) != sum(map(len, map(str, values)) if not isinstance(values[0], str) else map(len, values)):
        return np.asarray(values, dtype=str)
    return ints


def ids_like(keys, reference: np.ndarray) -> list:
    """Convert raw ids read from a side file (titles) to the dtype of ``reference``."""
    if reference.dtype.kind in "iu":
        out = []
        for k in keys:
            try:
                out.append(int(k))
            except ValueError:
                out.append(k)
        return out
    return [str(k) for k in keys]


def to_float(values: Sequence, what: str, path, line_of) -> np.ndarray:
    """``values`` (strings) as float64; on a bad value raise ``DataFormatError``
    naming the line (``line_of(i)`` maps a value index to its 1-based line)."""
    try:
        out = np.asarray(values, dtype=np.float64)
    except (ValueError, TypeError):
        out = None
    if out is not None:
        bad = np.flatnonzero(~np.isfinite(out))
        if len(bad):
            i = int(bad[0])
            raise DataFormatError(path, line_of(i), f"expected a finite number in column {what!r}, got {values[i]!r} "
                                  f"({len(bad)} such value(s))")
        return out
    for i, v in enumerate(values):
        try:
            float(v)
        except (ValueError, TypeError):
            raise DataFormatError(path, line_of(i), f"expected a number in column {what!r}, got {v!r}") from None
    raise DataFormatError(path, None, f"column {what!r}: expected numbers")  # pragma: no cover
