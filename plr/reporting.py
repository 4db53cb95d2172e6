"""Tables for the terminal and for Markdown reports."""

from __future__ import annotations

from typing import List, Optional, Sequence


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def format_table(rows: List[dict], columns: List[str]) -> str:
    """Aligned plain-text table of ``rows`` (dicts) over ``columns``; floats with 4 decimals."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: List[dict], columns: Sequence[str], headers: Optional[Sequence[str]] = None) -> str:
    """GitHub Markdown table of ``rows`` over ``columns`` (strings are written as given)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
