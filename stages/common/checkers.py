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
        if fmt.reject_truncated and finish_reason == "length":
            return Verdict("rejected", "truncated", "generation stopped at the token limit", last_boxed(completion))
        answer_part = completion
        if fmt.require_think:
            if fmt.think_close not in completion:
                return Verdict("rejected", "missing_think", f"no {fmt.think_close} closing the reasoning", last_boxed(completion))
            reasoning, answer_part = completion.split(fmt.think_close, 1)
            reasoning = reasoning.replace(fmt.think_open, "", 1)
            if not reasoning.strip():
                return Verdict("rejected", "missing_think", "empty reasoning block", last_boxed(completion))
            if fmt.think_close in answer_part:
                return Verdict("rejected", "missing_think", f"more than one {fmt.think_close}", last_boxed(answer_part))
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


