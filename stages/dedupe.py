"""dedupe: keep verified traces, drop exact duplicates, cap traces per prompt, format chat rows.

Input ``samples``: rows with ``prompt_id``, ``prompt`` and a completion column
(``completion`` from generate/verify, or e.g. ``solution`` for gold data), and a
``verdict`` column when ``require_verdict`` is set.
Output ``sft``: ``prompt_id``, ``source``, ``sample_index``, ``messages``
(list of {role, content}), ready for the sft stage.
Output ``dropped``: every input row not kept, with its ``reason``
(``verdict:<reason>``, ``empty_completion``, ``duplicate``, ``near_duplicate``,
``over_max_per_prompt``).

Near duplicates (``near_dup.enabled``): MinHash over word n-grams of
prompt + completion, with an LSH index at the configured Jaccard threshold; a row
whose text is that close to an earlier kept row is dropped.
"""
from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from pipeline.ids import normalize_text, sha256_hex
from pipeline.stage import Stage, StageContext, StageError

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
    prefer: str = Field("shortest", pattern="^(shortest|first)$", description="which traces survive the cap")
    system_prompt: str | None = None


def dedupe_key(prompt: str, completion: str) -> str:
    return sha256_hex(normalize_text(prompt).lower() + "\x00" + normalize_text(completion).lower())


class NearDupIndex:
    """MinHash LSH over word shingles (datasketch)."""

    def __init__(self, spec: NearDupSpec):
        from datasketch import MinHashLSH

        self.spec = spec
        self.lsh = MinHashLSH(threshold=spec.threshold, num_perm=spec.num_perm)
        self.count = 0

    def _minhash(self, text: str):
        from datasketch import MinHash

        words = normalize_text(text).lower().split()
        n = self.spec.ngram
        shingles = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
        m = MinHash(num_perm=self.spec.num_perm, seed=self.spec.seed)
        m.update_batch([s.encode("utf-8", "surrogatepass") for s in shingles])
        return m

    def seen_or_add(self, text: str) -> bool:
        """True if a near duplicate was indexed before; otherwise index this text."""
        m = self._minhash(text)
        if self.lsh.query(m):
            return True
        self.lsh.insert(str(self.count), m)
        self.count += 1
        return False


class Dedupe(Stage):
    kind: ClassVar[str] = "dedupe"
    version: ClassVar[str] = "1"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"sft": "dataset", "dropped": "dataset"}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        table = ctx.read_input("samples")
        needed = {"prompt_id", "prompt", p.completion_field} | ({"verdict"} if p.require_verdict else set())
        missing = needed - set(table.column_names)
        if missing:
            raise StageError(f"input 'samples' lacks column(s) {sorted(missing)} (has {table.column_names})")
        rows = table.to_pylist()
        dropped: list[dict] = []
        kept_by_prompt: dict[str, list[dict]] = {}
        seen: set[str] = set()
        near = NearDupIndex(p.near_dup) if p.near_dup.enabled else None
        for i, r in enumerate(rows):
            idx = r.get("sample_index", i) if r.get("sample_index") is not None else i
            if p.require_verdict and r.get("verdict") != p.require_verdict:
                dropped.append({"prompt_id": r["prompt_id"], "sample_index": idx,
                                "reason": f"verdict:{r.get('reason') or r.get('verdict')}"})
                continue
            completion = r.get(p.completion_field)
            if not completion:
                dropped.append({"prompt_id": r["prompt_id"], "sample_index": idx, "reason": "empty_completion"})
                continue
            key = dedupe_key(r["prompt"], completion)
            if key in seen:
                dropped.append({"prompt_id": r["prompt_id"], "sample_index": idx, "reason": "duplicate"})
                continue
            seen.add(key)
            if near is not None and near.seen_or_add(r["prompt"] + "\n" + completion):
                dropped.append({"prompt_id": r["prompt_id"], "sample_index": idx, "reason": "near_duplicate"})
                continue
            kept_by_prompt.setdefault(r["prompt_id"], []).append({**r, "_idx": idx, "_completion": completion})

        out = []
        for pid, group in kept_by_prompt.items():
            if p.prefer == "shortest":
                group.sort(key=lambda r: (len(r["_completion"]), r["_idx"]))
            if p.max_per_prompt is not None:
                for r in group[p.max_per_prompt :]:
                    dropped.append({"prompt_id": pid, "sample_index": r["_idx"], "reason": "over_max_per_prompt"})
                group = group[: p.max_per_prompt]
            for r in group:
                messages = ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [
                    {"role": "user", "content": r["prompt"]},
                    {"role": "assistant", "content": r["_completion"]},
                ]
                out.append({"prompt_id": pid, "source": r.get("source"), "sample_index": r["_idx"], "messages": messages})
        ctx.write_dataset("sft", [pa.Table.from_pylist(out, schema=SFT_SCHEMA)])
        ctx.write_dataset("dropped", [pa.Table.from_pylist(dropped, schema=DROPPED_SCHEMA)])
        reasons: dict[str, int] = {}
        for d in dropped:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        ctx.metrics.update({"input_rows": len(rows), "kept": len(out), "prompts_kept": len(kept_by_prompt),
                            "dropped_reasons": reasons})
