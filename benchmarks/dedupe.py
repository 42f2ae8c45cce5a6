"""benchmarks `dedupe-exact`, `dedupe-exact-same-work` and `dedupe-minhash`.

The rows are the same on both sides of each comparison, and both sides run the
functions the dedupe stage runs (``stages.dedupe``), with no Ray and no runner.

`dedupe-exact`: rows/s of the stage's exact dedupe, ``first_occurrences(*text_keys(
prompt, completion))`` (``stages.common.textnorm``: each text normalised, whitespace runs
collapsed, stripped, lower-cased, and hashed to a 128-bit key per row in one compiled
pass; then the first occurrence of each key), ÷ polars ``DataFrame.unique(subset=[prompt,
completion], keep="first", maintain_order=True)`` on columns normalised beforehand,
normalisation not timed: the baseline does strictly less work (hashing only).
`dedupe-exact-same-work`: the same, ÷ polars doing the normalisation too
(``str.replace_all`` of a regex that touches only what normalisation changes: runs of two or
more whitespace characters, or one that is not a plain space (``WS_CHANGED``); then
``strip_chars``, ``to_lowercase``) and then ``unique``.
Rows: 200k synthetic traces (8 per prompt, a few multi-byte characters), about 30%
duplicates of earlier rows, a third of those differing only in whitespace or case.
Both sides must keep the same rows (``agree``).

`dedupe-minhash`: docs/s of the stage's near-duplicate pass, ``near_duplicates(
normalize_texts(docs))`` (vectorised datasketch-compatible MinHash + banded LSH),
÷ datasketch used the fastest way it documents: the faster (by median) of
``MinHash.update_batch`` per doc and one ``MinHash.bulk`` over all docs (5-word shingles of
``normalize_text(doc).lower()``), then ``MinHashLSH.query`` and ``insert`` if nothing matched.
5k docs of about 150 words, about 20% light edits (one or two words) of earlier docs; threshold
0.8, 128 permutations. ``agree``: every side flags the same docs. ``plain_update_docs_s``: the
per-shingle ``MinHash.update`` loop (the old baseline), for reference (median).

Every side runs once untimed (warm-up, and the agreement check), then ``BENCH_RUNS`` (default 3)
times, interleaved; lines give the ratio of medians with its spread (``_common.emit_medians``).
"""
from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit_medians, interleaved  # noqa: E402

ROWS, DUP_FRACTION, PER_PROMPT = 200_000, 0.3, 8
DOCS, NEAR_FRACTION = 5_000, 0.2
# Python's str.isspace() set, as a Rust regex class for polars
WS_CLASS = (r"[\t\n\x0B\x0C\r\x1C-\x1F \x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}"
            r"\x{3000}]")
WS = WS_CLASS + "+"
# only what normalisation changes: a run of two or more, or one whitespace character other than
# " " (a single space is left alone instead of rewritten into itself)
WS_CHANGED = "(?:" + WS_CLASS + "{2,}|" + WS_CLASS.replace(" ", "") + ")"
VOCAB = ["apples", "Janet", "basket", "gives", "neighbour", "so", "we", "add", "subtract", "total", "then", "each",
         "the", "of", "and", "=", "+", "-", "×", "→", "≤", "π", "Let", "x", "y", "Therefore", "answer", "is"]


def _words(rng: random.Random, k: int) -> str:
    return " ".join(rng.choice(VOCAB) if rng.random() < 0.7 else str(rng.randint(0, 999)) for _ in range(k))


def exact_rows(seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    unique = int(ROWS * (1 - DUP_FRACTION))
    prompts, completions = [], []
    for i in range(unique):
        if i % PER_PROMPT == 0:
            prompt = f"Problem {i // PER_PROMPT}: " + _words(rng, 25) + "?"
        lines = [_words(rng, rng.randint(8, 16)) for _ in range(rng.randint(3, 8))]
        prompts.append(prompt)
        completions.append("<think>\n" + "\n".join(lines) + f"\n</think>\nThe answer is \\boxed{{{rng.randint(0, 99)}}}.")
    for j in range(ROWS - unique):
        k = rng.randrange(len(prompts))
        p, c = prompts[k], completions[k]
        if j % 3 == 1:
            c = " " + c.replace(" ", "  ", 2).replace("\n", "\n\n", 1) + "\n"
        elif j % 3 == 2:
            p, c = p.upper(), c.replace("\n", "\u00a0\n", 1)
        prompts.append(p)
        completions.append(c)
    order = list(range(ROWS))
    rng.shuffle(order)
    return [prompts[i] for i in order], [completions[i] for i in order]


def rate(fn, items: int):
    """A zero-argument callable: ``items`` ÷ the seconds of one call of ``fn``."""
    def run() -> float:
        t0 = time.perf_counter()
        fn()
        return items / (time.perf_counter() - t0)
    return run


def bench_exact() -> None:
    import numpy as np
    import polars as pl
    import pyarrow as pa

    from stages.common.textnorm import first_occurrences, text_keys

    prompts, completions = exact_rows()
    table = pa.table({"prompt": prompts, "completion": completions})

    def ours():
        return first_occurrences(*text_keys(table.column("prompt"), table.column("completion")))

    def norm(col, ws=WS):
        return pl.col(col).str.replace_all(ws, " ").str.strip_chars(" ").str.to_lowercase()

    df = pl.from_arrow(table).with_row_index("row")
    normalised = df.with_columns(norm("prompt"), norm("completion"))  # not timed in `dedupe-exact`

    def polars_unique():
        return normalised.unique(subset=["prompt", "completion"], keep="first", maintain_order=True)

    def polars_same_work():  # the regex touches only what normalisation changes (WS_CHANGED)
        return df.with_columns(norm("prompt", WS_CHANGED), norm("completion", WS_CHANGED)).unique(
            subset=["prompt", "completion"], keep="first", maintain_order=True)

    kept = np.flatnonzero(ours())  # warm-up runs, and what each side keeps
    agree = bool(np.array_equal(kept, polars_unique()["row"].to_numpy())
                 and np.array_equal(kept, polars_same_work()["row"].to_numpy()))
    r = interleaved({"ours": rate(ours, ROWS), "unique": rate(polars_unique, ROWS),
                     "same_work": rate(polars_same_work, ROWS)}, alternate=True)
    mb = (table.column("prompt").nbytes + table.column("completion").nbytes) / 2**20
    common = {"rows": ROWS, "duplicates": int(ROWS - len(kept)), "mb": round(mb, 1), "agree": agree}
    emit_medians("dedupe-exact", r["ours"], r["unique"], "rows/s", **common,
                 baseline_is="polars unique on pre-normalised columns (normalisation not timed)")
    emit_medians("dedupe-exact-same-work", r["ours"], r["same_work"], "rows/s", **common,
                 baseline_is="polars normalise + unique")


def minhash_docs(seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    docs: list[str] = []
    for _ in range(DOCS):
        if docs and rng.random() < NEAR_FRACTION:
            words = rng.choice(docs).split(" ")
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(VOCAB)
            docs.append(" ".join(words))
        else:
            docs.append(_words(rng, rng.randint(100, 200)))
    return docs


def bench_minhash() -> None:
    import numpy as np
    import pyarrow as pa
    from datasketch import MinHash, MinHashLSH

    from pipeline.core.ids import normalize_text
    from stages.dedupe import NearDupSpec, near_duplicates, normalize_texts, shingles

    spec = NearDupSpec(enabled=True)
    docs = minhash_docs()
    column = pa.array(docs)

    def ours():
        return near_duplicates(normalize_texts(column), spec)

    def plain_loop():
        lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
        flags = []
        for i, doc in enumerate(docs):
            words = normalize_text(doc).lower().split()
            n = spec.ngram
            m = MinHash(num_perm=spec.num_perm, seed=spec.seed)
            for s in {" ".join(words[j : j + n]) for j in range(max(1, len(words) - n + 1))}:
                m.update(s.encode("utf-8"))
            hit = bool(lsh.query(m))
            if not hit:
                lsh.insert(str(i), m)
            flags.append(hit)
        return np.array(flags)

    def update_batch_loop():
        lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
        flags = []
        for i, doc in enumerate(docs):
            m = MinHash(num_perm=spec.num_perm, seed=spec.seed)
            m.update_batch(list(shingles(normalize_text(doc).lower(), spec.ngram)))
            hit = bool(lsh.query(m))
            if not hit:
                lsh.insert(str(i), m)
            flags.append(hit)
        return np.array(flags)

    def bulk_loop():  # every doc's MinHash in one MinHash.bulk call, then the LSH query/insert loop
        lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
        hashes = MinHash.bulk([list(shingles(normalize_text(doc).lower(), spec.ngram)) for doc in docs],
                              num_perm=spec.num_perm, seed=spec.seed)
        flags = []
        for i, m in enumerate(hashes):
            hit = bool(lsh.query(m))
            if not hit:
                lsh.insert(str(i), m)
            flags.append(hit)
        return np.array(flags)

    flags = ours()  # warm-up runs, and what each side flags
    agree = bool(np.array_equal(flags, plain_loop()) and np.array_equal(flags, update_batch_loop())
                 and np.array_equal(flags, bulk_loop()))
    r = interleaved({"ours": rate(ours, DOCS), "plain": rate(plain_loop, DOCS),
                     "update_batch": rate(update_batch_loop, DOCS), "bulk": rate(bulk_loop, DOCS)}, alternate=True)
    best = max(("update_batch", "bulk"), key=lambda k: r[k]["median"])  # datasketch's documented fast paths
    emit_medians("dedupe-minhash", r["ours"], r[best], "docs/s", docs=DOCS, near_duplicates=int(flags.sum()),
                 agree=agree, baseline_is=f"datasketch {'MinHash.bulk' if best == 'bulk' else 'MinHash.update_batch'} "
                 "(the faster of its two batch paths) + MinHashLSH query/insert",
                 update_batch_docs_s=round(r["update_batch"]["median"], 2),
                 bulk_docs_s=round(r["bulk"]["median"], 2), plain_update_docs_s=round(r["plain"]["median"], 2),
                 threshold=spec.threshold, num_perm=spec.num_perm, ngram=spec.ngram)


def main() -> None:
    bench_exact()
    bench_minhash()


if __name__ == "__main__":
    main()
