"""preference_pairs: chosen/rejected pairs from verified samples, for DPO.

Input ``samples``: verified samples (``verify.verified`` or the like: ``prompt_id``, ``prompt``,
``completion``, ``verdict``; ``sample_index``, ``completion_tokens``, ``reason`` and ``source``
are used when present). Output ``pairs``, in TRL's conversational preference form: ``prompt``
(the user turn, after an optional system turn), ``chosen`` and ``rejected`` (one assistant turn
each), with ``chosen_id`` / ``rejected_id`` (``prompt_id/sample_index``), both lengths, the
rejected sample's verification reason and the ``policy`` that made the pair.

Policies, per prompt; a sample is in at most one pair, and at most ``max_pairs_per_prompt``
pairs are made:
- ``correct_vs_incorrect`` (SYNTHETIC-1's pairs): chosen are the correct samples, shortest
  first; rejected are the rejected samples, wrong answers before format failures (a
  well-formed wrong answer is the sharper contrast), each in sample order. The i-th chosen
  pairs with the i-th rejected.
- ``short_vs_long`` (Sky-T1-Flash, to cut reasoning length): correct samples only; the
  shortest against the longest, then the next shortest against the next longest, while the
  chosen is strictly shorter.

Length is ``completion_tokens`` when the input has it (``length: auto``), else characters.

A sample whose verdict is ``error`` (a checker timeout or crash, an engine error) is never used:
that is an infrastructure fault, not a judgement of the sample. Every prompt is either paired or
counted as removed with one reason: ``only_errors`` (every sample errored), ``single_sample``
(one usable sample), ``no_correct``, ``no_incorrect`` (correct_vs_incorrect), ``single_correct``,
``equal_lengths`` (short_vs_long).

Streaming: a first pass reads only the compact columns (ids, verdicts, lengths) and decides the
pairs as row numbers; a second pass reads the texts and writes each pair once both of its rows
have been read. The driver holds the facts (tens of bytes a row) and the texts of pair halves
waiting for their other half: for input grouped by prompt, as generate and verify write it, one
prompt's worth.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.stage import Stage, StageContext, StageError

MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIRS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("source", pa.string()), ("prompt", MESSAGES_TYPE), ("chosen", MESSAGES_TYPE),
    ("rejected", MESSAGES_TYPE), ("chosen_id", pa.string()), ("rejected_id", pa.string()),
    ("chosen_length", pa.int64()), ("rejected_length", pa.int64()), ("length_unit", pa.string()),
    ("rejected_reason", pa.string()), ("policy", pa.string()),
])


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal["correct_vs_incorrect", "short_vs_long"] = "correct_vs_incorrect"
    max_pairs_per_prompt: int = Field(1, ge=1)
    length: Literal["auto", "tokens", "chars"] = Field("auto", description="auto: completion_tokens when present")
    system_prompt: str | None = Field(None, description="a system turn put before each prompt")


def pair_rows(policy: str, verdicts: list[str], lengths: list[int], reasons: list[str | None], order: list[int],
              max_pairs: int) -> tuple[list[tuple[int, int]], str | None]:
    """One prompt's pairs as positions into its samples ``(chosen, rejected)``, or the reason it
    has none. ``order``: each sample's rank in the prompt (its sample index)."""
    usable = [i for i, v in enumerate(verdicts) if v != "error"]
    if not usable:
        return [], "only_errors"
    if len(usable) == 1:
        return [], "single_sample"
    correct = sorted((i for i in usable if verdicts[i] == "correct"), key=lambda i: (lengths[i], order[i]))
    if not correct:
        return [], "no_correct"
    if policy == "correct_vs_incorrect":
        wrong = sorted((i for i in usable if verdicts[i] == "rejected"),
                       key=lambda i: (reasons[i] != "wrong_answer", order[i]))
        if not wrong:
            return [], "no_incorrect"
        return list(zip(correct, wrong))[:max_pairs], None
    if len(correct) == 1:
        return [], "single_correct"
    pairs = []
    for k in range(min(max_pairs, len(correct) // 2)):
        short, long = correct[k], correct[-1 - k]
        if lengths[short] >= lengths[long]:
            break
        pairs.append((short, long))
    return pairs, (None if pairs else "equal_lengths")


class PreferencePairs(Stage):
    kind: ClassVar[str] = "preference_pairs"
    Params = Params
    inputs: ClassVar[dict] = {"samples": "dataset"}
    outputs: ClassVar[dict] = {"pairs": "dataset"}
    input_columns: ClassVar[dict] = {"samples": {"prompt_id": "string", "prompt": "string", "completion": "string",
                                                 "verdict": "string"}}
    output_columns: ClassVar[dict] = {"pairs": PAIRS_SCHEMA}

    def run(self, ctx: StageContext) -> None:
        p: Params = self.params
        have = set(ctx.input_schema("samples").names)
        tokens = p.length == "tokens" or (p.length == "auto" and "completion_tokens" in have)
        if tokens and "completion_tokens" not in have:
            raise StageError("length: tokens needs a completion_tokens column in input 'samples'")
        facts = self._facts(ctx, have, tokens)
        chosen_of, rejected_of, per_prompt, reasons, errored = self._decide(p, facts)
        for reason, n in reasons.items():
            ctx.drop("removed", reason, n)
        writer = ctx.dataset_writer("pairs")
        try:
            made = self._write(ctx, p, have, facts, chosen_of, rejected_of, writer, "tokens" if tokens else "chars")
        except BaseException:
            writer.close()
            raise
        total = ctx.input_rows("samples")
        ctx.commit_dataset("pairs", writer, PAIRS_SCHEMA, stats={"input_rows": total})
        ctx.metrics.update({"input_rows": total, "prompts": per_prompt["prompts"], "prompts_paired": per_prompt["paired"],
                            "pairs": made, "errored_samples_unused": errored, "policy": p.policy,
                            "length_unit": "tokens" if tokens else "chars"})

    @staticmethod
    def _facts(ctx: StageContext, have: set, tokens: bool) -> pa.Table:
        """Pass 1: per row its number, prompt, verdict, reason, rank and length (no texts kept)."""
        cols = ["prompt_id", "verdict"] + [c for c in ("sample_index", "reason") if c in have]
        cols += ["completion_tokens"] if tokens else ["completion"]
        parts, offset = [], 0
        for t in ctx.iter_input("samples", columns=cols):
            n = t.num_rows
            rows = pa.array(np.arange(offset, offset + n, dtype=np.int64))
            length = (pc.fill_null(t.column("completion_tokens"), 0) if tokens
                      else pc.fill_null(pc.utf8_length(t.column("completion")), 0))
            parts.append(pa.table({
                "row": rows, "prompt_id": t.column("prompt_id").cast(pa.string()),
                "verdict": pc.fill_null(t.column("verdict").cast(pa.string()), "error"),
                "reason": t.column("reason").cast(pa.string()) if "reason" in have else pa.nulls(n, pa.string()),
                "rank": t.column("sample_index").cast(pa.int64()) if "sample_index" in have else rows,
                "length": length.cast(pa.int64())}))
            offset += n
        schema = pa.schema([("row", pa.int64()), ("prompt_id", pa.string()), ("verdict", pa.string()),
                            ("reason", pa.string()), ("rank", pa.int64()), ("length", pa.int64())])
        return pa.concat_tables(parts) if parts else schema.empty_table()

    @staticmethod
    def _decide(p: Params, facts: pa.Table):
        """The pairs as row numbers (chosen row -> pair number, rejected row -> pair number), and
        per-prompt outcomes, in the order of each prompt's first row."""
        chosen_of: dict[int, int] = {}
        rejected_of: dict[int, int] = {}
        reasons: dict[str, int] = {}
        paired = prompts = 0
        errored = int(pc.sum(pc.equal(facts.column("verdict"), "error")).as_py() or 0) if facts.num_rows else 0
        if facts.num_rows:
            g = facts.group_by("prompt_id", use_threads=False).aggregate(
                [("row", "list"), ("verdict", "list"), ("reason", "list"), ("rank", "list"), ("length", "list"),
                 ("row", "min")])
            g = g.sort_by("row_min")
            for rows, verdicts, why, ranks, lengths in zip(*(g.column(c).to_pylist() for c in (
                    "row_list", "verdict_list", "reason_list", "rank_list", "length_list"))):
                prompts += 1
                pairs, reason = pair_rows(p.policy, verdicts, lengths, why, ranks, p.max_pairs_per_prompt)
                if reason is not None:
                    reasons[reason] = reasons.get(reason, 0) + 1
                    continue
                paired += 1
                for c, r in pairs:
                    k = len(chosen_of)
                    chosen_of[rows[c]], rejected_of[rows[r]] = k, k
        return chosen_of, rejected_of, {"prompts": prompts, "paired": paired}, reasons, errored

    @staticmethod
    def _write(ctx, p: Params, have: set, facts: pa.Table, chosen_of: dict, rejected_of: dict, writer,
               unit: str) -> int:
        """Pass 2: the texts of the chosen and rejected rows; a pair is written once both are read."""
        if not chosen_of:
            return 0
        picked = facts.filter(pc.is_in(facts.column("row"), value_set=pa.array([*chosen_of, *rejected_of], pa.int64())))
        rows_ = picked.column("row").to_pylist()
        length = dict(zip(rows_, picked.column("length").to_pylist()))
        rank = dict(zip(rows_, picked.column("rank").to_pylist()))
        reason = dict(zip(rows_, picked.column("reason").to_pylist()))
        half: dict[int, dict] = {}  # pair number -> the half read so far
        out: list[dict] = []
        made = 0
        cols = ["prompt_id", "prompt", "completion"] + (["source"] if "source" in have else [])
        offset = 0
        for t in ctx.iter_input("samples", columns=cols):
            rows = np.arange(offset, offset + t.num_rows)
            offset += t.num_rows
            want = [i for i, r in enumerate(rows.tolist()) if r in chosen_of or r in rejected_of]
            if not want:
                continue
            sub = t.take(pa.array(want, pa.int64())).to_pylist()
            for i, row in zip(want, sub):
                r = int(rows[i])
                side, k = ("chosen", chosen_of[r]) if r in chosen_of else ("rejected", rejected_of[r])
                got = half.setdefault(k, {})
                got[side] = (r, row)
                if len(got) < 2:
                    continue
                del half[k]
                (cr, c), (rr, rj) = got["chosen"], got["rejected"]
                turns = ([{"role": "system", "content": p.system_prompt}] if p.system_prompt else []) + [
                    {"role": "user", "content": c["prompt"]}]
                out.append({"prompt_id": c["prompt_id"], "source": c.get("source"), "prompt": turns,
                            "chosen": [{"role": "assistant", "content": c["completion"]}],
                            "rejected": [{"role": "assistant", "content": rj["completion"]}],
                            "chosen_id": f"{c['prompt_id']}/{rank[cr]}", "rejected_id": f"{rj['prompt_id']}/{rank[rr]}",
                            "chosen_length": length[cr], "rejected_length": length[rr], "length_unit": unit,
                            "rejected_reason": reason[rr], "policy": p.policy})
                made += 1
            if len(out) >= 1024:
                writer.write(pa.Table.from_pylist(out, schema=PAIRS_SCHEMA))
                out = []
        if out:
            writer.write(pa.Table.from_pylist(out, schema=PAIRS_SCHEMA))
        return made
