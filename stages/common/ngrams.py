"""Word n-grams for contamination checks (decontaminate, evaluate).

Texts are lower-cased and split into words and punctuation marks (so ``3 + 4`` and
``3 - 4`` differ); a text shorter than ``n`` words counts as one n-gram, so short
exact copies are caught too.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

DEFAULT_NGRAM = 13
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def ngrams(text: str, n: int) -> Iterator[str]:
    words = _WORD.findall(text.lower())
    if not words:
        return
    if len(words) <= n:
        yield " ".join(words)
        return
    for i in range(len(words) - n + 1):
        yield " ".join(words[i : i + n])


class Index:
    """n-gram -> the first item (source, id, text) it came from."""

    def __init__(self, n: int):
        self.n = n
        self.grams: dict[str, tuple[str, str, str]] = {}
        self.items = 0

    def add(self, source: str, item_id: str, text: str) -> None:
        self.items += 1
        for g in ngrams(text, self.n):
            self.grams.setdefault(g, (source, item_id, text))

    def match(self, text: str) -> tuple[str, tuple[str, str, str]] | None:
        for g in ngrams(text, self.n):
            hit = self.grams.get(g)
            if hit is not None:
                return g, hit
        return None


def row_text(row: dict, role: str, field: str) -> str:
    """The ``role`` turns of a chat row (``messages``), else its ``field`` column."""
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return "\n".join(m["content"] for m in msgs if m.get("role") == role and m.get("content"))
    return row.get(field) or ""
