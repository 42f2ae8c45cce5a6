"""compare: an experiment matrix's table. Every variant of an expanded evaluate stage, its
score as mean ± standard error across seeds, and its paired difference to a baseline variant.

Input ``runs`` is variadic: wired to an expanded stage (``runs: evaluate.samples``) it
receives every variant's evaluate ``samples`` as its own input, ``runs[data=...,seed=...]``
(see ``pipeline.core.config``). From each, the rows of ``role`` at the main evaluation
(``max_thinking_tokens`` null) are scored per prompt with ``stages.common.metrics``
(``metric``: pass@k or maj@k; samples with verdict ``error`` are left out as errored, not
counted wrong).

Variants are grouped by the axes in ``group_by`` (default: every axis but ``across``); a
group's seeds are its variants along ``across``. Per group:
- ``mean``: the mean over seeds of each seed's score (the mean of its per-prompt scores);
- ``se_seeds``: the standard error of that mean across seeds (ddof 1);
- ``se_prompts``: the clustered standard error over prompts of the per-prompt scores
  averaged over seeds (the prompt-sampling part of the uncertainty);
- against the ``baseline`` group: ``diff``, the mean over prompts of the per-prompt
  difference (each side averaged over its seeds), with its paired SE over prompts
  (``diff_se``) and the SE across seeds of the per-seed differences of seed scores
  (``diff_se_seeds``, seeds paired by value); ``significant`` when ``|diff|`` exceeds
  ``z`` times both.

With ``ratio_to`` (a role, e.g. ``teacher``), each variant's ``ratio_to`` rows are scored the
same way, and each seed's score of ``role`` is divided by that seed's score of ``ratio_to`` (how
much of its teacher a student recovers): per group ``ratio`` (the mean of the per-seed
ratios), ``ratio_se_seeds``, ``ratio_min`` and ``ratio_per_seed``, and ``ratio_to_per_seed``
(the other role's per-seed scores).

Output ``table``: one row per group. Metrics: the same numbers keyed by group label
(``data=verified``), plus ``per_seed`` scores and the settings.
"""
from __future__ import annotations

import json
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core.config import input_base, parse_variant, value_label, variant_label
from pipeline.core.stage import Stage, StageContext, StageError
from stages.common.checkers import answer_key
from stages.common.metrics import ReasoningMetrics, mean_se, paired_difference

TABLE_SCHEMA = pa.schema(
    [("variant", pa.string()), ("axes", pa.string()), ("metric", pa.string()), ("seeds", pa.int32()),
     ("prompts", pa.int32()), ("mean", pa.float64()), ("se_seeds", pa.float64()), ("se_prompts", pa.float64()),
     ("per_seed", pa.list_(pa.float64())), ("errored", pa.int64()), ("baseline", pa.string()),
     ("diff", pa.float64()), ("diff_se", pa.float64()), ("diff_se_seeds", pa.float64()),
     ("significant", pa.bool_()), ("ratio_to", pa.string()), ("ratio", pa.float64()),
     ("ratio_se_seeds", pa.float64()), ("ratio_min", pa.float64()), ("ratio_per_seed", pa.list_(pa.float64())),
     ("ratio_to_per_seed", pa.list_(pa.float64()))]
)

# the columns of a group's row repeated in the stage metrics under its label (those not null)
ROW_METRICS = ("mean", "se_seeds", "se_prompts", "seeds", "prompts", "errored", "diff", "diff_se", "diff_se_seeds",
               "significant", "ratio", "ratio_se_seeds", "ratio_min", "ratio_per_seed", "ratio_to_per_seed")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baseline: dict[str, Any] | None = Field(None, description="axis -> value of the variant the others are compared to")
    group_by: list[str] | None = Field(None, description="axes that make a variant (default: all but 'across')")
    across: str = Field("seed", description="the axis whose values are repeats (seeds)")
    role: str = "student"
    metric: str = Field("pass@1", pattern=r"^(pass|maj)@[1-9][0-9]*$")
    z: float = Field(2.0, gt=0, description="a difference is significant past this many standard errors")
    ratio_to: str | None = Field(None, description="another role (e.g. teacher): each seed's score of role divided "
                                                   "by its score of this one")


class Compare(Stage):
    kind: ClassVar[str] = "compare"
    version: ClassVar[str] = "2"  # 2: ratio_to
    Params = Params
    inputs: ClassVar[dict] = {"runs": "dataset"}
    variadic_inputs: ClassVar[frozenset] = frozenset({"runs"})
    input_columns: ClassVar[dict] = {"runs": {"role": "string", "prompt_id": "string", "sample_index": "int",
                                              "verdict": "string"}}
    outputs: ClassVar[dict] = {"table": "dataset"}
    output_columns: ClassVar[dict] = {"table": TABLE_SCHEMA}

    # -- grouping (checked when the config loads, from the wired input names) --------------------
    def _groups(self, keys: list[str]) -> tuple[list[str], dict[str, list[tuple[str, str]]], str | None]:
        """(group axes, {group label: [(seed label, input key)]}, baseline label); ValueError
        (field, message) when the variants do not fit the params."""
        p: Params = self.params
        variants = {k: parse_variant(k)[1] for k in keys}
        axes = sorted({a for v in variants.values() for a in v})
        if any(set(v) != set(axes) for v in variants.values()):
            raise ValueError("runs", "every wired variant must have the same matrix axes")
        group_by = p.group_by if p.group_by is not None else [a for a in axes if a != p.across]
        for a in group_by:
            if a not in axes:
                raise ValueError("group_by", f"{a!r} is not an axis of the wired variants (they have: "
                                             f"{', '.join(axes) or 'none'})")
        groups: dict[str, list[tuple[str, str]]] = {}
        for key, v in variants.items():
            label = variant_label({a: v[a] for a in group_by}) or "all"
            seed = v.get(p.across, "")
            if any(s == seed for s, _ in groups.get(label, [])):
                raise ValueError("group_by", f"variants {label} repeat {p.across}={seed}: group_by must name every "
                                             f"axis but {p.across!r}")
            groups.setdefault(label, []).append((seed, key))
        baseline = None
        if p.baseline is not None:
            want = {a: value_label(x) for a, x in p.baseline.items()}
            bad = [a for a in want if a not in group_by]
            if bad:
                raise ValueError("baseline", f"{bad[0]!r} is not a group_by axis ({', '.join(group_by) or 'none'})")
            hits = [g for g, members in groups.items()
                    if all(variants[members[0][1]][a] == x for a, x in want.items())]
            if len(hits) != 1:
                raise ValueError("baseline", f"{variant_label(want)} matches {len(hits)} variants, not one "
                                             f"(variants: {', '.join(groups)})")
            baseline = hits[0]
        return group_by, groups, baseline

    def check_variants(self, keys: list[str]) -> list[tuple[str, str]]:
        """Problems with the wired ``runs`` variants (their input names), as (field, message)."""
        try:
            self._groups([k for k in keys if input_base(k) == "runs"])
        except ValueError as e:
            return [e.args]
        return []

    # -- scoring -------------------------------------------------------------------------------
    def _score(self, ctx: StageContext, key: str) -> dict[str, tuple[dict[str, float], int]]:
        """Per scored role (``role``, and ``ratio_to`` when set): (per-prompt scores, errored
        samples), from one read of the input. Errored samples of ``ratio_to`` are counted under
        their own reason."""
        p: Params = self.params
        table = ctx.read_input(key, columns=[c for c in ("role", "prompt_id", "sample_index", "verdict", "extracted",
                                                         "max_thinking_tokens")
                                             if c in ctx.input_schema(key).names])
        main = pc.is_null(table.column("max_thinking_tokens")) if "max_thinking_tokens" in table.column_names else None
        out = {}
        for role in [p.role] + ([p.ratio_to] if p.ratio_to else []):
            mask = pc.equal(table.column("role"), role)
            rows = table.filter(pc.fill_null(mask if main is None else pc.and_(mask, main), False))
            if not rows.num_rows:
                raise StageError(f"input {key!r}: no rows of role {role!r} at the main evaluation (roles present: "
                                 f"{', '.join(sorted(set(table.column('role').to_pylist()))) or 'none'})")
            acc = ReasoningMetrics(ks=(1,))
            extracted = (rows.column("extracted").to_pylist() if "extracted" in rows.column_names
                         else [None] * rows.num_rows)
            for pid, idx, verdict, ans in zip(rows.column("prompt_id").to_pylist(),
                                              rows.column("sample_index").to_pylist(),
                                              rows.column("verdict").to_pylist(), extracted):
                acc.add(pid, idx, verdict == "correct", answer_key(ans), 0, False, errored=verdict == "error")
            errored = acc.summary()["errored"]
            if errored:
                ctx.drop("errored", "verdict_error" if role == p.role else f"{role}_verdict_error", errored)
            try:
                out[role] = (acc.per_prompt(p.metric), errored)
            except ValueError as e:
                raise StageError(f"input {key!r}: {e}") from e
        return out

    def run(self, ctx: StageContext) -> None:
        """Scores every wired variant, summarises each group over its seeds, and writes one row per group."""
        p: Params = self.params
        keys = [k for k in ctx.inputs if input_base(k) == "runs"]
        try:
            group_by, groups, baseline = self._groups(keys)
        except ValueError as e:
            raise StageError(f"params.{e.args[0]}: {e.args[1]}") from e
        by_role = {key: self._score(ctx, key) for key in keys}
        out = {label: self._summary(members, by_role) for label, members in groups.items()}
        rows = [self._row(label, g, out, baseline) for label, g in out.items()]
        metrics = {row["variant"]: {k: row[k] for k in ROW_METRICS if row[k] is not None} for row in rows}
        ctx.write_dataset("table", [pa.Table.from_pylist(rows, schema=TABLE_SCHEMA)])
        ctx.metrics.update({**metrics, "metric": p.metric, "role": p.role, "across": p.across, "group_by": group_by,
                            "baseline": baseline, "z": p.z,
                            "per_seed": {label: g["by_seed"] for label, g in out.items()}})
        for row in rows:
            ctx.log(self._log_line(row, baseline))

    # -- the table ------------------------------------------------------------------------------
    def _summary(self, members: list[tuple[str, str]], by_role: dict[str, dict]) -> dict:
        """One group's scores over its seeds (``members``: (seed label, input key)), with the
        per-prompt averages the paired difference needs and, with ``ratio_to``, the per-seed ratios."""
        p: Params = self.params
        members = sorted(members, key=lambda m: _sortable(m[0]))
        scored = [by_role[k][p.role] for _, k in members]
        per_prompt = [pp for pp, _ in scored]
        seed_means = [mean_se(list(pp.values()))[0] for pp in per_prompt]
        mean, se_seeds = mean_se(seed_means)
        avg = _average(per_prompt)
        g = {"seeds": [s for s, _ in members], "per_seed": seed_means, "mean": mean, "se_seeds": se_seeds,
             "se_prompts": mean_se(list(avg.values()))[1], "prompts": len(avg),
             "errored": sum(errored for _, errored in scored), "avg": avg,
             "by_seed": dict(zip([s for s, _ in members], seed_means))}
        if p.ratio_to:
            to = [mean_se(list(by_role[k][p.ratio_to][0].values()))[0] for _, k in members]
            # a seed whose ratio_to scores 0 has no ratio (null), and is left out of its mean
            ratios = [a / b if b else None for a, b in zip(seed_means, to)]
            g.update(ratio_per_seed=ratios, ratio_to_per_seed=to)
        return g

    def _row(self, label: str, g: dict, out: dict[str, dict], baseline: str | None) -> dict:
        """The table row of group ``label``: its summary, its ratio, and its difference to the baseline group."""
        p: Params = self.params
        row = {"variant": label, "axes": json.dumps(parse_variant(f"x[{label}]")[1] if label != "all" else {}),
               "metric": p.metric, "seeds": len(g["seeds"]), "prompts": g["prompts"], "mean": g["mean"],
               "se_seeds": g["se_seeds"], "se_prompts": g["se_prompts"], "per_seed": g["per_seed"],
               "errored": g["errored"], "baseline": baseline, "diff": None, "diff_se": None,
               "diff_se_seeds": None, "significant": None, "ratio_to": p.ratio_to, "ratio": None,
               "ratio_se_seeds": None, "ratio_min": None, "ratio_per_seed": g.get("ratio_per_seed"),
               "ratio_to_per_seed": g.get("ratio_to_per_seed")}
        defined = [r for r in g.get("ratio_per_seed") or [] if r is not None]
        if defined:
            row["ratio"], row["ratio_se_seeds"] = mean_se(defined)
            row["ratio_min"] = min(defined)
        if baseline is not None and label != baseline:
            b = out[baseline]
            d = paired_difference(g["avg"], b["avg"])
            shared = [s for s in g["by_seed"] if s in b["by_seed"]]
            se_seeds = mean_se([g["by_seed"][s] - b["by_seed"][s] for s in shared])[1]
            row.update(diff=d["diff"], diff_se=d["se"], diff_se_seeds=se_seeds,
                       significant=abs(d["diff"]) > p.z * max(d["se"], se_seeds))
        return row

    def _log_line(self, row: dict, baseline: str | None) -> str:
        """A table row as one line of the stage's log."""
        p: Params = self.params
        diff = "" if row["diff"] is None else (
            f"; {row['diff']:+.3f} vs {baseline} (paired SE {row['diff_se']:.3f}, seeds SE "
            f"{row['diff_se_seeds']:.3f}{', beyond ' + format(p.z, 'g') + ' SE' if row['significant'] else ''})")
        ratio = "" if row["ratio"] is None else (
            f"; ÷ {p.ratio_to}: {row['ratio']:.3f} ± {row['ratio_se_seeds']:.3f} (min {row['ratio_min']:.3f}; "
            f"per {p.across}: {', '.join('n/a' if r is None else format(r, '.3f') for r in row['ratio_per_seed'])}"
            f")")
        return (f"{row['variant']}: {p.metric} {row['mean']:.3f} ± {row['se_seeds']:.3f} over {row['seeds']} "
                f"{p.across}s{diff}{ratio}")

def _sortable(label: str):
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _average(per_prompt: list[dict[str, float]]) -> dict[str, float]:
    """Per prompt, the mean of its scores over the runs that scored it."""
    sums: dict[str, list[float]] = {}
    for pp in per_prompt:
        for pid, v in pp.items():
            sums.setdefault(pid, []).append(v)
    return {pid: sum(v) / len(v) for pid, v in sums.items()}
