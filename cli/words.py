"""How sdkd's messages say a count: "1 image", "2 images", "1 process"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """`n` (with thousands separators) and `noun` in agreement; the plural is `plural`, else `noun` + "es" after
    s, x, ch or sh ("processes", "batches"), else + "s"."""
    if n == 1:
        return f"1 {noun}"
    if plural is None:
        plural = noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")
    return f"{n:,} {plural}"
