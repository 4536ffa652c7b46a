"""How sdkd's messages say a count ("1 image", "2 images", "1 process") and print a table."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` (with thousands separators) and `noun` in agreement; the plural is `plural`, else `noun` + "es" after
    s, x, ch or sh ("processes", "batches"), else + "s"."""
    if n == 1:
        return f"1 {noun}"
    if plural is None:
        plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n:,} {plural}"


def markdown_table(lines: list[list[str]]) -> str:
    """A Markdown table with padded columns; `lines[0]` is the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in lines[1:]])
