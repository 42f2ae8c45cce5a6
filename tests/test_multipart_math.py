"""Multi-part math answers: several boxes taken as a set, list/equation/named-variable golds,
sets and intervals, units and \\text{} wrappers; hedging with extra boxed values is rejected
with its own reason; one check, however many parts, stays within the hard deadline."""
import time

import pytest

from stages.common.checkers import FormatSpec, answer_parts, check_sample, compare_answers, gold_answer, gold_parts
from stages.common.verifier import VerifierPool

FMT = FormatSpec()


def verdict(gold: str, answer_part: str, reasoning: str = "working it out") -> tuple[str, str]:
    v = check_sample(f"<think>{reasoning}</think>\n{answer_part}", "stop", gold, FMT)
    return v.verdict, v.reason


# (shape, gold, a correct answer part, a wrong answer part)
SHAPES = [
    ("several boxes", r"(2, 2), (6, 2)", r"$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$",
     r"$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(2, 6)}$"),
    ("several boxes, any order", r"\{1, 2, 3\}", r"$\boxed{3}, \boxed{1}, \boxed{2}$", r"$\boxed{1}, \boxed{2}, \boxed{4}$"),
    ("boxed-list gold", r"\boxed{2}, \boxed{3}, \boxed{5}", r"The primes are $\boxed{2, 3, 5}$.", r"$\boxed{2, 3, 7}$"),
    ("boxed-list gold, boxed list answer", r"$\boxed{2}$, $\boxed{3}$ and $\boxed{5}$",
     r"$\boxed{5}$, $\boxed{2}$ and $\boxed{3}$", r"$\boxed{2}$ and $\boxed{3}$"),
    ("semicolon list gold", "-3; -1; 4", r"$\boxed{\{-3, -1, 4\}}$", r"$\boxed{\{-3, 1, 4\}}$"),
    ("named-variable gold", "k = 45, n = 2", r"$\boxed{k = 45} \quad \text{and} \quad \boxed{n = 2}$",
     r"$\boxed{k = 45, n = 3}$"),
    ("named-variable gold, bare values", "k = 45, n = 2", r"$\boxed{45}$ and $\boxed{2}$", r"$\boxed{45}$ and $\boxed{3}$"),
    ("indexed-variable gold", "x_1 = 2, x_2 = 7", r"$\boxed{x_1 = 2, x_2 = 7}$", r"$\boxed{x_1 = 2, x_2 = 8}$"),
    ("equation gold, bare answer", "x = 5", r"$\boxed{5}$", r"$\boxed{6}$"),
    ("bare gold, assignment answer", "5", r"$\boxed{x = 5}$", r"$\boxed{x = 6}$"),
    ("equation", "y = 2x + 3", r"$\boxed{y = 3 + 2x}$", r"$\boxed{y = 2x - 3}$"),
    ("and/or in the answer", "6, 8", r"$\boxed{8 \text{ or } 6}$", r"$\boxed{6 \text{ and } 9}$"),
    ("and in the gold", r"6 \text{ and } 8", r"$\boxed{6, 8}$", r"$\boxed{6, 9}$"),
    ("set", r"\{1, 2, 3\}", r"$\boxed{\{3, 2, 1\}}$", r"$\boxed{\{1, 2, 4\}}$"),
    ("interval", "[1, 3)", r"$\boxed{[1, 3)}$", r"$\boxed{(1, 3]}$"),
    ("union of intervals", r"(-\infty, 2] \cup [5, \infty)", r"$\boxed{(-\infty, 2] \cup [5, \infty)}$",
     r"$\boxed{(-\infty, 2) \cup [5, \infty)}$"),
    ("units in the answer", "18", r"$\boxed{18 \text{ dollars}}$", r"$\boxed{19 \text{ dollars}}$"),
    ("currency", "18", r"$\boxed{\$18}$", r"$\boxed{\$81}$"),
    ("units in the gold", r"0.06 \text{ yuan}", r"$\boxed{0.06}$", r"$\boxed{0.6}$"),
    ("units with a power", r"12 \text{ cm}^2", r"$\boxed{12\text{ cm}^2}$", r"$\boxed{13 \text{ cm}^2}$"),
    ("text wrapper", r"\text{Evelyn}", r"$\boxed{\text{Evelyn}}$", r"$\boxed{\text{Alice}}$"),
    ("matrix", r"\begin{pmatrix} -18 \\ -49 \\ 96 \end{pmatrix}", r"$\boxed{\begin{pmatrix}-18\\-49\\96\end{pmatrix}}$",
     r"$\boxed{\begin{pmatrix} -18 \\ -49 \\ 97 \end{pmatrix}}$"),
    ("GSM8K gold", "She sells 1,000 + 234 eggs.\n#### 1,234", r"$\boxed{1,234}$", r"$\boxed{1,243}$"),
]


@pytest.mark.parametrize("shape,gold,right,wrong", SHAPES, ids=[s[0] for s in SHAPES])
def test_answer_shapes(shape, gold, right, wrong):
    assert verdict(gold, right) == ("correct", "ok")
    assert verdict(gold, wrong) == ("rejected", "wrong_answer")


@pytest.mark.parametrize("gold,answer_part", [
    ("7", r"$\boxed{7}$ or $\boxed{8}$"),
    ("7", r"$\boxed{8}$. On second thought, $\boxed{7}$."),  # far apart: still two answers
    ("7", r"$\boxed{7, 8}$"),
    ("7", r"$\boxed{7 \text{ or } 8}$"),
    ("7", r"$\boxed{1}, \boxed{2}, \boxed{3}, \boxed{4}, \boxed{5}, \boxed{6}, \boxed{7}$"),
    ("(2, 2), (6, 2)", r"$\boxed{(2, 2)}, \boxed{(6, 2)}, \boxed{(3, 3)}$"),
    ("k = 45, n = 2", r"$\boxed{k = 45}, \boxed{n = 2}, \boxed{m = 1}$"),
])
def test_hedging_is_rejected_with_its_own_reason(gold, answer_part):
    v = check_sample(f"<think>x</think>\n{answer_part}", "stop", gold, FMT)
    assert (v.verdict, v.reason) == ("rejected", "hedged_answer"), v
    assert "more distinct boxed values" in v.detail


def test_matrices_among_several_boxes():
    m = r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    assert verdict("5", rf"$\boxed{{5}}$, $\boxed{{{m}}}$") == ("rejected", "hedged_answer")
    assert verdict(m, rf"$\boxed{{{m}}}$ and again $\boxed{{{m}}}$") == ("correct", "ok")


def test_fewer_or_as_many_values_as_the_gold_is_not_a_hedge():
    assert verdict("(2, 2), (6, 2)", r"$\boxed{(2, 2)}$") == ("rejected", "wrong_answer")
    assert verdict("(2, 2), (6, 2)", r"$\boxed{(2, 2)}, \boxed{(1, 1)}$") == ("rejected", "wrong_answer")


def test_a_value_repeated_or_restated_counts_once():
    assert verdict("5", r"So $\boxed{5}$. Final answer: $\boxed{5}$.") == ("correct", "ok")
    assert verdict("5", r"So $\boxed{5}$, that is, $\boxed{x = 5}$.") == ("correct", "ok")
    # one wrong value, restated: one value against one gold value is wrong, not a hedge
    assert verdict("5", r"So $\boxed{6}$, that is, $\boxed{x = 6}$.") == ("rejected", "wrong_answer")
    assert verdict("5", r"$\boxed{6}$ and $\boxed{6}$") == ("rejected", "wrong_answer")
    assert verdict("5", r"$\boxed{\frac{10}{2}}$, i.e. $\boxed{5}$") == ("correct", "ok")
    assert answer_parts(r"\boxed{5} and \boxed{ 5 }") == ("5",)


def test_only_the_answer_part_counts():
    # stated (or hedged) in the reasoning only: not an answer
    assert verdict("7", "the answer is seven", reasoning=r"so \boxed{7}") == ("rejected", "no_boxed_answer")
    # a box in the reasoning does not make the answer part a hedge
    assert verdict("7", r"$\boxed{7}$", reasoning=r"maybe \boxed{8}?") == ("correct", "ok")
    assert verdict("7", r"$\boxed{}$") == ("rejected", "no_boxed_answer")


def test_gold_parts():
    assert gold_parts(r"\boxed{2}, \boxed{3}, \boxed{5}") == ("2", "3", "5")
    far = r"We get \boxed{x = 1} early on. Much later, once every other case has been ruled out too, we get \boxed{4}"
    assert gold_parts(far) == ("4",)  # the last box and those just before it, as math-verify groups them
    assert gold_parts("#### 1,234") == ("1234",)
    assert gold_parts("$k = 45, n = 2$") == ("k = 45, n = 2",)
    assert gold_parts("  ") == () and gold_parts(None) == ()
    assert gold_answer(r"\boxed{2} and \boxed{3}") == "2, 3"


def test_extracted_shows_every_part():
    v = check_sample(r"<think>x</think> $\boxed{(2, 2)}$ and $\boxed{(6, 2)}$", "stop", "(2, 2), (6, 2)", FMT)
    assert v.extracted == "(2, 2), (6, 2)"


def test_a_multi_part_check_is_bounded_by_one_deadline_on_the_main_thread(monkeypatch):
    """Each part's parse is cheap or pathological; the whole check, not each part, gets the
    deadline: one timer is armed, it fires once, and nothing is left armed afterwards."""
    import signal

    armed, fired, real_setitimer, real_signal = [], [], signal.setitimer, signal.signal

    def counting_setitimer(which, seconds, interval=0.0):
        if which == signal.ITIMER_REAL and seconds > 0:
            armed.append(seconds)
        return real_setitimer(which, seconds, interval)

    def counting_signal(signum, handler):
        if signum == signal.SIGALRM and callable(handler):
            def on_alarm(*a, _handler=handler):
                fired.append(1)
                return _handler(*a)
            return real_signal(signum, on_alarm)
        return real_signal(signum, handler)

    monkeypatch.setattr(signal, "setitimer", counting_setitimer)
    monkeypatch.setattr(signal, "signal", counting_signal)
    compare_answers(("1",), ("1",))  # imports done: only the check below is counted
    armed.clear()
    parts = tuple(f"{i}^{{{i}^{{{i}^{{{i}}}}}}}" for i in range(5, 9))  # four power towers
    v = check_sample("<think>x</think> " + " ".join(f"\\boxed{{{p}}}" for p in parts), "stop", "1, 2, 3, 4", FMT)
    assert (v.verdict, v.reason) == ("error", "timeout")
    assert armed == [5.0] and len(fired) == 1  # one 5 s deadline for the whole check, not one per part
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # and the alarm is gone afterwards
    assert compare_answers(("1",), ("1",)) == "ok"


def test_a_multi_part_check_is_bounded_by_the_services_hard_deadline():
    parts = tuple(f"{i}^{{{i}^{{{i}^{{{i}}}}}}}" for i in range(5, 9))
    rows = [{"completion": "<think>x</think> " + " ".join(f"\\boxed{{{p}}}" for p in parts), "finish_reason": "stop",
             "answer": "1, 2, 3, 4", "error": None},
            {"completion": r"<think>x</think> \boxed{1}, \boxed{2}", "finish_reason": "stop", "answer": r"\{1, 2\}",
             "error": None}]
    with VerifierPool(workers=1, timeout=2.0) as pool:
        pool.equal_many([("1", "2")])  # started
        t0 = time.monotonic()
        out = pool.check_rows(rows, FMT)
        elapsed = time.monotonic() - t0
        stats = dict(pool.stats)
    assert [(o["verdict"], o["reason"]) for o in out] == [("error", "timeout"), ("correct", "ok")]
    assert stats["timeouts"] == 1  # the whole multi-part check was one job, killed once at its deadline
    assert elapsed < 300, "hang guard only (a generous deadline, not a speed check)"


def test_many_boxes_are_a_hedge_without_parsing_each(monkeypatch):
    from stages.common import checkers

    parsed = []
    real_parse = checkers._parse

    def counting_parse(ans):
        parsed.append(ans)
        return real_parse(ans)

    monkeypatch.setattr(checkers, "_parse", counting_parse)
    boxes = " ".join(f"\\boxed{{{i}^{{{i}^{{{i}^{{{i}}}}}}}}}" for i in range(5, 505))  # 500 power towers
    assert verdict("7", boxes) == ("rejected", "hedged_answer")
    assert not any("^" in p for p in parsed), parsed[:3]  # no tower was parsed
