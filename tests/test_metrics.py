from itertools import combinations
from math import comb

import pytest

from stages.common.metrics import ReasoningMetrics, maj_at_k, pass_at_k


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        flags = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(flags, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_form_and_edges():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - comb(7, 5) / comb(10, 5))
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_maj_at_k_majority_and_ties():
    # clear majority of a wrong answer
    assert maj_at_k([("5", False), ("5", False), ("7", True)], 3) == 0.0
    # clear majority of the right answer
    assert maj_at_k([("7", True), ("5", False), ("7", True)], 3) == 1.0
    # two-way tie, one correct: expected score of a random tie-break
    assert maj_at_k([("7", True), ("5", False)], 2) == 0.5
    # three-way tie, one correct
    assert maj_at_k([("1", False), ("2", True), ("3", False)], 3) == pytest.approx(1 / 3)
    # samples without an answer do not vote
    assert maj_at_k([(None, False), (None, False), ("7", True)], 3) == 1.0
    assert maj_at_k([(None, False), (None, False)], 2) == 0.0
    # only the first k samples vote
    assert maj_at_k([("5", False), ("7", True), ("7", True)], 1) == 0.0


def test_reasoning_metrics_summary():
    m = ReasoningMetrics(ks=(1, 2, 4))
    # prompt a: 2 of 4 correct; prompt b: 0 of 4
    for i, ok in enumerate([True, False, True, False]):
        m.add("a", i, ok, "7" if ok else "5", 10, False)
    for i in range(4):
        m.add("b", i, False, None, 20, i == 0)
    s = m.summary()
    assert s["prompts"] == 2 and s["samples"] == 8
    assert s["pass@1"] == pytest.approx(0.25)
    assert s["pass@2"] == pytest.approx((pass_at_k(4, 2, 2) + 0) / 2)
    assert s["pass@4"] == pytest.approx(0.5)
    assert s["maj@4"] == pytest.approx(0.25)  # a ties 2-2 -> 0.5, b has no votes -> 0
    assert s["mean_tokens"] == pytest.approx(15)
    assert s["truncated_rate"] == pytest.approx(1 / 8)
