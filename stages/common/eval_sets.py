"""Named evaluation sets that decontaminate checks training rows against.

Each name maps to a file under a data root (decontaminate's ``eval_data_root``: by
default ``../shared/data`` from the working directory, or e.g. ``s3://bucket/benchmarks``
on a cluster), the field holding the question, the field holding its id, and boilerplate to drop
from the front of each question. Adding a
benchmark is adding a line here.
"""
from __future__ import annotations

EVAL_SETS: dict[str, dict[str, str]] = {
    "gsm8k": {"path": "gsm8k/test.jsonl", "field": "question"},
    # every MATH-500 problem opens with this instruction: indexed, it would match any
    # training prompt that opens with it too
    "math500": {"path": "math500/test.jsonl", "field": "problem", "id_field": "unique_id",
                "strip_prefix": "Return your final response within \\boxed{}."},
    "aime24": {"path": "aime24/test.jsonl", "field": "problem", "id_field": "id"},
    "amc23": {"path": "amc23/test.jsonl", "field": "problem", "id_field": "id"},
}
DEFAULT_DATA_ROOT = "../shared/data"
