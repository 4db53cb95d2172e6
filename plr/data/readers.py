"""Readers of interaction logs into ``Interactions``.

``read_interactions(path, fmt="auto")`` dispatches to one reader per format:

- ``table``: CSV/TSV (optionally .gz) with a header; columns found by common
  names (see ``COLUMN_ALIASES``, RecBole ``name:type`` headers understood) or
  given with ``columns={"user": ..., "item": ..., "timestamp": ..., "rating": ...}``.
- ``sasrec``: ``user item`` lines, each user's lines in time order.
- ``sequences``: ``user i1 i2 ...`` lines, chronological.
- ``recbole``: RecBole atomic ``.inter`` (+ sibling ``.item`` for titles).
- ``seqrecbench``: folder with ``interactions.tsv[.gz]`` + ``items.tsv``.
- ``movielens``: GroupLens ``::`` files (``ratings.dat``, ``movies.dat``, ``users.dat``).
- ``amazon2023``: see ``plr.data.amazon2023``.

Readers parse with ``str.split`` / the ``csv`` module and convert whole
columns with numpy; a malformed line raises ``DataFormatError`` with the file
and the 1-based line number.
"""

from __future__ import annotations

import codecs

import csv
import io
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .interactions import (DEFAULT_ENCODING, STREAM_ERRORS, DataFormatError, Interactions, as_ids, explain_read_error, ids_like,
                           open_text, read_text, split_lines,
                           to_float)

__all__ = ["read_interactions", "detect_format", "FORMATS", "COLUMN_ALIASES"]

FORMATS = ("auto", "table", "sasrec", "sequences", "recbole", "seqrecbench", "movielens", "amazon2023")

#: Lower-cased header names recognised for each field, in order of preference.
COLUMN_ALIASES: Dict[str, tuple] = {
    "user": ("user", "user_id", "userid", "reviewerid", "uid", "customer_id", "visitorid"),
    "item": ("item", "item_id", "itemid", "parent_asin", "asin", "movieid", "iid", "product_id", "business_id"),
    "timestamp": ("timestamp", "time", "unixreviewtime", "ts", "unix_time", "datetime"),
    "rating": ("rating", "overall", "score", "stars"),
}

_AMAZON_SPLIT_RE = re.compile(r"^(?P<prefix>.+)\.(train|valid|test)\.csv(\.gz)?$")


def _strip_type(name: str) -> str:
    """Header name without quotes / RecBole ``:type`` suffix, lower-cased."""
    return name.strip().strip('"').split(":")[0].strip().lower()


def _find_columns(header: List[str], columns: Optional[dict], path) -> Dict[str, Optional[int]]:
    names = [_strip_type(h) for h in header]
    found: Dict[str, Optional[int]] = {}
    if columns is not None:
        unknown = set(columns) - set(COLUMN_ALIASES)
        if unknown:
            raise ValueError(f"columns: expected keys among {sorted(COLUMN_ALIASES)}, got {sorted(unknown)}")
    for key, aliases in COLUMN_ALIASES.items():
        if columns is not None and columns.get(key) is not None:
            want = columns[key]
            if isinstance(want, int):
                found[key] = want
                continue
            cands = [i for i, h in enumerate(header) if h.strip() == want] or \
                    [i for i, n in enumerate(names) if n == _strip_type(want)]
            if not cands:
                raise DataFormatError(path, 1, f"columns[{key!r}]={want!r} is not in the header {header}")
            found[key] = cands[0]
            continue
        found[key] = next((names.index(a) for a in aliases if a in names), None)
    for key in ("user", "item"):
        if found[key] is None:
            raise DataFormatError(path, 1, f"expected a {key} column in the header (one of "
                                  f"{', '.join(COLUMN_ALIASES[key])}, or pass columns={{'{key}': NAME}}); "
                                  f"got {header}")
    return found


def read_table(path, sep: Optional[str] = None, columns: Optional[dict] = None, *,
               quoting: Optional[int] = None, name: Optional[str] = None, fmt: str = "table") -> Interactions:
    """CSV/TSV with a header row. ``sep`` None: tab if the header has one, else
    comma, else whitespace. Tab files are read with quoting disabled."""
    path = Path(path)
    text = read_text(path)
    nl = text.find("\n")
    header_line = (text if nl < 0 else text[:nl]).rstrip("\r")
    body = "" if nl < 0 else text[nl + 1:]
    del text
    if not header_line.strip():
        raise DataFormatError(path, 1, "expected a header line naming the columns, got an empty line")
    if sep is None:
        sep = "\t" if "\t" in header_line else ("," if "," in header_line else None)
    if sep == " ":
        sep = None
    if quoting is None:
        quoting = csv.QUOTE_NONE if sep in (None, "\t") or '"' not in body else csv.QUOTE_MINIMAL
    if sep is None:
        header = header_line.split()
    else:
        header = next(csv.reader([header_line], delimiter=sep, quoting=quoting))
    cols = _find_columns(header, columns, path)
    ncol = len(header)
    if sep is not None and quoting == csv.QUOTE_NONE:
        fields, line_no = _fast_fields(body, sep, ncol, header, path)
    else:
        rows = [line.split() for line in split_lines(body)] if sep is None else \
            list(csv.reader(io.StringIO(body), delimiter=sep, quoting=quoting))
        lens = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        bad = np.flatnonzero((lens != ncol) & (lens != 0))
        if len(bad):
            i = int(bad[0])
            raise DataFormatError(path, _row_line(path, sep, quoting, i),
                                  f"expected {ncol} fields ({', '.join(header)}) separated by "
                                  f"{sep or 'whitespace'!r}, got {int(lens[i])}: {rows[i]!r}")
        keep = np.flatnonzero(lens == ncol)
        fields = [f for i in keep for f in rows[i]] if len(keep) != len(rows) else \
            [f for r in rows for f in r]
        line_no = (lambda j: _row_line(path, sep, quoting, int(keep[j])))

    def column(j):
        return fields[j::ncol]

    def line_of(j: int) -> int:
        return line_no(j)
    n = len(fields) // ncol
    user = as_ids(column(cols["user"]))
    item = as_ids(column(cols["item"]))
    if cols["timestamp"] is not None:
        ts = _timestamps(column(cols["timestamp"]), header[cols["timestamp"]], path, line_of)
        has_ts = True
    else:
        ts, has_ts = np.arange(n, dtype=np.float64), False
    rating = None
    if cols["rating"] is not None:
        rating = to_float(column(cols["rating"]), header[cols["rating"]], path, line_of)
    return Interactions(user=user, item=item, timestamp=ts, rating=rating, name=name or _stem(path),
                        has_timestamps=has_ts, fmt=fmt)


def _is_number(value) -> bool:
    try:
        float(value)
        return True
    except (ValueError, TypeError):
        return False


def _timestamps(values, what, path, line_of) -> np.ndarray:
    """Numbers, else ISO 8601 dates / datetimes (as seconds since the epoch);
    one kind per column, no blank cell."""
    blank = [i for i, v in enumerate(values) if not str(v).strip()]
    if blank:
        raise DataFormatError(path, line_of(blank[0]), f"missing timestamp in column {what!r} "
                              f"({len(blank)} blank cell(s)); fill or drop those rows")
    numeric = np.array([_is_number(v) for v in values], dtype=bool)
    if numeric.all():
        return to_float(values, what, path, line_of)
    if numeric.any():
        for i in np.flatnonzero(~numeric):
            try:
                np.datetime64(values[i], "s")
            except (ValueError, TypeError):
                raise DataFormatError(path, line_of(int(i)), f"expected a number or an ISO 8601 date in column "
                                      f"{what!r}, got {values[i]!r}") from None
        i = int(np.flatnonzero(numeric)[0] if not numeric[0] else np.flatnonzero(~numeric)[0])
        raise DataFormatError(path, line_of(i), f"column {what!r} mixes numbers and dates (line {line_of(0)} "
                              f"holds {values[0]!r}, this line {values[i]!r}); use one kind per column")
    try:
        return np.asarray(values, dtype="datetime64[s]").astype(np.int64).astype(np.float64)
    except (ValueError, TypeError):
        pass
    for i, v in enumerate(values):
        try:
            np.datetime64(v, "s")
        except (ValueError, TypeError):
            raise DataFormatError(path, line_of(i), f"expected a number or an ISO 8601 date in column {what!r}, "
                                  f"got {v!r}") from None
    raise DataFormatError(path, None, f"column {what!r}: expected numbers or ISO 8601 dates, not a mix")


def _fast_fields(body: str, sep: str, ncol: int, header, path):
    """Split unquoted ``body`` into a flat field list (row-major) and a map
    from row index to 1-based line number; checks every line's field count."""
    lines = split_lines(body)
    counts = np.fromiter(map(str.count, lines, [sep] * len(lines)), dtype=np.int64, count=len(lines))
    off = counts != ncol - 1
    if off.any():
        empty = np.fromiter((not lines[i].strip() for i in np.flatnonzero(off)), dtype=bool)
        idx = np.flatnonzero(off)
        if not empty.all():
            i = int(idx[np.flatnonzero(~empty)[0]])
            raise DataFormatError(path, i + 2, f"expected {ncol} fields ({', '.join(header)}) separated by {sep!r}, "
                                  f"got {counts[i] + 1}: {lines[i]!r}")
        keep = np.flatnonzero(~off)
        lines = [lines[i] for i in keep]
        line_no = (lambda j: int(keep[j]) + 2)
    else:
        line_no = (lambda j: j + 2)
    fields = sep.join(lines).split(sep) if lines else []
    return fields, line_no


def _row_line(path, sep, quoting, row_index: int) -> int:
    """1-based line of data row ``row_index`` (header = line 1); re-reads the
    file so quoted fields spanning lines are counted right."""
    if sep is None or sep == " " or quoting == csv.QUOTE_NONE:
        return row_index + 2
    with open_text(path) as fh:
        fh.readline()
        reader = csv.reader(fh, delimiter=sep, quoting=quoting)
        for i, _ in enumerate(reader):
            if i == row_index:
                return reader.line_num + 1
    return row_index + 2


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".gz", ".csv", ".tsv", ".txt", ".inter", ".dat"):
        if name.endswith(suf):
            name = name[: -len(suf)]
    return name or path.name


def _split_lines(path) -> List[List[str]]:
    return [line.split() for line in split_lines(read_text(path))]


def read_sasrec(path) -> Interactions:
    """``user item`` per line (whitespace separated), each user's lines in time
    order; the timestamp is the line order."""
    path = Path(path)
    text = read_text(path)
    if "\t" not in text and "\r" not in text:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if all(c == 1 for c in map(str.count, lines, [" "] * len(lines))):  # fast path: "u i" lines
            fields = " ".join(lines).split(" ")
            if all(fields):
                return Interactions(user=as_ids(fields[0::2]), item=as_ids(fields[1::2]),
                                    timestamp=np.arange(len(lines), dtype=np.float64), name=_stem(path),
                                    has_timestamps=False, fmt="sasrec")
    parts = [line.split() for line in split_lines(text)]
    del text
    lens = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    bad = np.flatnonzero((lens != 2) & (lens != 0))
    if len(bad):
        i = int(bad[0])
        raise DataFormatError(path, i + 1, f"expected 2 fields 'user item', got {int(lens[i])}: {parts[i]!r}")
    keep = np.flatnonzero(lens == 2)
    parts = [parts[i] for i in keep] if len(keep) != len(parts) else parts
    user = as_ids([p[0] for p in parts])
    item = as_ids([p[1] for p in parts])
    return Interactions(user=user, item=item, timestamp=keep.astype(np.float64), name=_stem(path),
                        has_timestamps=False, fmt="sasrec")


def read_sequences(path) -> Interactions:
    """``user i1 i2 ...`` per line, chronological; the timestamp is the
    position in the file (so it increases along each sequence)."""
    path = Path(path)
    parts = _split_lines(path)
    users, items, counts = [], [], []
    for i, p in enumerate(parts):
        if not p:
            continue
        if len(p) < 2:
            raise DataFormatError(path, i + 1, f"expected 'user item1 item2 ...' (at least one item), got {p!r}")
        users.append(p[0])
        items.extend(p[1:])
        counts.append(len(p) - 1)
    user = np.repeat(as_ids(users), counts) if users else np.array([], dtype=np.int64)
    return Interactions(user=user, item=as_ids(items), timestamp=np.arange(len(items), dtype=np.float64),
                        name=_stem(path), has_timestamps=False, fmt="sequences")


def _read_typed_titles(path) -> tuple:
    """RecBole ``.item``: (ids, titles) from the first ``*title*`` / ``*name*`` column."""
    lines = split_lines(read_text(path))
    if not lines:
        return [], []
    header = [_strip_type(h) for h in lines[0].split("\t")]
    if "item_id" not in header:
        raise DataFormatError(path, 1, f"expected an item_id column in the header, got {lines[0]!r}")
    id_col = header.index("item_id")
    tcol = next((i for i, h in enumerate(header) if "title" in h), None)
    if tcol is None:
        tcol = next((i for i, h in enumerate(header) if "name" in h), None)
    ids, titles = [], []
    for ln, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        f = line.split("\t")
        if len(f) != len(header):
            raise DataFormatError(path, ln, f"expected {len(header)} tab-separated fields, got {len(f)}")
        ids.append(f[id_col])
        titles.append(f[tcol].strip() if tcol is not None else "")
    return ids, titles


def read_recbole(path) -> Interactions:
    """RecBole atomic files: ``path`` is a ``.inter`` file or a folder holding
    one; a sibling ``.item`` file with a title column gives the titles."""
    path = Path(path)
    if path.is_dir():
        inters = sorted(path.glob("*.inter"))
        if len(inters) != 1:
            raise ValueError(f"path: expected a folder with exactly one .inter file, got {path} "
                             f"with {[p.name for p in inters]}")
        path = inters[0]
    inter = read_table(path, sep="\t", quoting=csv.QUOTE_NONE, name=path.stem, fmt="recbole")
    item_file = path.with_suffix(".item")
    if item_file.exists():
        _attach_titles(inter, *_read_typed_titles(item_file), like=inter.item)
    return inter


def _attach_titles(inter: Interactions, ids, titles, like) -> None:
    """Item titles and the item catalogue, ids typed like the interaction ids ``like``."""
    keys = ids_like(ids, like)
    inter.item_titles = dict(zip(keys, titles))
    inter.item_catalog = np.asarray(keys)


def _read_plain_titles(path, sep: str = "\t", encoding: str = "utf-8", skip_header: bool = True) -> tuple:
    """``id<sep>title[...]`` lines, no quoting: (ids, titles); the title is the second field."""
    lines = split_lines(read_text(path, encoding))
    ids, titles = [], []
    for ln, line in enumerate(lines[1:] if skip_header else lines, start=2 if skip_header else 1):
        if not line.strip():
            continue
        f = line.split(sep)
        if len(f) < 2:
            raise DataFormatError(path, ln, f"expected an item id and a title separated by {sep!r}, got {line!r}")
        ids.append(f[0].strip())
        titles.append(f[1].strip() if sep != "\t" else sep.join(f[1:]).strip())
    return ids, titles


def read_seqrecbench(path) -> Interactions:
    """SeqRecBenchmark folder: ``interactions.tsv[.gz]`` (``user_id item_id
    timestamp``, tab separated) and ``items.tsv`` (``item_id title``, read
    with quoting disabled)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    inter_file = next((path / n for n in ("interactions.tsv.gz", "interactions.tsv") if (path / n).exists()), None)
    if inter_file is None:
        raise ValueError(f"path: expected a folder with interactions.tsv.gz or interactions.tsv, got {path}")
    inter = read_table(inter_file, sep="\t", quoting=csv.QUOTE_NONE, name=path.name, fmt="seqrecbench")
    items = path / "items.tsv"
    if items.exists():
        _attach_titles(inter, *_read_plain_titles(items), like=inter.item)
    return inter


def read_movielens(path) -> Interactions:
    """GroupLens ``::`` files (ISO-8859-1): ``ratings.dat`` (user::item::rating::
    timestamp), ``movies.dat`` (titles) and ``users.dat``. A folder with only the
    metadata files gives zero rows but ``item_titles`` and the catalogs."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    ratings = folder / "ratings.dat"
    if ratings.exists():
        parts = [line.split("::") for line in split_lines(read_text(ratings, "iso-8859-1"))]
        for i, p in enumerate(parts):
            if p and p != [""] and len(p) != 4:
                raise DataFormatError(ratings, i + 1, f"expected 'user::item::rating::timestamp', got {'::'.join(p)!r}")
        keep = [i for i, p in enumerate(parts) if len(p) == 4]
        parts = [parts[i] for i in keep]

        def line_of(j):
            return keep[j] + 1
        inter = Interactions(user=as_ids([p[0] for p in parts]), item=as_ids([p[1] for p in parts]),
                             timestamp=to_float([p[3] for p in parts], "timestamp", ratings, line_of),
                             rating=to_float([p[2] for p in parts], "rating", ratings, line_of),
                             name=folder.name, fmt="movielens")
    else:
        empty = np.array([], dtype=np.int64)
        inter = Interactions(user=empty, item=empty, timestamp=np.array([], dtype=np.float64), rating=None,
                             name=folder.name, has_timestamps=False, fmt="movielens")
    movies = folder / "movies.dat"
    if movies.exists():
        ids, titles = _read_plain_titles(movies, sep="::", encoding="iso-8859-1", skip_header=False)
        _attach_titles(inter, ids, titles, like=inter.item if len(inter) else np.array([0]))
    users = folder / "users.dat"
    if users.exists():
        ids = [line.split("::")[0] for line in split_lines(read_text(users, "iso-8859-1")) if line.strip()]
        inter.user_catalog = as_ids(ids)
    if not ratings.exists() and not movies.exists():
        raise ValueError(f"path: expected a MovieLens folder with ratings.dat and/or movies.dat, got {folder}")
    return inter


# ----------------------------------------------------------------------------- detection

def _sniff_file(path: Path) -> str:
    name = path.name
    if name.endswith(".inter"):
        return "recbole"
    if _AMAZON_SPLIT_RE.match(name) and _looks_amazon2023(path):
        return "amazon2023"
    if name.endswith(".dat"):
        return "movielens"
    if name.startswith("interactions.tsv"):
        return "seqrecbench"
    try:
        with open_text(path) as fh:
            lines = []
            for line in fh:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                if len(lines) >= 200:
                    break
    except STREAM_ERRORS as exc:
        explain_read_error(path, exc)
    if lines and lines[0].startswith("\ufeff"):
        read_text(path)  # raises: a byte-order mark
    if not lines:
        raise DataFormatError(path, None, "expected interaction lines, got an empty file")
    first = lines[0]
    tokens = re.split(r"[\t,]|\s+", first.strip())

    def numeric(t):
        try:
            float(t)
            return True
        except ValueError:
            return False
    if any(not numeric(t) for t in tokens if t) and ("\t" in first or "," in first or len(tokens) <= 8):
        names = {_strip_type(t) for t in tokens}
        if names & set(COLUMN_ALIASES["user"]) or names & set(COLUMN_ALIASES["item"]) or "," in first or "\t" in first:
            return "table"
    counts = [len(line.split()) for line in lines]
    if all(c == 2 for c in counts):
        return "sasrec"
    return "sequences"


def _looks_amazon2023(path: Path) -> bool:
    """A ``*.train/valid/test.csv`` file whose header names parent_asin and
    history (or, headerless, whose first line has 5 comma-separated fields)."""
    try:
        with open_text(path) as fh:
            first = fh.readline().strip().lower()
    except (OSError, UnicodeDecodeError, EOFError):
        return False
    names = [f.strip() for f in first.split(",")]
    return ("parent_asin" in names and "history" in names) or (len(names) == 5 and "user_id" not in names) \
        or not first


def detect_format(path) -> str:
    """The format ``read_interactions(path, fmt="auto")`` would use."""
    path = Path(path)
    if path.is_dir():
        if (path / "interactions.tsv.gz").exists() or (path / "interactions.tsv").exists():
            return "seqrecbench"
        if any(path.glob("*.inter")):
            return "recbole"
        if any(_AMAZON_SPLIT_RE.match(p.name) and _looks_amazon2023(p) for p in path.iterdir()):
            return "amazon2023"
        if (path / "ratings.dat").exists() or (path / "movies.dat").exists():
            return "movielens"
        data = _data_files(path)
        if len(data) == 1:
            return _sniff_file(data[0])
        raise ValueError(f"path: cannot tell the format of folder {path}: expected interactions.tsv[.gz], a .inter "
                         f"file, <Category>.train.csv, ratings.dat/movies.dat or exactly one .txt/.csv/.tsv file; "
                         f"got {sorted(p.name for p in path.iterdir())}")
    if not path.exists():
        prefix_hits = [p for p in path.parent.glob(path.name + ".*") if _AMAZON_SPLIT_RE.match(p.name)] \
            if path.parent.is_dir() else []
        if prefix_hits:
            return "amazon2023"
        raise FileNotFoundError(f"path: no such file or folder: {path}")
    return _sniff_file(path)


def _data_files(folder: Path) -> List[Path]:
    exts = (".txt", ".csv", ".tsv", ".txt.gz", ".csv.gz", ".tsv.gz")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(exts))


def read_interactions(path, fmt: str = "auto", sep: Optional[str] = None, columns: Optional[dict] = None,
                      encoding: str = "utf-8", **options) -> Interactions:
    """Read an interaction log (see the module docstring for the formats).

    Args:
        path: file or folder.
        fmt: one of ``FORMATS``; "auto" inspects the file / folder.
        sep: field separator for "table" (None = detect).
        columns: for "table", explicit column names (or indices) for
            "user", "item", "timestamp", "rating".
        encoding: the text encoding of the files (``data.encoding``); files of
            a known other encoding (GroupLens ``::`` files: ISO-8859-1) keep theirs.
        **options: passed to the amazon2023 reader (``min_rating``, ``min_history``,
            ``require_train_items``).
    Raises:
        DataFormatError: a malformed line (file and 1-based line in the message).
        ValueError / FileNotFoundError: a bad argument or a missing path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt: expected one of {FORMATS}, got {fmt!r}")
    check_encoding(encoding)
    token = DEFAULT_ENCODING.set(encoding)
    try:
        return _read_interactions(Path(path), fmt, sep, columns, **options)
    finally:
        DEFAULT_ENCODING.reset(token)


def check_encoding(encoding) -> str:
    """``encoding`` if Python knows it, else a ``ValueError`` naming ``data.encoding``."""
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise ValueError(f"data.encoding: expected a text encoding Python knows (utf-8, latin-1, cp1252, ...), "
                         f"got {encoding!r}") from None
    return encoding


def _read_interactions(path: Path, fmt: str, sep, columns, **options) -> Interactions:
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt != "amazon2023" and not path.exists():
        raise FileNotFoundError(f"path: no such file or folder: {path}")
    if options and fmt != "amazon2023":
        raise TypeError(f"read_interactions: options {sorted(options)} only apply to fmt='amazon2023', got fmt={fmt!r}")
    folder = None
    if path.is_dir() and fmt in ("table", "sasrec", "sequences"):
        folder = path
        data = _data_files(path)
        if len(data) != 1:
            raise ValueError(f"path: expected a folder with exactly one data file for fmt={fmt!r}, got {path}")
        path = data[0]
    if fmt in ("table", "sasrec", "sequences"):
        if fmt == "table":
            inter = read_table(path, sep=sep, columns=columns)
        else:
            inter = read_sasrec(path) if fmt == "sasrec" else read_sequences(path)
        if folder is not None:
            inter.name = folder.name
        return inter
    if fmt == "recbole":
        return read_recbole(path)
    if fmt == "seqrecbench":
        return read_seqrecbench(path)
    if fmt == "movielens":
        return read_movielens(path)
    from .amazon2023 import read_amazon2023
    return read_amazon2023(path, **options)
