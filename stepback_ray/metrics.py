"""Scores equal to the official LaMP evaluation.

LaMP_4-7 (and PSW) use ROUGE-1 and ROUGE-L F-measure from Google's ``rouge-score`` (what HF ``evaluate``'s
``rouge`` wraps; defaults: no stemming, its default tokenizer), on stripped strings, averaged over queries.
(``evaluate`` reports the median of a bootstrap of the mean, which equals the mean to within sampling noise.)
"""

from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge(prediction: str, gold: str) -> tuple[float, float]:
    """(ROUGE-1 F, ROUGE-L F) of one prediction against one gold."""
    s = _scorer().score(gold.strip(), prediction.strip())
    return s["rouge1"].fmeasure, s["rougeL"].fmeasure


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
