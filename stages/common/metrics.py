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

Uncertainty (Miller 2024, "Adding Error Bars to Evals"): every score is first
averaged within a prompt, then over prompts, and its standard error is the
clustered one, the standard deviation of the per-prompt scores over the number of
prompts (ddof 1). Samples of one prompt are not independent, so this is wider than
the naive ``sqrt(p(1-p)/samples)`` whenever prompts differ in difficulty. 95%
intervals are mean ± 1.96 SE, clipped to [0, 1]. Paired differences between two
models on the same prompts use the per-prompt differences the same way
(:func:`paired_difference`), which cancels the prompts' shared difficulty.

Infrastructure errors (verdict ``error``: a checker timeout, a crashed checker,
an engine error) are not wrong answers: they are left out of every score and
counted as ``errored``; a prompt whose samples all errored is left out and counted
as ``prompts_all_errored``.
"""
from __future__ import annotations

import math
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


Z95 = 1.96


@dataclass
class _Sample:
    index: int
    correct: bool
    answer: str | None
    tokens: int
    truncated: bool
    errored: bool = False
    reason: str | None = None


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (ddof 1; 0.0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def ci95(mean: float, se: float) -> list[float]:
    return [max(0.0, mean - Z95 * se), min(1.0, mean + Z95 * se)]


def paired_difference(a: dict[str, float], b: dict[str, float]) -> dict:
    """Mean per-prompt difference ``a - b`` over the prompts both score, with its paired SE."""
    shared = sorted(set(a) & set(b))
    diffs = [a[p] - b[p] for p in shared]
    mean, se = mean_se(diffs)
    return {"diff": mean, "se": se, "ci95": [mean - Z95 * se, mean + Z95 * se], "prompts": len(shared)}


@dataclass
class ReasoningMetrics:
    """Accumulates samples per prompt, then summarises them for a list of k."""

    ks: tuple[int, ...] = (1,)
    _by_prompt: dict[str, list[_Sample]] = field(default_factory=lambda: defaultdict(list))

    def add(self, prompt_id: str, sample_index: int, correct: bool, answer: str | None, tokens: int, truncated: bool,
            errored: bool = False, reason: str | None = None) -> None:
        self._by_prompt[prompt_id].append(_Sample(sample_index, bool(correct) and not errored, answer, int(tokens),
                                                  bool(truncated), bool(errored), reason))

    def errored_reasons(self) -> dict[str, int]:
        """Errored samples per reason (``timeout``, ``checker_error``, ``generation_error`` ...)."""
        return dict(Counter(x.reason or "error" for s in self._by_prompt.values() for x in s if x.errored))

    def _scored(self) -> dict[str, list[_Sample]]:
        """Per prompt, its samples that were scored (not errored), in sample order."""
        out = {}
        for pid, samples in self._by_prompt.items():
            kept = sorted((x for x in samples if not x.errored), key=lambda x: x.index)
            if kept:
                out[pid] = kept
        return out

    def per_prompt(self, metric: str = "pass@1") -> dict[str, float]:
        """Each scored prompt's value of ``pass@k`` or ``maj@k`` (what paired comparisons use)."""
        kind, k = metric.split("@")
        k = int(k)
        out = {}
        for pid, s in self._scored().items():
            if k > len(s):
                continue
            if kind == "pass":
                out[pid] = pass_at_k(len(s), sum(x.correct for x in s), k)
            elif kind == "maj":
                out[pid] = maj_at_k([(x.answer, x.correct) for x in s], k)
            else:
                raise ValueError(f"unknown metric {metric!r} (pass@k or maj@k)")
        return out

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per scored prompt: (scored samples, correct samples)."""
        return {pid: (len(s), sum(x.correct for x in s)) for pid, s in self._scored().items()}

    def summary(self) -> dict:
        scored = self._scored()
        all_samples = [x for s in self._by_prompt.values() for x in s]
        errored = sum(x.errored for x in all_samples)
        out: dict = {"prompts": len(scored), "samples": len(all_samples) - errored, "errored": errored,
                     "errored_reasons": self.errored_reasons(),
                     "prompts_all_errored": len(self._by_prompt) - len(scored)}
        if not scored:
            return out
        samples = [x for s in scored.values() for x in s]
        n_min = min(len(s) for s in scored.values())
        curves: dict[str, list] = {"pass@k": [], "maj@k": []}
        for kind in ("pass", "maj"):
            for k in range(1, n_min + 1):
                mean, se = mean_se(list(self.per_prompt(f"{kind}@{k}").values()))
                curves[f"{kind}@k"].append([k, mean, se])
                if k == 1 and kind == "maj":
                    continue
                if k in self.ks or k == n_min:
                    out[f"{kind}@{k}"] = mean
                    out[f"{kind}@{k}_se"] = se
                    out[f"{kind}@{k}_ci95"] = ci95(mean, se)
        correct = [x for x in samples if x.correct]
        wrong = [x for x in samples if not x.correct]
        tokens = sum(x.tokens for x in samples)
        out["mean_tokens"] = tokens / len(samples)
        out["mean_tokens_correct"] = sum(x.tokens for x in correct) / len(correct) if correct else None
        out["mean_tokens_wrong"] = sum(x.tokens for x in wrong) / len(wrong) if wrong else None
        out["tokens_per_correct"] = tokens / len(correct) if correct else None
        out["accuracy_per_1k_tokens"] = 1000 * len(correct) / tokens if tokens else 0.0
        out["truncated_rate"] = sum(x.truncated for x in samples) / len(samples)
        out["curves"] = curves
        return out
