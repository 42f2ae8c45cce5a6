"""Word n-grams for contamination checks (decontaminate, evaluate).

Texts are lower-cased and split into words and punctuation marks (so ``3 + 4`` and
``3 - 4`` differ); a text shorter than ``n`` words counts as one n-gram, so short
exact copies are caught too.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

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


def shared_ngrams(queries: Sequence[str], corpus: Iterable[str], n: int) -> dict[int, str]:
    """For each query sharing an n-gram with some corpus text: its position -> one shared n-gram.

    Only the queries' n-grams are held in memory; the corpus is streamed once."""
    wanted: dict[str, list[int]] = {}
    for i, q in enumerate(queries):
        for g in ngrams(q, n):
            wanted.setdefault(g, []).append(i)
    hits: dict[int, str] = {}
    for text in corpus:
        if not wanted:
            break
        for g in ngrams(text, n):
            owners = wanted.pop(g, None)
            if owners:
                for i in owners:
                    hits.setdefault(i, g)
    return hits


def row_text(row: dict, role: str, field: str) -> str:
    """The ``role`` turns of a chat row (``messages``), else its ``field`` column."""
    msgs = row.get("messages")
    if isinstance(msgs, list):
        return "\n".join(m["content"] for m in msgs if m.get("role") == role and m.get("content"))
    return row.get(field) or ""
