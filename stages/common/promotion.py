"""The promotion gate (used by the evaluate stage): one ``best`` student per pipeline, replaced only by a clearly better one.

``best/<name>.json`` (see :mod:`pipeline.store.layout`) holds the promoted student: its model URI,
its score and its per-prompt scores on the held-out set. A candidate replaces it only if its
mean per-prompt difference from ``best`` (paired over the prompts both were scored on)
exceeds ``z`` (default 2) paired standard errors; the first candidate of a pipeline is
promoted. The pointer is written only by conditional writes (:func:`pipeline.store.conditional.swap`,
the same primitive as the run leases and manifest commits), so when two runs promote at once exactly one write
lands; the other re-reads the new ``best`` and decides again against it. Every decision is
also appended to ``best/<name>.history/``.

In a scheduled run (``DISTILL_FENCE``), the pointer carries the lease's fencing epoch, and a
run of an older epoch than the one that wrote ``best`` (a zombie) is refused: recorded as a
decision ``fenced``, not promoted.
"""
from __future__ import annotations

import json
import time

from pipeline.store import layout
from pipeline.store.conditional import conditional_store, swap
from pipeline.store.lease import current_fence, newer_fence
from pipeline.store.storage import Storage, now_iso
from stages.common.metrics import paired_difference


def decide(best: dict | None, candidate: dict, z: float = 2.0) -> dict:
    """Whether ``candidate`` beats ``best``; both carry ``per_prompt`` {prompt_id: score}."""
    if best is None:
        return {"promoted": True, "margin": None, "se": None, "threshold": None, "prompts": None,
                "reason": "first student of this pipeline"}
    paired = paired_difference(candidate["per_prompt"], best["per_prompt"])
    out = {"margin": paired["diff"], "se": paired["se"], "threshold": z * paired["se"], "prompts": paired["prompts"],
           "best_before": best.get("model")}
    if paired["prompts"] == 0:
        return {**out, "promoted": False, "reason": "no held-out prompt in common with the current best"}
    if 2 * paired["prompts"] < len(candidate["per_prompt"]):  # best was scored on another held-out set
        return {**out, "promoted": False,
                "reason": f"only {paired['prompts']} of the candidate's {len(candidate['per_prompt'])} held-out "
                          "prompts were scored for the current best (it was evaluated on another held-out set); "
                          "not compared: evaluate best on these prompts, or promote under a new name"}
    if paired["diff"] > z * paired["se"]:
        return {**out, "promoted": True,
                "reason": f"beats best by {paired['diff']:+.4f} > {z:g} x paired SE {paired['se']:.4f}"}
    return {**out, "promoted": False,
            "reason": f"margin {paired['diff']:+.4f} is not above {z:g} x paired SE {paired['se']:.4f}"}


def read_best(storage: Storage, name: str) -> dict | None:
    got = conditional_store(storage).read(layout.best_pointer(storage, name))
    return json.loads(got[0]) if got else None


def promote(storage: Storage, name: str, candidate: dict, z: float = 2.0, tries: int = 20) -> dict:
    """Decide and, if promoted, replace ``best`` conditionally; returns the decision (with the
    ``best`` it was judged against) and records it in the history."""
    path = layout.best_pointer(storage, name)
    fence = current_fence()
    if fence and candidate.get("run_id") not in (None, fence["run_id"]):
        fence = None  # the fence of another run
    judged: dict = {}

    def update(current: bytes | None) -> bytes | None:
        best = json.loads(current) if current is not None else None
        decision = decide(best, candidate, z)
        theirs = newer_fence(current, fence, lambda data: json.loads(data).get("fence"))
        if theirs:
            decision = {**decision, "promoted": False, "fenced": True,
                        "reason": f"fenced: run {fence['run_id']} (epoch {fence['epoch']}) is older than run "
                                  f"{theirs.get('run_id')} (epoch {theirs.get('epoch')}), which wrote best"}
        judged.update(best=best, decision=decision)
        if not decision["promoted"]:
            return None
        extra = {"fence": {k: fence[k] for k in ("lease", "epoch", "run_id")}} if fence else {}
        return json.dumps({**candidate, "promoted_at": now_iso(), "previous": best and best.get("model"), **extra},
                          indent=2).encode()

    swap(storage, path, update, tries)  # another run changing best in between: judged again against it
    decision, best = judged["decision"], judged["best"]
    decision["best"] = candidate["model"] if decision["promoted"] else best and best.get("model")
    key = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{candidate.get('run_id', 'run')}"
    storage.write_json(layout.promotion_event(storage, name, key),
                       {**decision, "candidate": candidate["model"], "score": candidate.get("score")})
    return decision

