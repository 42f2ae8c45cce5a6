import hashlib
import json
import random

import pytest
from conftest import SHARED_DATA

from stages.common.checkers import FormatSpec, answers_equal, check_sample, gold_answer, last_boxed
from stages.toy_task import make_problem

FMT = FormatSpec()


def test_last_boxed_handles_nesting_and_takes_the_last():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{ {a}^{2} }") == "{a}^{2}"
    assert last_boxed("no answer here") is None
    assert last_boxed(r"\boxed{unterminated") is None


def test_gold_answer_forms():
    assert gold_answer("She has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert gold_answer(r"so the answer is $\boxed{\frac{14}{3}}$.") == r"\frac{14}{3}"
    assert gold_answer("27.0") == "27.0"


@pytest.mark.parametrize("gold,pred,equal", [
    ("72", "72", True),
    ("27.0", "27", True),
    (r"\frac{1}{2}", "0.5", True),
    (r"\frac{14}{3}", r"\dfrac{14}{3}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", True),
    ("6 - 5i", "6-5i", True),
    ("72", "73", False),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
])
def test_answers_equal(gold, pred, equal):
    assert answers_equal(gold, pred) is equal


def test_verdicts_and_reasons():
    good = "<think>\n3 + 4 = 7\n</think>\nThe answer is \\boxed{7}."
    assert check_sample(good, "stop", "#### 7", FMT).reason == "ok"
    v = check_sample(good, "stop", "8", FMT)
    assert (v.verdict, v.reason) == ("rejected", "wrong_answer") and "expected 8, got 7" in v.detail
    assert check_sample(good, "length", "7", FMT).reason == "truncated"
    assert check_sample("The answer is \\boxed{7}", "stop", "7", FMT).reason == "missing_think"
    assert check_sample("<think></think> \\boxed{7}", "stop", "7", FMT).reason == "missing_think"
    assert check_sample("<think>x</think> seven", "stop", "7", FMT).reason == "no_boxed_answer"
    # the boxed answer must be after the reasoning, not inside it
    assert check_sample("<think>\\boxed{7}</think> done", "stop", "7", FMT).reason == "no_boxed_answer"
    v = check_sample("", "error", "7", FMT, error="prompt_too_long: 900 tokens")
    assert (v.verdict, v.reason) == ("error", "generation_error")  # an infrastructure fault, not a wrong answer
    assert check_sample("", "stop", "7", FMT).reason == "missing_think"
    assert check_sample("\\boxed{7}", "stop", "7", FormatSpec(require_think=False)).reason == "ok"
    assert check_sample("<think>x</think>\\boxed{7}", "stop", None, FMT).verdict == "error"
    deferred = check_sample(good, "stop", "7", FMT, compare=False)
    assert (deferred.verdict, deferred.reason, deferred.extracted) == ("pending", "compare", "7")


def test_toy_gold_solutions_verify():
    rng = random.Random(1)
    for _ in range(200):
        prompt, solution, answer = make_problem(rng, 2, 4, 40, 0.5)
        assert check_sample(solution, "stop", answer, FMT).reason == "ok", (prompt, solution)
        wrong = solution.replace("\\boxed{" + answer + "}", "\\boxed{" + str(int(answer) + 1) + "}")
        assert check_sample(wrong, "stop", answer, FMT).reason == "wrong_answer"


def test_toy_slips_are_off_by_one_carried_to_the_answer_and_verified_wrong():
    """``slip_rate``: a slipped step writes its result off by one and the later steps carry it,
    so the boxed answer is wrong and verify says so; no written value is negative; the share of
    slipped solutions is about 1 - (1 - rate)^steps; rate 0 draws the same problems as before."""
    import re

    rng, slipped, n, expected = random.Random(3), 0, 3000, 0.0
    for _ in range(n):
        prompt, solution, answer = make_problem(rng, 2, 4, 9, 1.0, slip_rate=0.1)
        lines = re.findall(r"^(\d+) ([+-]) (\d+) = (\d+)$", solution, re.M)
        terms = [int(t) for t in re.findall(r"\d+", prompt)]
        assert len(lines) == len(terms) - 1 and int(lines[0][0]) == terms[0]
        true, off = terms[0], 0
        for (a, op, b, c), t in zip(lines, terms[1:]):
            assert int(b) == t and int(a) == true + off  # a step starts from what the last one wrote
            true = true + t if op == "+" else true - t
            step_off = int(c) - (int(a) + t if op == "+" else int(a) - t)
            assert step_off in (-1, 0, 1)
            off += step_off
        assert int(answer) == true
        boxed = solution.rsplit("\\boxed{", 1)[1].split("}")[0]
        assert int(boxed) == true + off
        reason = check_sample(solution, "stop", answer, FMT).reason
        assert reason == ("ok" if off == 0 else "wrong_answer"), solution
        slipped += off != 0
        expected += 1 - 0.9 ** len(lines)
    assert abs(slipped - expected) < 4 * (expected * (1 - expected / n)) ** 0.5  # within 4 SE of the rate
    # the digest of the first 500 problems of seed 7 as drawn before slip_rate existed (cb97c48's toy_task)
    rng = random.Random(7)
    drawn = json.dumps([make_problem(rng, 2, 3, 40, 0.5, slip_rate=0.0) for _ in range(500)])
    assert hashlib.sha256(drawn.encode()).hexdigest()[:16] == "51623ee117c73031"


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_shared_gsm8k_gold_answers_verify_in_another_form():
    """GSM8K's ``#### n`` golds against a completion that writes n in another form (a fraction,
    so the answers are compared as math, not as equal strings); n + 1 in that form is wrong."""
    from fractions import Fraction

    rows = [json.loads(line) for line in open(SHARED_DATA / "gsm8k/test.jsonl")][:150]
    ok = wrong = 0
    for r in rows:
        n = Fraction(gold_answer(r["answer"]).replace(",", ""))
        as_fraction = "<think>work</think> \\boxed{\\frac{%s}{%s}}"
        ok += check_sample(as_fraction % (n * 3, 3), "stop", r["answer"], FMT).reason == "ok"
        wrong += check_sample(as_fraction % ((n + 1) * 3, 3), "stop", r["answer"], FMT).reason == "wrong_answer"
    assert ok / len(rows) >= 0.99 and wrong == len(rows)


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data not present")
def test_shared_math500_gold_answers_verify_against_themselves():
    """MATH-500's boxed gold solutions: the boxed answer taken out of the solution verifies."""
    rows = [json.loads(line) for line in open(SHARED_DATA / "math500/test.jsonl")][:150]
    ok = 0
    for r in rows:
        completion = "<think>work</think> \\boxed{" + gold_answer(r["solution"]) + "}"
        ok += check_sample(completion, "stop", r["answer"], FMT).reason == "ok"
    assert ok / len(rows) >= 0.99


@pytest.mark.parametrize("gold,pred,equal", [
    ("58500", "58, 500", False),  # a comma with a space separates two values
    ("58500", "58,500", True),
    (r"10,\!080", "10080", True),
    ("12", "1,2", False),  # not a thousands comma
    ("1, 2", "1,2", True),  # a list either way
])
def test_commas(gold, pred, equal):
    assert answers_equal(gold, pred) is equal
