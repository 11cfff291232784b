"""Where two sequences (texts, token ids) first differ, and a one-line excerpt of the difference for messages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def first_diff(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Index of the first differing element; the shorter length when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def text_diff(a: str, b: str, what_a: str, what_b: str) -> str:
    """'A and B differ at char N: <excerpt of a> vs <excerpt of b>'."""
    i = first_diff(a, b)
    return f"{what_a} and {what_b} differ at char {i}: {a[max(0, i - 20) : i + 30]!r} vs {b[max(0, i - 20) : i + 30]!r}"
