"""``curvkit.table.format_table``: alignment, number formats, missing cells, Markdown, bad input."""

from __future__ import annotations

import pytest

from curvkit.table import format_table


def test_plain_table_aligns_text_left_and_numbers_right():
    out = format_table(["name", "value", "n"], [["a", 1.23456, 3], ["long name", None, 12]],
                       formats=[None, ".2f", "d"])
    assert out.splitlines() == [
        "name       value   n",
        "---------  -----  --",
        "a           1.23   3",
        "long name      –  12",
    ]


def test_markdown_table_has_alignment_markers():
    out = format_table(["method", "ECE"], [["MAP", 0.0312], ["full", 2e-5]], formats=[None, ".1e"],
                       style="markdown")
    assert out.splitlines() == [
        "| method |     ECE |",
        "| ------ | ------: |",
        "| MAP    | 3.1e-02 |",
        "| full   | 2.0e-05 |",
    ]


def test_mixed_column_is_left_aligned_and_strings_are_not_formatted():
    out = format_table(["x"], [[1.5], ["n/a"]], formats=[".3f"])
    assert out.splitlines()[2:] == ["1.500", "n/a"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": [[1, 2]]}, r"row 0 has 2 cells but the table has 1 columns"),
        ({"rows": [[1]], "formats": [".2f", ".2f"]}, r"formats has 2 entries but the table has 1"),
        ({"rows": [[1]], "style": "html"}, r"style must be 'plain' or 'markdown', got 'html'"),
    ],
)
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        format_table(["a"], **kwargs)
