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

from pipeline.core.ids import hashes64
from pipeline.core.stage import NOT_OUTPUT, Stage, StageContext, StageError
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
    partitions: int | None = Field(None, ge=1, json_schema_extra=NOT_OUTPUT,
                                   description="hash partitions of the global steps (default: one per 250k rows)")


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
    Params = Params
    requires: ClassVar[tuple] = ("datasketch", "numba")
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
        """Streams in four steps, each on the cluster's workers; the driver holds references,
        shard lists and counts only (see the module docstring of ``stages.dedupe``'s plan)."""
        import ray

        from pipeline.core.streaming import ordered, parallelism

        p: Params = self.params
        have = ctx.input_schema("samples").names
        needed = {"prompt_id", "prompt", p.completion_field} | ({"verdict"} if p.require_verdict else set())
        missing = needed - set(have)
        if missing:
            raise StageError(f"input 'samples' lacks column(s) {sorted(missing)} (has {have})")
        n = ctx.input_rows("samples")
        pieces = ctx.input_pieces("samples")
        parts = p.partitions or max(1, min(16, -(-n // 250_000)))  # hash partitions of the global steps
        storage = ctx.storage
        cfg = p.model_dump()
        # 1. scan: each piece's verdict/empty filter, 128-bit keys, band hashes and cap facts,
        #    hash-partitioned by key (exact) and by prompt (cap)
        scan = _spread(_scan_piece, num_returns=1 + 2 * parts)
        scanned = [scan.remote(storage, pc, cfg, parts, have) for pc in pieces]
        bands = [s[0] for s in scanned]
        # 2. exact duplicates: the first row per key, per key partition
        exact = _spread(_exact_partition)
        dups = [exact.remote(*[s[1 + q] for s in scanned]) for q in range(parts)]
        # 3. near duplicates (a greedy pass in row order over band hashes), then the cap per prompt partition
        near = _spread(_near_pass).remote(cfg, dups, *bands) if p.near_dup.enabled else None
        cap = _spread(_cap_partition)
        caps = [cap.remote(cfg, dups, near, *[s[1 + parts + q] for s in scanned]) for q in range(parts)]
        # 4. write: each piece's kept rows as chat rows and its dropped rows, with their reasons
        specs = {"sft": ctx.output_spec("sft", SFT_SCHEMA), "dropped": ctx.output_spec("dropped", DROPPED_SCHEMA)}
        write = _spread(_write_piece)
        shards: dict[str, list] = {"sft": [], "dropped": []}
        reasons: dict[str, int] = {}
        nodes: dict[str, int] = {}
        kept = 0
        for _, res in ordered(pieces, lambda pc: write.remote(specs, pc, cfg, dups, near, caps, have), parallelism()):
            for out in shards:
                shards[out].extend(res[out])
            for r, k in res["reasons"].items():
                reasons[r] = reasons.get(r, 0) + k
            kept += res["kept"]
            nodes[res["node"]] = nodes.get(res["node"], 0) + res["rows"]
        count = ray.remote(num_cpus=0.1)(_groups)
        groups = sum(ray.get([count.remote(c) for c in caps]))
        ctx.drop_counts("removed", reasons)
        stats = {"input_rows": n}
        ctx.commit_shards("sft", shards["sft"], SFT_SCHEMA, stats=stats)
        ctx.commit_shards("dropped", shards["dropped"], DROPPED_SCHEMA, stats=stats)
        ctx.metrics.update({"input_rows": n, "kept": kept, "prompts_kept": groups, "pieces": len(pieces),
                            "partitions": parts, "rows_per_node": nodes})


# -- the streaming steps (Ray tasks) ----------------------------------------------------------------
# Rows are named by their dataset row number. Between steps only compact facts travel (row numbers,
# keys, hashes, lengths, prompt ids), through Ray's object store, never through the driver.

def _spread(fn, **options):
    """``fn`` as a Ray task of one CPU, spread over the nodes and retried up to 3 times."""
    import ray

    return ray.remote(num_cpus=1, max_retries=3, scheduling_strategy="SPREAD", **options)(fn)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def band_hashes(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """uint64 [rows, b]: one 64-bit hash per LSH band of each signature (equal bands, equal hash)."""
    out = np.zeros((len(sigs), b), np.uint64)
    with np.errstate(over="ignore"):
        for k in range(b):
            h = np.full(len(sigs), np.uint64(k + 1))
            for j in range(k * r, (k + 1) * r):
                h = _mix64(h ^ sigs[:, j].astype(np.uint64))
            out[:, k] = h
    return out


def _verdict_filter(table: pa.Table, p: Params, why: list) -> np.ndarray:
    """Per row: whether its verdict is ``require_verdict`` (all rows without it); sets ``why`` of the others."""
    if not p.require_verdict:
        return np.ones(table.num_rows, bool)
    verdict = table.column("verdict")
    ok = pc.fill_null(pc.equal(verdict, p.require_verdict), False).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(~ok)
    r = table.column("reason").take(bad).to_pylist() if "reason" in table.column_names else [None] * len(bad)
    for i, v, rr in zip(bad.tolist(), verdict.take(bad).to_pylist(), r):
        why[i] = f"verdict:{rr or v}"
    return ok


def _pre_reasons(table: pa.Table, p: Params) -> tuple[np.ndarray, list]:
    """Per row: alive (passes the verdict filter and has a completion), and the reason of each
    row that does not (None where alive)."""
    why: list = [None] * table.num_rows
    alive = _verdict_filter(table, p, why)
    comp = table.column(p.completion_field)
    has_text = pc.fill_null(pc.greater(pc.binary_length(comp.cast(pa.string())), 0), False)
    has = has_text.to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(alive & ~has).tolist():
        why[i] = "empty_completion"
    return alive & has, why


def _read_cols(p: Params, schema_names: list[str], extra: tuple = ()) -> list[str]:
    want = ["prompt_id", "prompt", p.completion_field, "sample_index", "verdict", "reason", *extra]
    return [c for c in dict.fromkeys(want) if c in schema_names]


def _scan_piece(storage, piece, cfg: dict, parts: int, names: list[str]):
    from pipeline.core.streaming import read_piece

    p = Params.model_validate(cfg)
    table = read_piece(storage, piece, _read_cols(p, names))
    alive, _ = _pre_reasons(table, p)
    rows = np.flatnonzero(alive)
    take = pa.array(rows)
    prompts, comps = table.column("prompt").take(take), table.column(p.completion_field).take(take)
    k1, k2 = text_keys(prompts, comps)
    glob = rows.astype(np.int64) + piece.offset
    bands = None
    if p.near_dup.enabled and len(rows):
        joined = pc.binary_join_element_wise(normalize_texts(prompts), normalize_texts(comps),
                                             pa.scalar(" ", pa.large_string()))
        index = LSHIndex(p.near_dup.threshold, p.near_dup.num_perm)
        sigs = MinHasher(p.near_dup.num_perm, p.near_dup.seed, p.near_dup.ngram).signatures(joined)
        bands = band_hashes(sigs, index.b, index.r)
    given = (table.column("sample_index").take(take).to_pylist() if "sample_index" in table.column_names
             else [None] * len(rows))
    idx = np.array([g if s is None else s for g, s in zip(glob.tolist(), given)], np.int64)
    pid_arr = table.column("prompt_id").take(take)
    pids = pid_arr.to_pylist()
    ph = hashes64(pids)
    facts = pa.table({"row": glob, "prompt_id": pid_arr.cast(pa.string()), "idx": idx,
                      "clen": pc.utf8_length(comps.cast(pa.string())).cast(pa.int64())})
    if p.prefer == "diverse":
        facts = facts.append_column("norm", normalize_texts(comps))
    out: list = [(glob, bands)]
    kpart = (k1 % np.uint64(parts)).astype(np.int64)
    for q in range(parts):
        m = kpart == q
        out.append((glob[m], k1[m], k2[m]))
    ppart = (ph % np.uint64(parts)).astype(np.int64)
    for q in range(parts):
        out.append(facts.filter(pa.array(ppart == q)))
    return tuple(out)


def _exact_partition(*pieces) -> np.ndarray:
    """Rows (sorted) whose key appeared at an earlier row: pieces come in row order."""
    rows = np.concatenate([x[0] for x in pieces]) if pieces else np.zeros(0, np.int64)
    if not len(rows):
        return rows
    first = first_occurrences(np.concatenate([x[1] for x in pieces]), np.concatenate([x[2] for x in pieces]))
    return np.sort(rows[~first])


def _near_pass(cfg: dict, dups: list, *pieces) -> np.ndarray:
    """Rows (sorted) that share an LSH band with an earlier kept row, in row order."""
    import ray

    dup = np.concatenate([np.asarray(d) for d in ray.get(dups)]) if dups else np.zeros(0, np.int64)
    tables: list[set] | None = None
    out = []
    for rows, bands in pieces:
        if bands is None or not len(rows):
            continue
        live = ~np.isin(rows, dup)
        if tables is None:
            tables = [set() for _ in range(bands.shape[1])]
        for row, keys in zip(rows[live].tolist(), bands[live].tolist()):
            if any(k in t for k, t in zip(keys, tables)):
                out.append(row)
            else:
                for k, t in zip(keys, tables):
                    t.add(k)
    return np.array(sorted(out), np.int64)


def _cap_partition(cfg: dict, dups: list, near, *facts) -> dict:
    """The per-prompt cap for the prompts of one partition: each surviving row's rank in its
    prompt's order, and which rows fall over ``max_per_prompt``."""
    import ray

    p = Params.model_validate(cfg)
    gone = [np.asarray(d) for d in ray.get(dups)] + ([np.asarray(near)] if near is not None else [])
    removed = np.concatenate(gone) if gone else np.zeros(0, np.int64)
    table = pa.concat_tables(facts) if facts else None
    if table is None or not table.num_rows:
        return {"rows": np.zeros(0, np.int64), "rank": np.zeros(0, np.int64), "over": np.zeros(0, bool), "groups": 0}
    rows = table.column("row").to_numpy()
    live = ~np.isin(rows, removed)
    table = table.filter(pa.array(live))
    rows = rows[live]
    pids = table.column("prompt_id").to_pylist()
    idx, clen = table.column("idx").to_numpy(), table.column("clen").to_numpy()
    norms = table.column("norm").to_pylist() if "norm" in table.column_names else None
    groups: dict[str, list[int]] = {}
    for j, pid in enumerate(pids):
        groups.setdefault(pid, []).append(j)
    rank = np.zeros(len(rows), np.int64)
    over = np.zeros(len(rows), bool)
    for group in groups.values():
        k = p.max_per_prompt if p.max_per_prompt is not None else len(group)
        keys = [(int(clen[j]), int(idx[j]), int(rows[j])) for j in group]
        for r, j in enumerate(_cap_order(p, group, keys, norms, k)):
            rank[j], over[j] = r, r >= k
    s = np.argsort(rows, kind="stable")
    return {"rows": rows[s], "rank": rank[s], "over": over[s], "groups": len(groups)}


def _cap_order(p: Params, group: list[int], keys: list[tuple], norms: list | None, k: int) -> list[int]:
    """One prompt's surviving rows in the order ``prefer`` ranks them (the cap keeps the first k);
    ``keys``: (completion length, sample index, row) of each."""
    if p.prefer == "first":
        return group
    if p.prefer == "diverse" and len(group) > k:
        sets = [shingles(norms[j], p.near_dup.ngram) for j in group]
        picked = pick_diverse(keys, sets, k)
        return [group[q] for q in picked] + [group[q] for q in sorted(set(range(len(group))) - set(picked))]
    return [group[q] for q in sorted(range(len(group)), key=lambda q: keys[q])]


def _groups(cap: dict) -> int:
    return int(cap["groups"])


def _write_piece(specs: dict, piece, cfg: dict, dups: list, near, caps: list, names: list[str]) -> dict:
    """One piece's chat rows (kept) and dropped rows, in the order the in-memory form gives:
    prompts by first surviving row, each prompt's rows by rank; drops before the cap by row."""
    from pipeline.core.streaming import node_id, read_piece

    p = Params.model_validate(cfg)
    table = read_piece(specs["sft"].storage, piece, _read_cols(p, names, ("source",)))
    _, why = _pre_reasons(table, p)
    _mark_duplicates(why, piece.offset, table.num_rows, dups, near)
    rank, over = _cap_marks(piece.offset, table.num_rows, caps)
    out, dropped = _format_piece(table, p, piece.offset, why, rank, over)
    sft, drop_w = specs["sft"].writer(piece), specs["dropped"].writer(piece)
    if out:
        sft.write(pa.Table.from_pylist(out, schema=SFT_SCHEMA))
    if dropped:
        drop_w.write(pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA))
    reasons: dict[str, int] = {}
    for d in dropped:
        reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
    return {"sft": sft.finish(), "dropped": drop_w.finish(), "reasons": reasons, "kept": len(out),
            "rows": table.num_rows, "node": node_id()}


def _within(rows: np.ndarray, lo: int, n: int) -> np.ndarray:
    """The dataset row numbers among ``rows`` that fall in the piece of ``n`` rows from ``lo``, as positions in it."""
    rows = np.asarray(rows)
    return rows[(rows >= lo) & (rows < lo + n)] - lo


def _mark_duplicates(why: list, lo: int, n: int, dups: list, near) -> None:
    """Sets the reason of the piece's exact duplicates (``dups``) and near duplicates (``near``)."""
    import ray

    exact = np.concatenate([np.asarray(d) for d in ray.get(dups)]) if dups else np.zeros(0, np.int64)
    for j in _within(exact, lo, n):
        why[j] = "duplicate"
    if near is not None:
        for j in _within(near, lo, n):
            why[j] = "near_duplicate"


def _cap_marks(lo: int, n: int, caps: list) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the piece: its rank in its prompt's order (-1 where unranked), and whether it falls over the cap."""
    import ray

    rank = np.full(n, -1, np.int64)
    over = np.zeros(n, bool)
    for c in ray.get(caps):
        m = (c["rows"] >= lo) & (c["rows"] < lo + n)
        rank[c["rows"][m] - lo], over[c["rows"][m] - lo] = c["rank"][m], c["over"][m]
    return rank, over


def _chat_messages(system_prompt: str | None, prompt: str, completion: str) -> list[dict]:
    """A kept trace as chat turns: the system prompt when set, the prompt as user, the completion as assistant."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _format_piece(table: pa.Table, p: Params, lo: int, why: list, rank: np.ndarray,
                  over: np.ndarray) -> tuple[list[dict], list[dict]]:
    """The piece's chat rows and dropped rows: drops with a reason in row order, then per prompt (by
    first surviving row) the rows over the cap, while its rows within the cap become chat rows by rank."""
    pids = table.column("prompt_id").to_pylist()
    given = table.column("sample_index").to_pylist() if "sample_index" in table.column_names else [None] * len(pids)
    idx = [lo + j if s is None else s for j, s in enumerate(given)]
    prompts = table.column("prompt").to_pylist()
    comps = table.column(p.completion_field).cast(pa.string()).to_pylist()
    sources = table.column("source").to_pylist() if "source" in table.column_names else [None] * len(pids)
    dropped = [{"prompt_id": pids[j], "sample_index": idx[j], "reason": why[j]}
               for j in range(len(pids)) if why[j] is not None]
    groups: dict[str, list[int]] = {}
    for j in range(len(pids)):
        if why[j] is None:
            groups.setdefault(pids[j], []).append(j)
    out = []
    for pid, group in groups.items():
        order = sorted(group, key=lambda j: rank[j])
        for j in order:
            if over[j]:
                dropped.append({"prompt_id": pid, "sample_index": idx[j], "reason": "over_max_per_prompt"})
        for j in order:
            if not over[j]:
                out.append({"prompt_id": pid, "source": sources[j], "sample_index": idx[j],
                            "messages": _chat_messages(p.system_prompt, prompts[j], comps[j])})
    return out, dropped
