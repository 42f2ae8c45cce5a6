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


def _metrics(per_prompt: dict[str, list[bool]], ks=(1,)) -> ReasoningMetrics:
    m = ReasoningMetrics(ks=ks)
    for pid, flags in per_prompt.items():
        for i, ok in enumerate(flags):
            m.add(pid, i, ok, "1" if ok else "0", 10, False)
    return m


def test_clustered_standard_error_matches_closed_form():
    # per-prompt means 1.0, 0.5, 0.0, 0.25: SE = sd(ddof=1) / sqrt(4)
    m = _metrics({"a": [True] * 4, "b": [True, True, False, False], "c": [False] * 4, "d": [True, False, False, False]})
    s = m.summary()
    means = [1.0, 0.5, 0.0, 0.25]
    mu = sum(means) / 4
    se = (sum((x - mu) ** 2 for x in means) / 3 / 4) ** 0.5
    assert s["pass@1"] == pytest.approx(mu)
    assert s["pass@1_se"] == pytest.approx(se)
    assert s["pass@1_ci95"] == pytest.approx([mu - 1.96 * se, mu + 1.96 * se])
    # pass@k curve: per-prompt unbiased pass@2 values, same clustering
    p2 = [pass_at_k(4, c, 2) for c in (4, 2, 0, 1)]
    mu2 = sum(p2) / 4
    se2 = (sum((x - mu2) ** 2 for x in p2) / 3 / 4) ** 0.5
    curve = {k: (mean, se_) for k, mean, se_ in s["curves"]["pass@k"]}
    assert curve[2] == pytest.approx((mu2, se2))
    assert sorted(curve) == [1, 2, 3, 4]


def test_clustering_by_prompt_widens_the_interval():
    # 10 prompts, each all-right or all-wrong over 8 samples: the 80 samples carry the
    # information of 10 coin flips, not 80
    flags = {f"p{i}": [i < 5] * 8 for i in range(10)}
    s = _metrics(flags).summary()
    naive = (0.5 * 0.5 / 80) ** 0.5  # samples treated as independent
    assert s["pass@1"] == pytest.approx(0.5)
    assert s["pass@1_se"] == pytest.approx((0.25 * 10 / 9 / 10) ** 0.5)
    assert s["pass@1_se"] > 2.5 * naive
    # every prompt half right: no spread between prompts, clustered SE is 0
    even = _metrics({f"p{i}": [True, False] * 4 for i in range(10)}).summary()
    assert even["pass@1"] == pytest.approx(0.5) and even["pass@1_se"] == 0.0


def test_paired_difference_excludes_zero_where_unpaired_does_not():
    import random

    from stages.common.metrics import mean_se, paired_difference

    rng = random.Random(0)
    # prompts of very different difficulty; model a is 0.05 better on each one
    difficulty = {f"p{i}": rng.random() * 0.8 for i in range(60)}
    b = {p: d for p, d in difficulty.items()}
    a = {p: d + 0.05 + rng.uniform(-0.02, 0.02) for p, d in difficulty.items()}
    paired = paired_difference(a, b)
    assert paired["prompts"] == 60
    assert paired["ci95"][0] > 0  # the paired interval excludes 0
    (ma, sa), (mb, sb) = mean_se(list(a.values())), mean_se(list(b.values()))
    unpaired_se = (sa ** 2 + sb ** 2) ** 0.5
    assert ma - mb - 1.96 * unpaired_se < 0  # two separate intervals would not
    assert paired["diff"] == pytest.approx(ma - mb)
    diffs = [a[p] - b[p] for p in a]
    mu = sum(diffs) / 60
    assert paired["se"] == pytest.approx((sum((d - mu) ** 2 for d in diffs) / 59 / 60) ** 0.5)
    # only shared prompts count
    assert paired_difference({"x": 1.0, "y": 0.0}, {"y": 1.0})["prompts"] == 1


def test_errors_are_not_wrong_answers():
    m = ReasoningMetrics(ks=(1, 2))
    m.add("a", 0, True, "7", 10, False)
    m.add("a", 1, False, None, 0, False, errored=True)  # a checker timeout
    m.add("a", 2, False, "5", 12, False)
    for i in range(2):
        m.add("b", i, False, None, 0, False, errored=True)  # every sample errored
    s = m.summary()
    assert s["errored"] == 3 and s["prompts_all_errored"] == 1
    assert s["prompts"] == 1 and s["samples"] == 2
    assert s["pass@1"] == pytest.approx(0.5)  # 1 of the 2 scored samples, not 1 of 3 (or of 5)
    assert s["pass@2"] == pytest.approx(1.0)
    assert s["mean_tokens"] == pytest.approx(11)
    assert s["mean_tokens_correct"] == 10 and s["mean_tokens_wrong"] == 12
    assert s["tokens_per_correct"] == pytest.approx(22)
    assert s["accuracy_per_1k_tokens"] == pytest.approx(1000 / 22)
