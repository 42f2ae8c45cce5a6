"""Rule checkers shared by the verify and evaluate stages.

``check_sample`` gives every sample a verdict (``correct``, ``rejected`` or
``error``), a reason code and a human-readable detail:

==================  ========================================================
reason              meaning
==================  ========================================================
ok                  format holds and the answer equals the gold answer
generation_error    the engine produced no completion (see detail)
truncated           generation hit ``max_tokens`` / the context limit
missing_think       reasoning block required but absent or unterminated
no_boxed_answer     no ``\\boxed{}`` in the answer part
wrong_answer        the last ``\\boxed{}`` differs from the gold answer
bad_gold            the gold answer could not be parsed (an ``error``)
timeout             the answer check overran its hard deadline (an ``error``;
                    set by the verifier service, ``stages.common.verifier``)
checker_error       the checker raised (an ``error``)
==================  ========================================================

Math equality goes through math-verify, after a cheap exact-string fast path.
GSM8K gold answers (``... #### 1,234``) are reduced to their final number.

Code samples (a row with a ``tests`` field: a list of ``{"input", "output"}`` stdin/stdout
pairs or its JSON) go through ``check_code_sample``: the same format checks
(``truncated``, ``missing_think``), then the last fenced code block of the answer part
runs against the tests in the sandbox (``stages.common.sandbox``; its module docstring
has the limits and isolation). ``extracted`` is the program. Reasons: ``ok``;
rejected: ``no_code_block``, ``wrong_output``, ``runtime_error``, ``memory_limit``,
``file_size_limit``, ``output_limit``, ``time_limit``, ``cpu_limit`` (a program that
overruns is a wrong answer, unlike ``timeout`` above); errors: ``no_isolation`` (no
sandbox here and ``allow_unisolated`` not set), ``sandbox_error``, ``bad_tests``.
``check_code_rows`` does it for many rows on a few threads (each run is its own
process tree, bounded by ``tests x timeout_s`` plus start-up, so no extra deadline).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

CHECKER_VERSION = "1"


class FormatSpec(BaseModel):
    """The reasoning/answer structure a completion must follow."""

    model_config = ConfigDict(extra="forbid")
    require_think: bool = True
    think_open: str = "<think>"
    think_close: str = "</think>"
    reject_truncated: bool = True


@dataclass
class Verdict:
    verdict: str  # correct | rejected | error
    reason: str
    detail: str
    extracted: str | None

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth, i = 1, start
        while i < len(text):
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
            i += 1
    return None


def gold_answer(gold: str) -> str:
    """The final answer inside a gold field: GSM8K ``#### n``, a boxed solution, or the text itself."""
    gold = gold.strip()
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(gold)
    return boxed if boxed is not None else gold


def _normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\[,!;: ]|\s+", "", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


# math-verify's timeouts use signal.alarm, which only works on the main thread. The
# verifier service's workers turn them off: they are killed at a hard deadline instead.
SIGNAL_TIMEOUTS = True


def _timeout() -> int | None:
    return 5 if SIGNAL_TIMEOUTS and threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse(ans: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        "\\boxed{" + ans + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=_timeout(),
    )


@lru_cache(maxsize=65536)
def answers_equal(gold: str, pred: str) -> bool:
    """Math equality of two final answers (strings as written inside ``\\boxed{}``)."""
    from math_verify import verify

    if _normalize(gold) == _normalize(pred):
        return True
    g, p = _parse(gold), _parse(pred)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=_timeout()))


def answer_key(ans: str | None) -> str | None:
    """A normalised form of an extracted answer, for majority voting."""
    return None if ans is None else _normalize(ans)


def format_gate(completion: str, finish_reason: str | None, fmt: FormatSpec) -> tuple[tuple[str, str] | None, str]:
    """``(None, answer part)`` when the completion's format holds, else ``((reason, detail),
    the text an answer would be extracted from for the record)``."""
    if fmt.reject_truncated and finish_reason == "length":
        return ("truncated", "generation stopped at the token limit"), completion
    if not fmt.require_think:
        return None, completion
    if fmt.think_close not in completion:
        return ("missing_think", f"no {fmt.think_close} closing the reasoning"), completion
    reasoning, answer_part = completion.split(fmt.think_close, 1)
    reasoning = reasoning.replace(fmt.think_open, "", 1)
    if not reasoning.strip():
        return ("missing_think", "empty reasoning block"), completion
    if fmt.think_close in answer_part:
        return ("missing_think", f"more than one {fmt.think_close}"), answer_part
    return None, answer_part


def check_sample(
    completion: str | None,
    finish_reason: str | None,
    gold: str | None,
    fmt: FormatSpec,
    error: str | None = None,
    compare: bool = True,
) -> Verdict:
    """The verdict for one sample. With ``compare=False`` the math comparison is left to the
    caller (the verifier service): a sample that gets that far comes back with reason
    ``compare`` and its extracted answer."""
    if error:
        return Verdict("error", "generation_error", error, None)
    completion = completion or ""
    try:
        problem, answer_part = format_gate(completion, finish_reason, fmt)
        if problem:
            return Verdict("rejected", *problem, last_boxed(answer_part))
        extracted = last_boxed(answer_part)
        if extracted is None:
            return Verdict("rejected", "no_boxed_answer", "no \\boxed{} in the answer", None)
        if gold is None or not gold_answer(gold):
            return Verdict("error", "bad_gold", "no gold answer to compare with", extracted)
        g = gold_answer(gold)
        if not compare:
            return Verdict("pending", "compare", "", extracted)
        if answers_equal(g, extracted):
            return Verdict("correct", "ok", "", extracted)
        return Verdict("rejected", "wrong_answer", f"expected {g[:200]}, got {extracted[:200]}", extracted)
    except Exception as e:  # a checker fault is recorded, never raised into the stage
        return Verdict("error", "checker_error", f"{type(e).__name__}: {str(e)[:300]}", None)




# -- code ------------------------------------------------------------------------------


def is_code_row(row: dict, checker: str = "auto") -> bool:
    """Whether a sample row is checked as code: ``checker="code"`` always, ``"math"`` never,
    ``"auto"`` when the row has a non-empty ``tests`` field (not null, ``""``, ``[]`` or ``"[]"``)."""
    if checker == "code":
        return True
    if checker == "math":
        return False
    tests = row.get("tests")
    if isinstance(tests, str):
        return tests.strip() not in ("", "[]", "{}", "null")
    return bool(tests)


def check_code_sample(completion: str | None, tests, spec=None, finish_reason: str | None = None,
                      fmt: FormatSpec | None = None, error: str | None = None) -> Verdict:
    """The verdict for one code sample: format checks (with ``fmt``), then the last fenced
    code block of the answer part run on ``tests`` (a list or its JSON) in the sandbox
    under ``spec`` (a ``sandbox.CodeSpec``; defaults if None)."""
    from . import sandbox

    if error:
        return Verdict("error", "generation_error", error, None)
    completion = completion or ""
    try:
        answer_part = completion
        if fmt is not None:
            problem, answer_part = format_gate(completion, finish_reason, fmt)
            if problem:
                return Verdict("rejected", *problem, sandbox.extract_program(answer_part))
        program = sandbox.extract_program(answer_part)
        if program is None:
            return Verdict("rejected", "no_code_block", "no fenced code block in the answer", None)
        r = sandbox.run_tests(program, tests, spec or sandbox.CodeSpec())
        verdict = {"pass": "correct", "fail": "rejected", "timeout": "rejected"}.get(r["verdict"], "error")
        return Verdict(verdict, r["reason"], r["detail"], program)
    except Exception as e:  # a checker fault is recorded, never raised into the stage
        return Verdict("error", "checker_error", f"{type(e).__name__}: {str(e)[:300]}", None)


def check_code_rows(rows: list[dict], fmt: FormatSpec, spec=None, checker: str = "code", workers: int = 2,
                    cache: dict | None = None) -> list[dict]:
    """Verdict columns (verdict, reason, detail, extracted) for code sample rows, ``workers``
    sandbox runs at a time. Tests come from a row's ``tests`` field, or, with
    ``checker="code"``, from its ``answer`` when it has none. ``cache`` (a dict kept by the
    caller) maps (program, tests, limits) to a verdict so repeated programs run once."""
    import hashlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    from . import sandbox

    spec = spec or sandbox.CodeSpec()
    spec_key = spec.model_dump_json()

    def one(r: dict) -> Verdict:
        tests = r.get("tests")
        if tests is None and checker == "code":
            tests = r.get("answer")
        program = None
        if not r.get("error"):
            problem, part = format_gate(r.get("completion") or "", r.get("finish_reason"), fmt)
            program = None if problem else sandbox.extract_program(part)
        key = None
        if program is not None and cache is not None:
            blob = json.dumps([program, tests, spec_key], sort_keys=True, default=str)
            key = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
            if key in cache:
                return cache[key]
        v = check_code_sample(r.get("completion"), tests, spec, r.get("finish_reason"), fmt, r.get("error"))
        if key is not None and v.verdict != "error":
            cache[key] = v
        return v

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        verdicts = list(ex.map(one, rows))
    return [{"verdict": v.verdict, "reason": v.reason, "detail": v.detail, "extracted": v.extracted} for v in verdicts]
