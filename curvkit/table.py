"""Plain-text and Markdown tables for reports, examples and benchmarks (one formatter, one place)."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

__all__ = ["format_table"]

Cell = str | int | float | None


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Number) and not isinstance(v, bool)


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[Cell]],
    formats: Sequence[str | None] | None = None,
    style: Literal["plain", "markdown"] = "plain",
    missing: str = "–",
) -> str:
    r"""Format ``rows`` under ``headers`` as aligned text.

    Numbers are formatted with the column's format spec (``format(value, spec)``, e.g. ``".3f"``,
    ``".2e"``; ``None`` or ``""`` means ``str(value)``) and right-aligned; a column holding any
    non-number is left-aligned. ``None`` cells print as ``missing``.

    Args:
        headers: Column titles.
        rows: One sequence of cells per row, each as long as ``headers``.
        formats: One format spec per column, or ``None`` for ``str`` everywhere.
        style: ``"plain"`` (columns separated by two spaces, a dashed rule under the header) or
            ``"markdown"`` (a GitHub table with alignment markers).
        missing: Text printed for ``None`` cells.

    Returns:
        The table, lines joined by ``"\\n"``, without a trailing newline.

    Raises:
        ValueError: If a row or ``formats`` does not have one entry per header, or ``style`` is
            unknown.
    """
    ncol = len(headers)
    if formats is None:
        formats = [None] * ncol
    if len(formats) != ncol:
        raise ValueError(f"formats has {len(formats)} entries but the table has {ncol} columns")
    if style not in ("plain", "markdown"):
        raise ValueError(f"style must be 'plain' or 'markdown', got {style!r}")
    for i, row in enumerate(rows):
        if len(row) != ncol:
            raise ValueError(f"row {i} has {len(row)} cells but the table has {ncol} columns: {row!r}")

    def text(v: Cell, spec: str | None) -> str:
        if v is None:
            return missing
        if spec and _is_number(v):
            return format(v, spec)
        return str(v)

    cells = [[text(v, formats[j]) for j, v in enumerate(row)] for row in rows]
    right = [all(_is_number(row[j]) or row[j] is None for row in rows) and bool(rows) for j in range(ncol)]
    widths = [max([len(h), *(len(c[j]) for c in cells)]) for j, h in enumerate(headers)]

    def line(items: Sequence[str]) -> list[str]:
        return [s.rjust(w) if r else s.ljust(w) for s, w, r in zip(items, widths, right)]

    if style == "markdown":
        rule = ["-" * (w - 1) + ":" if r else "-" * w for w, r in zip(widths, right)]
        out = [line(headers), rule, *(line(c) for c in cells)]
        return "\n".join("| " + " | ".join(parts) + " |" for parts in out)
    out = [line(headers), ["-" * w for w in widths], *(line(c) for c in cells)]
    return "\n".join("  ".join(parts).rstrip() for parts in out)
