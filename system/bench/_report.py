"""Rendering helpers: numbers as table cells, and rich tables with one look."""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

__all__ = ["fmt", "table"]


def fmt(value: float | int | None, digits: int = 2, suffix: str = "") -> str:
    """A cell: ``-`` for a missing value, thousands separators for big numbers."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    if 0 < abs(value) < 1:  # small values keep two significant figures
        digits = max(digits, 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}{suffix}"


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    """A table whose first column is left-aligned and every other right-aligned.

    Every cell and the title are text, never rich markup: a path in brackets or an error
    detail prints as it is."""
    out = Table(title=escape(title), title_justify="left", show_edge=False, pad_edge=False)
    for i, column in enumerate(columns):
        out.add_column(escape(column), justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        out.add_row(*(escape(cell) for cell in row))
    return out
