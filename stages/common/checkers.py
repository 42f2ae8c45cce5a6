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
no_boxed_answer     no non-empty ``\\boxed{}`` in the answer part
wrong_answer        the boxed answer differs from the gold answer
hedged_answer       the boxes hold more distinct values than the gold answer
                    has (``\\boxed{7}`` or ``\\boxed{8}`` for 7), and they do
                    not equal it
bad_gold            there is no gold answer to compare with (an ``error``)
timeout             the answer check overran its deadline (an ``error``):
                    the verifier service's hard one (``stages.common.verifier``),
                    or, on the main thread, ``CHECK_TIMEOUT_S`` for the whole check
checker_error       the checker raised (an ``error``)
==================  ========================================================

**Math answers** are extracted and compared the way math-verify's own ``parse`` /
``verify`` pipeline does: each boxed value is parsed by ``math_verify.parse`` and compared
by ``math_verify.verify`` (after a cheap exact-string fast path). The answer is every
distinct ``\\boxed{}`` of the answer part (after the reasoning block), taken together as
one set when there are several (``\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}``,
``\\boxed{1}, \\boxed{2}, \\boxed{3}``), as math-verify does for ``$a$, $b$ and $c$``. A gold
answer may be a boxed list (``\\boxed{2}, \\boxed{3}, \\boxed{5}``: the last box and those
just before it, grouped as math-verify groups them), a ``,``/``;``-separated list, equations
with named variables (``k = 45, n = 2``, ``x_1 = 2, x_2 = 7``: the bare values answer them
too), a set or an interval (compared as sets), a value with units or in ``\\text{}``
(``0.06 \\text{ yuan}``, ``\\$18``, ``12 \\text{ cm}^2``), or a GSM8K solution
(``... #### 1,234``: its final number). ``benchmarks/verify.py`` (``verify-agreement``)
measures the agreement with raw math-verify on MATH-500 and GSM8K pairs.

Where this module knowingly differs from math-verify (``verify(parse(gold),
parse(completion))``):

* The answer must be boxed, after the reasoning. math-verify falls back to the last LaTeX
  or number anywhere (``</think> The answer is 7`` is 7 to it; here ``no_boxed_answer``),
  and a box inside the reasoning block does not count here.
* Every distinct box of the answer part counts, however far apart. math-verify takes the
  last box and only the boxes just before it (within 10 characters, or 70 with ``and``,
  ``or``, ``,`` or ``;`` between), so ``A first guess is $\\boxed{20}$, but checking the
  constraint again we find the final answer $\\boxed{143}$`` is 143 to it, a hedge
  (``hedged_answer``) here: a completion must not pass by boxing several candidates.
* One value restated counts once: ``\\boxed{5}. So \\boxed{x = 5}`` is correct for gold 5
  here (boxes whose values ``verify`` as equal are one value); math-verify groups the two
  boxes, compares the set ``{5, x = 5}`` with 5 and says no.
* Rejections for hedging have their own reason (``hedged_answer``, also for ``\\boxed{7
  \\text{ or } 8}`` and ``\\boxed{7, 8}`` against 7); math-verify says only "not equal".
  More than ``MAX_VALUES`` distinct values against a smaller gold are a hedge without being
  compared one by one.
* An overrun is an ``error`` (``timeout``), never a wrong answer: math-verify returns
  "not equal" when its own per-call timeout fires. Here one deadline bounds the whole check
  (every part of the gold and of the answer), in the verifier service's worker processes
  (killed at the deadline) or, on the main thread, by one ``SIGALRM`` (``CHECK_TIMEOUT_S``).

**Code samples** (a row with a ``tests`` field) go through ``check_code_sample``: the
same format checks (``truncated``, ``missing_think``), then the last fenced code block of
the answer part runs against the tests in the sandbox (``stages.common.sandbox``; the
README's "The code sandbox" has the limits and isolation). Tests are stdin/stdout pairs (a list of
``{"input", "output"}`` or its JSON) or function-call tests: Python test code run after the
program, in the same sandbox run with the same limits, as HumanEval and MBPP do (a
HumanEval ``{"test": "def check(candidate): ...", "entry_point": "f"}``, an MBPP
``{"test_list": ["assert f(1) == 2", ...]}``, or a list of asserts). A row says which kind
it has in ``test_kind`` (``stdio`` or ``function_call``; inferred from the tests' shape
when absent; a kind that does not fit the tests is ``bad_tests``). ``extracted`` is the
program. Reasons: ``ok``; rejected: ``no_code_block``, ``wrong_output`` (for a failed
assert the detail is the failing assertion, ``failed: assert candidate(1, 2) == 3``),
``runtime_error``, ``memory_limit``, ``file_size_limit``, ``output_limit``,
``time_limit``, ``cpu_limit`` (a program that overruns is a wrong answer, unlike
``timeout`` above); errors: ``no_isolation`` (no sandbox here and ``allow_unisolated`` not
set), ``sandbox_error``, ``bad_tests``. ``check_code_rows`` does it for many rows on a few
threads (each run is its own process tree, bounded by ``tests x timeout_s`` plus start-up,
so no extra deadline).
"""
from __future__ import annotations

import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from pydantic import BaseModel, ConfigDict

CHECKER_VERSION = "2"

# reasons of a sample that passed the format gate (``format_gate``): its answer was compared
# (math) or its program run (code), whatever came of it
FORMAT_PASSED_REASONS = frozenset({"ok", "wrong_answer", "hedged_answer", "timeout", "wrong_output", "runtime_error",
                                   "memory_limit", "file_size_limit", "output_limit", "time_limit", "cpu_limit"})


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
    parts: tuple | None = None  # (gold parts, answer parts) of a deferred math comparison

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACES = re.compile(r"[{}]")
MAX_VALUES = 32  # distinct boxed values compared one by one at most; beyond, a hedge without parsing


def boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """``(start, end, content)`` of every outermost ``\\boxed{...}`` / ``\\fbox{...}`` with balanced
    braces, in order (one linear pass over the braces, so a long or malformed text stays cheap)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACES.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            close[stack.pop()] = m.start()
    out, pos = [], 0
    for m in _BOXED.finditer(text):
        if m.start() < pos:  # inside a box already taken
            continue
        end = close.get(m.end() - 1)
        if end is None:  # unterminated: the boxes inside it may still close
            continue
        out.append((m.start(), end + 1, text[m.end():end].strip()))
        pos = end + 1
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (braces balanced), or None."""
    spans = boxed_spans(text)
    return spans[-1][2] if spans else None


def answer_parts(text: str) -> tuple[str, ...]:
    """The distinct non-empty ``\\boxed{}`` contents of an answer part, in order (a value boxed
    twice, as written or up to spacing and ``\\dfrac``/``\\left`` spelling, counts once)."""
    seen: dict[str, str] = {}
    for _, _, content in boxed_spans(text):
        if content and _normalize(content) not in seen:
            seen[_normalize(content)] = content
    return tuple(seen.values())


_SEPARATOR = re.compile(r"\b(and|or)\b|,|;")


def gold_parts(gold: str | None) -> tuple[str, ...]:
    """The parts of a gold answer: GSM8K ``#### n`` -> its number; a text with ``\\boxed{}`` -> the
    last box and the boxes just before it (as math-verify groups them: at most 10 characters
    apart, or 70 with ``and``/``or``/``,``/``;`` between), so ``\\boxed{2}, \\boxed{3}`` is a list;
    else the text itself (surrounding ``$`` removed)."""
    gold = (gold or "").strip()
    if "####" in gold:
        num = gold.rsplit("####", 1)[1].strip().replace(",", "")
        return (num,) if num else ()
    spans = boxed_spans(gold)
    if spans:
        group = [spans[-1]]
        for span in reversed(spans[:-1]):
            between = gold[span[1]:group[-1][0]]
            if len(between) < 10 or (span[2] != group[-1][2] and len(between) < 70 and _SEPARATOR.search(between)):
                group.append(span)
            else:
                break
        return tuple(dict.fromkeys(c for _, _, c in reversed(group) if c))
    text = gold.strip("$").strip()
    return (text,) if text else ()


def gold_answer(gold: str) -> str:
    """The final answer inside a gold field: GSM8K ``#### n``, a boxed solution (several boxes
    joined by ``, ``), or the text itself."""
    return ", ".join(gold_parts(gold))


_LIST_COMMA = re.compile(r",(?:\s|\\[ ,;:])+")  # a comma and spacing: a list separator ("58, 500" is two values)


def _normalize(ans: str) -> str:
    """A cheap canonical spelling for the exact-string fast path (and for telling boxes apart):
    spacing, ``\\left``/``\\right``, ``\\dfrac`` and ``\\text{}`` do not matter, nor thousands
    commas in a plain number (``10,\\!080``); a comma followed by spacing stays a separator."""
    return ", ".join(_normalize_item(p) for p in _LIST_COMMA.split(ans.strip().strip("$").strip()))


def _normalize_item(s: str) -> str:
    s = re.sub(r"\\[,!;: ]|\s+", "", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    if re.fullmatch(r"-?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?", s):
        s = s.replace(",", "")
        if "." in s:
            s = s.rstrip("0").rstrip(".")
    return s


# math-verify's own timeouts (signal.alarm per parse/verify call) are off: they catch their own
# exception, so they cannot bound a check made of several calls. On the main thread one alarm
# bounds the whole check (``CHECK_TIMEOUT_S``) and raises ``CheckTimeout``, which math-verify
# does not catch; the verifier service's workers turn it off (SIGNAL_TIMEOUTS = False): they are
# killed at a hard deadline instead. Off the main thread, without the service, there is none.
SIGNAL_TIMEOUTS = True
CHECK_TIMEOUT_S = 5.0


class CheckTimeout(BaseException):
    """An answer check overran its deadline (a BaseException, so math-verify does not swallow it)."""


@contextmanager
def _deadline(seconds: float | None):
    if not seconds or not SIGNAL_TIMEOUTS or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise CheckTimeout(f"answer check exceeded {seconds:g}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if old_delay:  # someone else's timer was running: it goes on
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 0.001), old_interval)


@lru_cache(maxsize=1)
def _mv():
    import math_verify
    import math_verify.grader
    import math_verify.parser
    from latex2sympy2_extended.sets import FiniteSet

    # timeouts are ours (see above): silence the "timeout disabled" warning they would print
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    cfg = [math_verify.LatexExtractionConfig(boxed_match_priority=0), math_verify.ExprExtractionConfig()]
    math_verify.parse("\\boxed{\\frac{1}{2}}", extraction_config=cfg, parsing_timeout=None)  # loads the LaTeX parser
    return math_verify.parse, math_verify.verify, cfg, FiniteSet


@lru_cache(maxsize=65536)
def _parse(ans: str) -> tuple:
    """math-verify's parse of one answer as written inside ``\\boxed{}``: (sympy value?, string)."""
    parse, _, cfg, _ = _mv()
    return tuple(parse("\\boxed{" + ans + "}", extraction_config=cfg, parsing_timeout=None))


def _expr(parsed: tuple):
    return next((x for x in parsed if not isinstance(x, str)), None)


def _combined(parts: tuple[str, ...]) -> list:
    """Parsed candidates for an answer of one or several parts; several are one set of their
    elements (a part that is itself a set adds its elements), as math-verify does for
    ``$a$, $b$ and $c$``."""
    if len(parts) == 1:
        return list(_parse(parts[0]))
    _, _, _, FiniteSet = _mv()
    parsed = [_parse(p) for p in parts]
    exprs = [_expr(p) for p in parsed]
    out: list = []
    if all(e is not None for e in exprs):
        try:
            out.append(FiniteSet(*_flatten(exprs)))
        except TypeError:  # unhashable members (matrices): the joined text only, as math-verify
            pass
    out.append(",".join(next((x for x in p if isinstance(x, str)), part) for p, part in zip(parsed, parts)))
    return out


def _flatten(exprs) -> list:
    from sympy import FiniteSet as SympyFiniteSet

    out = []
    for e in exprs:
        out.extend(e.args if isinstance(e, SympyFiniteSet) else [e])
    return out


def _values(parts: tuple[str, ...]) -> list:
    """The distinct values an answer states: each part's elements (a set's members), as parsed,
    or the part's text where it does not parse."""
    out: list = []
    for part in parts:
        e = _expr(_parse(part))
        for v in _flatten([e]) if e is not None else [part]:
            if not any(_identical(v, u) for u in out):
                out.append(v)
    return out


def _identical(a, b) -> bool:
    """Structural equality (sympy ``==``); values such as matrices are not hashable."""
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _equal(gold: list, pred: list) -> bool:
    _, verify, _, _ = _mv()
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=None))


def _same_value(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and _normalize(a) == _normalize(b)
    return a == b or _equal([a], [b]) or _equal([b], [a])


@lru_cache(maxsize=65536)
def _compare(gold: tuple[str, ...], pred: tuple[str, ...]) -> str:
    if len(gold) == 1 and len(pred) == 1 and _normalize(gold[0]) == _normalize(pred[0]):
        return "ok"
    if len(pred) > MAX_VALUES and len(pred) > len(_values(gold)):  # a hedge, without parsing every box
        return "hedged_answer"
    g = _combined(gold)
    if _equal(g, _combined(pred)):
        return "ok"
    n_gold = len(_values(gold))
    values = _values(pred)
    if len(values) <= n_gold:
        return "wrong_answer"
    if len(values) > MAX_VALUES:
        return "hedged_answer"
    distinct: list = []  # one value per group of equal ones (5 and x = 5 are one value)
    for v in values:
        if not any(_same_value(d, v) for d in distinct):
            distinct.append(v)
    if len(distinct) < len(values) and not any(isinstance(d, str) for d in distinct):
        _, _, _, FiniteSet = _mv()
        try:
            if _equal(g, [FiniteSet(*distinct) if len(distinct) > 1 else distinct[0]]):
                return "ok"
        except TypeError:  # unhashable members
            pass
    return "hedged_answer" if len(distinct) > n_gold else "wrong_answer"


def compare_answers(gold: tuple[str, ...], pred: tuple[str, ...], timeout_s: float | None = CHECK_TIMEOUT_S) -> str:
    """``ok``, ``wrong_answer`` or ``hedged_answer`` for an answer of parts ``pred`` (distinct
    boxed contents) against gold parts. On the main thread (with ``SIGNAL_TIMEOUTS``) the whole
    check is bounded by ``timeout_s`` and raises ``CheckTimeout`` past it (imports are done
    before it starts)."""
    _mv()
    with _deadline(timeout_s):
        return _compare(tuple(gold), tuple(pred))


def answers_equal(gold: str, pred: str) -> bool:
    """Math equality of two final answers (strings as written inside ``\\boxed{}``)."""
    return compare_answers((gold,), (pred,)) == "ok"


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


def _shown(parts: tuple[str, ...]) -> str:
    return ", ".join(parts)


def math_verdict(reason: str, gold: tuple[str, ...], pred: tuple[str, ...], timeout_s: float = CHECK_TIMEOUT_S) -> Verdict:
    """The verdict for a finished comparison (``ok``, ``wrong_answer``, ``hedged_answer``, or
    ``timeout``)."""
    shown = _shown(pred)
    if reason == "ok":
        return Verdict("correct", "ok", "", shown)
    if reason == "timeout":
        return Verdict("error", "timeout", f"answer check exceeded {timeout_s:g}s", shown)
    if reason == "hedged_answer":
        return Verdict("rejected", "hedged_answer",
                       f"more distinct boxed values than the gold answer has: expected {_shown(gold)[:200]}, "
                       f"got {shown[:200]}", shown)
    return Verdict("rejected", "wrong_answer", f"expected {_shown(gold)[:200]}, got {shown[:200]}", shown)


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
    ``compare``, its extracted answer and its answer parts in ``parts``."""
    if error:
        return Verdict("error", "generation_error", error, None)
    completion = completion or ""
    try:
        problem, answer_part = format_gate(completion, finish_reason, fmt)
        if problem:
            return Verdict("rejected", *problem, _shown(answer_parts(answer_part)) or None)
        pred = answer_parts(answer_part)
        if not pred:
            return Verdict("rejected", "no_boxed_answer", "no \\boxed{} with an answer in the answer part", None)
        g = gold_parts(gold)
        if not g:
            return Verdict("error", "bad_gold", "no gold answer to compare with", _shown(pred))
        if not compare:
            return Verdict("pending", "compare", "", _shown(pred), parts=(g, pred))
        try:
            reason = compare_answers(g, pred)
        except CheckTimeout:
            reason = "timeout"
        return math_verdict(reason, g, pred)
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
                      fmt: FormatSpec | None = None, error: str | None = None, kind: str | None = None) -> Verdict:
    """The verdict for one code sample: format checks (with ``fmt``), then the last fenced
    code block of the answer part run on ``tests`` (stdin/stdout or function-call tests, or
    their JSON; ``kind`` is the row's ``test_kind`` if it has one, see
    ``sandbox.parse_test_suite``) in the sandbox under ``spec`` (a ``sandbox.CodeSpec``;
    defaults if None)."""
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
        r = sandbox.run_tests(program, tests, spec or sandbox.CodeSpec(), kind)
        verdict = {"pass": "correct", "fail": "rejected", "timeout": "rejected"}.get(r["verdict"], "error")
        return Verdict(verdict, r["reason"], r["detail"], program)
    except Exception as e:  # a checker fault is recorded, never raised into the stage
        return Verdict("error", "checker_error", f"{type(e).__name__}: {str(e)[:300]}", None)


def check_code_rows(rows: list[dict], fmt: FormatSpec, spec=None, checker: str = "code", workers: int = 2,
                    cache: dict | None = None) -> list[dict]:
    """Verdict columns (verdict, reason, detail, extracted) for code sample rows, ``workers``
    sandbox runs at a time. Tests come from a row's ``tests`` field, or, with
    ``checker="code"``, from its ``answer`` when it has none; a row's ``test_kind``
    (``stdio`` or ``function_call``) says which kind they are (inferred from their shape when
    absent or null). ``cache`` (a dict kept by the
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
        kind = r.get("test_kind")
        program = None
        if not r.get("error"):
            problem, part = format_gate(r.get("completion") or "", r.get("finish_reason"), fmt)
            program = None if problem else sandbox.extract_program(part)
        key = None
        if program is not None and cache is not None:
            blob = json.dumps([program, tests, kind, spec_key], sort_keys=True, default=str)
            key = hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()
            if key in cache:
                return cache[key]
        v = check_code_sample(r.get("completion"), tests, spec, r.get("finish_reason"), fmt, r.get("error"), kind)
        if key is not None and v.verdict != "error":
            cache[key] = v
        return v

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        verdicts = list(ex.map(one, rows))
    return [{"verdict": v.verdict, "reason": v.reason, "detail": v.detail, "extracted": v.extracted} for v in verdicts]
