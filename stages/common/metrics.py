"""Sampling metrics for reasoning evaluation, computed in one place.

- ``pass@1``: mean correctness over all samples (equal to the per-prompt
  average when every prompt has the same number of samples).
- ``pass@k``: the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k) / C(n, k)`` per prompt, averaged over prompts.
- ``maj@k``: majority vote over the extracted answers of a prompt's first ``k``
  samples (by sample index). Samples with no extracted answer do not vote. A tie
  between several answers gives the expected score of a uniformly random
  tie-break: the fraction of tied answers that are correct.
- ``mean_tokens`` and ``truncated_rate`` over all samples.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples of which ``c`` are correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i), numerically stable
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def maj_at_k(samples: list[tuple[str | None, bool]], k: int) -> float:
    """Majority-vote score for one prompt. ``samples`` are (answer key, correct) in sample order."""
    votes = Counter()
    correct_keys = set()
    for key, ok in samples[:k]:
        if key is None:
            continue
        votes[key] += 1
        if ok:
            correct_keys.add(key)
    if not votes:
        return 0.0
    top = max(votes.values())
    tied = [a for a, v in votes.items() if v == top]
    return sum(a in correct_keys for a in tied) / len(tied)


@dataclass
class _Sample:
    index: int
    correct: bool
    answer: str | None
    tokens: int
    truncated: bool


@dataclass
class ReasoningMetrics:
    """Accumulates samples per prompt, then summarises them for a list of k."""

    ks: tuple[int, ...] = (1,)
    _by_prompt: dict[str, list[_Sample]] = field(default_factory=lambda: defaultdict(list))

    def add(self, prompt_id: str, sample_index: int, correct: bool, answer: str | None, tokens: int, truncated: bool) -> None:
        self._by_prompt[prompt_id].append(_Sample(sample_index, bool(correct), answer, int(tokens), bool(truncated)))

    def summary(self) -> dict:
        prompts = list(self._by_prompt.values())
        if not prompts:
            return {"prompts": 0, "samples": 0}
        for s in prompts:
            s.sort(key=lambda x: x.index)
        n_min = min(len(s) for s in prompts)
        all_samples = [x for s in prompts for x in s]
        out: dict = {
            "prompts": len(prompts),
            "samples": len(all_samples),
            "pass@1": sum(x.correct for x in all_samples) / len(all_samples),
        }
        for k in self.ks:
            if k > n_min or k == 1:
                continue
            out[f"pass@{k}"] = sum(pass_at_k(len(s), sum(x.correct for x in s), k) for s in prompts) / len(prompts)
        for k in self.ks:
            if k <= n_min:
                out[f"maj@{k}"] = sum(maj_at_k([(x.answer, x.correct) for x in s], k) for s in prompts) / len(prompts)
        out["mean_tokens"] = sum(x.tokens for x in all_samples) / len(all_samples)
        out["truncated_rate"] = sum(x.truncated for x in all_samples) / len(all_samples)
        return out
