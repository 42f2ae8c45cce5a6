"""dedupe: keep verified traces, drop exact and near duplicates, cap traces per prompt, format chat rows.

Input ``samples``: rows with ``prompt_id``, ``prompt`` and a completion column
(``completion`` from generate/verify, or e.g. ``solution`` for gold data), and a
``verdict`` column when ``require_verdict`` is set.
Output ``sft``: ``prompt_id``, ``source``, ``sample_index``, ``messages``
(list of {role, content}), ready for the sft stage.
Output ``dropped``: every input row not kept, with its ``reason``
(``verdict:<reason>``, ``empty_completion``, ``duplicate``, ``near_duplicate``,
``over_max_per_prompt``), counted as ``removed`` in the stage's ``dropped`` counts
(stage record, and ``stats.dropped`` in both outputs' manifests).

Exact duplicates: same prompt and completion after normalisation (whitespace runs
collapsed to one space, stripped, lower-cased per code point; ``stages.common.textnorm``),
found by a 128-bit key hashed from the normalised bytes of both columns in compiled
code, without materialising the normalised text (``text_keys``, ``first_occurrences``).

Near duplicates (``near_dup.enabled``): MinHash over word n-grams of
prompt + completion, with an LSH index at the configured Jaccard threshold; a row
whose text is that close to an earlier kept row is dropped. Signatures are the ones
``datasketch.MinHash`` (scheme affine32) computes, vectorised over all rows
(``MinHasher``); bands are datasketch's ``MinHashLSH`` parameters (``LSHIndex``).

The ``max_per_prompt`` cap keeps, per prompt (``prefer``):
``shortest`` the k shortest completions (ties: input order); ``first`` the first k
in input order; ``diverse`` the shortest, then repeatedly the candidate whose largest
Jaccard similarity (word ``near_dup.ngram``-gram shingles of the normalised
completion) to the traces already kept is smallest (ties: shorter, then input order).
"""
from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.stage import Stage, StageContext, StageError
from stages.common.textnorm import first_occurrences, normalize_texts, string_buffers, text_keys

_U32 = np.uint32
_DIGEST = operator.methodcaller("digest")
MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
SFT_SCHEMA = pa.schema(
    [("prompt_id", pa.string()), ("source", pa.string()), ("sample_index", pa.int32()), ("messages", MESSAGES_TYPE)]
)
DROPPED_SCHEMA = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("reason", pa.string())])


class NearDupSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity above which rows are near duplicates")
    ngram: int = Field(5, ge=1, description="words per shingle")
    num_perm: int = Field(128, ge=16)
    seed: int = 1


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    near_dup: NearDupSpec = Field(default_factory=NearDupSpec)
    completion_field: str = "completion"
    require_verdict: str | None = Field("correct", description="keep only rows with this verdict; null keeps all")
    max_per_prompt: int | None = Field(None, ge=1, description="at most k traces per prompt")
    prefer: str = Field("shortest", pattern="^(shortest|first|diverse)$",
                        description="which traces survive the cap: shortest, first, or diverse (max-min Jaccard)")
    system_prompt: str | None = None


# -- near duplicates: MinHash LSH, vectorised ---------------------------------


def _ngram_spans(d: np.ndarray, off: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte spans (start, end) of each row's word n-grams, rows in order, and the count per row:
    what ``shingles`` makes, duplicates included (one span, maybe empty, for a row of fewer than n words)."""
    rows = len(off) - 1
    size = len(d)
    space = d == 32
    inner = ~space
    before = np.ones(size, bool)  # the byte before is a space or the row starts here
    before[1:] = space[:-1]
    after = np.ones(size, bool)  # the byte after is a space or the row ends here
    after[:-1] = space[1:]
    starts, ends = off[:-1], off[1:]
    before[starts[starts < size]] = True
    after[ends[ends > 0] - 1] = True
    wstart = np.flatnonzero(inner & before)
    wend = np.flatnonzero(inner & after) + 1
    words = np.diff(np.searchsorted(wstart, off))
    first_word = np.searchsorted(wstart, starts)
    per_row = np.maximum(1, words - n + 1)
    row = np.repeat(np.arange(rows), per_row)
    i = np.arange(len(row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    has = words[row] > 0
    if not len(wstart):
        return starts[row], starts[row], per_row
    g = np.minimum(first_word[row] + i, len(wstart) - 1)
    last = np.minimum(first_word[row] + i + np.minimum(words[row], n) - 1, len(wend) - 1)
    return np.where(has, wstart[g], starts[row]), np.where(has, wend[last], starts[row]), per_row


def shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of a normalised text, as UTF-8 (one shingle when it has fewer than n words)."""
    words = text.encode("utf-8", "surrogatepass").split()
    return {b" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


class MinHasher:
    """datasketch ``MinHash(num_perm, seed)`` signatures (scheme affine32: SHA-1 32-bit shingle hash,
    MurmurHash3 finalizer, ``a * h + b`` mod 2^32), for many texts at once."""

    def __init__(self, num_perm: int, seed: int, ngram: int):
        from datasketch import MinHash

        m = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        self.a, self.b = (np.asarray(x, np.uint32) for x in m.permutations)
        self.num_perm, self.ngram = num_perm, ngram

    @staticmethod
    def _fmix32(h: np.ndarray) -> np.ndarray:
        h = h ^ (h >> _U32(16))
        h = h * _U32(0x85EBCA6B)
        h = h ^ (h >> _U32(13))
        h = h * _U32(0xC2B2AE35)
        return h ^ (h >> _U32(16))

    def signatures(self, texts: pa.Array | pa.ChunkedArray, chunk: int = 1 << 13) -> np.ndarray:
        """uint32 [len(texts), num_perm]: the signature of each text's word n-grams (``shingles``),
        hashed in batches of about ``chunk`` n-grams. Texts are normalised (``normalize_texts``:
        one space between words; a leading or trailing space is fine), so an n-gram is a slice."""
        arrays = texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]
        out = np.empty((len(texts), self.num_perm), np.uint32)
        row0 = 0
        for arr in arrays:
            d, off = string_buffers(arr)
            view = memoryview(d)
            start, end, per_row = _ngram_spans(d, off, self.ngram)
            first = np.concatenate([[0], np.cumsum(per_row)])
            lo = 0
            while lo < len(arr):
                # rows [lo, hi) with about ``chunk`` n-grams (at least one row)
                hi = max(lo + 1, int(np.searchsorted(first, first[lo] + chunk, "right")) - 1)
                a, b = int(first[lo]), int(first[hi])
                spans = map(slice, start[a:b].tolist(), end[a:b].tolist())
                digests = b"".join(map(_DIGEST, map(hashlib.sha1, map(view.__getitem__, spans))))
                h = self._fmix32(np.frombuffer(digests, "<u4").reshape(-1, 5)[:, 0].astype(np.uint32))
                phv = np.multiply.outer(self.a, h)  # [num_perm, n-grams]: each row's n-grams contiguous
                phv += self.b[:, None]
                out[row0 + lo : row0 + hi] = np.minimum.reduceat(phv, first[lo:hi] - a, axis=1).T
                lo = hi
            row0 += len(arr)
        return out


class LSHIndex:
    """Banded LSH with datasketch ``MinHashLSH``'s band count and width for the threshold: a
    signature that shares a band with an indexed one is a near duplicate (what
    ``MinHashLSH.query`` returning any key means)."""

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.b, self.r = lsh.b, lsh.r
        self.tables: list[set[bytes]] = [set() for _ in range(self.b)]

    def band_keys(self, sigs: np.ndarray) -> list[list[bytes]]:
        out = []
        for k in range(self.b):
            band = np.ascontiguousarray(sigs[:, k * self.r : (k + 1) * self.r])
            out.append(band.view(np.dtype((np.void, band.shape[1] * band.itemsize))).ravel().tolist())
        return out

    def seen_or_add(self, keys: Sequence[bytes]) -> bool:
        if any(key in table for key, table in zip(keys, self.tables)):
            return True
        for key, table in zip(keys, self.tables):
            table.add(key)
        return False


def near_duplicates(texts: pa.Array | pa.ChunkedArray, spec: NearDupSpec) -> np.ndarray:
    """Per normalised text (``normalize_texts``), in order: True if it is a near duplicate of an
    earlier text that was kept."""
    if not len(texts):
        return np.zeros(0, bool)
    sigs = MinHasher(spec.num_perm, spec.seed, spec.ngram).signatures(texts)
    index = LSHIndex(spec.threshold, spec.num_perm)
    keys = index.band_keys(sigs)
    return np.array([index.seen_or_add(row) for row in zip(*keys)], bool)


# -- choosing k traces per prompt ----------------------------------------------


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def pick_diverse(keys: Sequence, sets: Sequence[set], k: int) -> list[int]:
    """Greedy max-min: the first by ``keys`` (e.g. (length, sample_index)), then repeatedly the
    candidate least similar (largest Jaccard to any picked one) to those picked; ties go by
    ``keys``. Positions, in pick order."""
    left = sorted(range(len(keys)), key=lambda i: keys[i])
    picked = [left.pop(0)]
    worst = {i: 0.0 for i in left}  # largest similarity to a picked candidate
    while left and len(picked) < k:
        for i in left:
            worst[i] = max(worst[i], jaccard(sets[i], sets[picked[-1]]))
        best = min(left, key=lambda i: (worst[i], keys[i]))
        left.remove(best)
        picked.append(best)
    return picked


class Dedupe(Stage):
    kind: ClassVar[str] = "dedupe"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"sft": "dataset", "dropped": "dataset"}
    output_columns: ClassVar[dict] = {"sft": SFT_SCHEMA, "dropped": DROPPED_SCHEMA}

    def needs(self) -> dict[str, dict[str, str]]:
        p: Params = self.params
        cols = {"prompt_id": "string", "prompt": "string", p.completion_field: "string"}
        if p.require_verdict:
            cols["verdict"] = "string"
        return {"samples": cols}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        table = ctx.read_input("samples")
        needed = {"prompt_id", "prompt", p.completion_field} | ({"verdict"} if p.require_verdict else set())
        missing = needed - set(table.column_names)
        if missing:
            raise StageError(f"input 'samples' lacks column(s) {sorted(missing)} (has {table.column_names})")
        n = table.num_rows
        pids = table.column("prompt_id").to_pylist()
        given = table.column("sample_index").to_pylist() if "sample_index" in table.column_names else [None] * n
        idx = [i if s is None else s for i, s in enumerate(given)]
        reasons: dict[int, str] = {}  # row -> why it is dropped before the cap

        alive = np.ones(n, bool)
        if p.require_verdict:
            ok = pc.fill_null(pc.equal(table.column("verdict"), p.require_verdict), False).to_numpy(zero_copy_only=False)
            bad = np.flatnonzero(~ok)
            why = table.column("reason").take(bad).to_pylist() if "reason" in table.column_names else [None] * len(bad)
            for i, v, r in zip(bad.tolist(), table.column("verdict").take(bad).to_pylist(), why):
                reasons[i] = f"verdict:{r or v}"
            alive &= ok
        completions = table.column(p.completion_field)
        has_text = pc.fill_null(pc.greater(pc.binary_length(completions.cast(pa.string())), 0), False)
        for i in np.flatnonzero(alive & ~has_text.to_numpy(zero_copy_only=False)).tolist():
            reasons[i] = "empty_completion"
        alive &= has_text.to_numpy(zero_copy_only=False)

        rows = np.flatnonzero(alive)
        take = pa.array(rows)
        first = first_occurrences(*text_keys(table.column("prompt").take(take), completions.take(take)))
        for i in rows[~first].tolist():
            reasons[i] = "duplicate"
        rows = rows[first]
        norm_c = None
        if p.near_dup.enabled and len(rows):
            take = pa.array(rows)
            norm_p, norm_c = normalize_texts(table.column("prompt").take(take)), normalize_texts(completions.take(take))
            joined = pc.binary_join_element_wise(norm_p, norm_c, pa.scalar(" ", norm_c.type))
            near = near_duplicates(joined, p.near_dup)
            for i in rows[near].tolist():
                reasons[i] = "near_duplicate"
            rows, norm_c = rows[~near], norm_c.filter(pa.array(~near))

        take = pa.array(rows)
        raw = {c: table.column(c).take(take).to_pylist() for c in ("prompt", "source") if c in table.column_names}
        raw_c = completions.take(take).cast(pa.string()).to_pylist()
        if p.prefer == "diverse" and norm_c is None:
            norm_c = normalize_texts(completions.take(take))
        norm_cs = norm_c.to_pylist() if p.prefer == "diverse" else None
        groups: dict[str, list[int]] = {}  # prompt_id -> positions in ``rows``
        for j, i in enumerate(rows.tolist()):
            groups.setdefault(pids[i], []).append(j)

        dropped = [{"prompt_id": pids[i], "sample_index": idx[i], "reason": reasons[i]} for i in sorted(reasons)]
        out = []
        for pid, group in groups.items():
            k = p.max_per_prompt if p.max_per_prompt is not None else len(group)
            shortest = [(len(raw_c[j]), idx[rows[j]], j) for j in group]
            if p.prefer == "first":
                order = group
            elif p.prefer == "diverse" and len(group) > k:
                sets = [shingles(norm_cs[j], p.near_dup.ngram) for j in group]
                picked = pick_diverse(shortest, sets, k)
                order = [group[q] for q in picked] + [group[q] for q in sorted(set(range(len(group))) - set(picked))]
            else:  # shortest (diverse too when nothing is dropped)
                order = [j for *_, j in sorted(shortest)]
            for j in order[k:]:
                dropped.append({"prompt_id": pid, "sample_index": idx[rows[j]], "reason": "over_max_per_prompt"})
            for j in order[:k]:
                i = int(rows[j])
                messages = ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [
                    {"role": "user", "content": raw["prompt"][j]},
                    {"role": "assistant", "content": raw_c[j]},
                ]
                out.append({"prompt_id": pid, "source": raw["source"][j] if "source" in raw else None,
                            "sample_index": idx[i], "messages": messages})
        ctx.drop_counts("removed", [d["reason"] for d in dropped])
        stats = {"input_rows": n}
        ctx.write_dataset("sft", [pa.Table.from_pylist(out, schema=SFT_SCHEMA)], stats=stats)
        ctx.write_dataset("dropped", [pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA)], stats=stats)
        ctx.metrics.update({"input_rows": n, "kept": len(out), "prompts_kept": len(groups)})
