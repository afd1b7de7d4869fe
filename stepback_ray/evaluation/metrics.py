"""Scores equal to the official LaMP evaluation, per row and per run, with bootstrap intervals.

The official script (LaMP ``eval/evaluation.py``) computes, through HF ``evaluate`` (which wraps scikit-learn and
Google's ``rouge-score``):

- LaMP_1 / LaMP_2: ``accuracy`` and macro ``f1`` over the task's label list. A prediction that is not a label is
  mapped to -1: it counts as wrong and adds no class of its own.
- LaMP_3: ``MAE`` and ``RMSE``. A prediction that is not a number is scored as whichever of 1 and 5 is farther
  from the gold.
- LaMP_4-7 (and PSW): ``rouge-1`` and ``rouge-L`` F-measure (no stemming, rouge-score's tokenizer) of stripped
  strings, averaged over queries (``evaluate`` reports the median of a bootstrap of the mean, which equals the mean
  to within sampling noise).

Per row, every task gets one number ``score`` that averages to its headline metric (ROUGE-1, correctness, or
absolute error), so intervals can be bootstrapped the same way for every task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from stepback_ray.tasks import TaskSpec

OFFICIAL_KEYS = {"rouge": ("rouge-1", "rouge-L"), "accuracy_f1": ("accuracy", "f1"), "mae_rmse": ("MAE", "RMSE")}
HIGHER_IS_BETTER = {"rouge": True, "accuracy_f1": True, "mae_rmse": False}


NO_GOLDS = "no golds"


def unscored_reason(modes: dict[str, dict]) -> str | None:
    """Why a run's metrics hold no score at all: :data:`NO_GOLDS` when it generated rows and none of them had a
    gold (an input without golds: predictions only). None when some row was scored."""
    rows = [m for m in modes.values() if m.get("queries")]
    if rows and all(m.get("scored") == 0 for m in rows):
        return NO_GOLDS
    return None


def score_notes(metrics: dict) -> list[str]:
    """What a metrics table's score columns leave unsaid: ``not scored: no golds`` for a run without golds, or,
    per mode, how many of its queries the scores cover when only some had a gold; and, per mode, how many answers
    stopped at the length cap (``generation.max_new_tokens``): cut short, they score low without an error."""
    cap = metrics.get("max_new_tokens")
    capped = [
        f"{mode}: {m['at_length_cap']} of {m['queries']} answers stopped at generation.max_new_tokens"
        + (f" ({cap} tokens)" if cap else "")
        + ": they may be cut short"
        for mode, m in metrics["modes"].items()
        if m.get("at_length_cap")
    ]
    reason = metrics.get("not_scored") or unscored_reason(metrics["modes"])
    if reason:
        return [f"not scored: {reason}", *capped]
    return [
        f"{mode}: scored on {m['scored']} of {m['queries']} queries (the others have no gold)"
        for mode, m in metrics["modes"].items()
        if m.get("scored") is not None and 0 < m["scored"] < m["queries"]
    ] + capped


@lru_cache(maxsize=1)
def _scorer():
    # imported here: rouge_score pulls in nltk (1.5 s), and every Ray worker that imports the pipeline (stage
    # actors of passes that never score) would pay it at start
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)


def rouge(prediction: str, gold: str) -> tuple[float, float]:
    """(ROUGE-1 F, ROUGE-L F) of one prediction against one gold."""
    s = _scorer().score(gold.strip(), prediction.strip())
    return s["rouge1"].fmeasure, s["rougeL"].fmeasure


def rating_value(prediction: str | None, gold: str) -> float:
    """A LaMP_3 prediction as a number; an unreadable one becomes the farther of 1 and 5 from the gold."""
    try:
        return float(str(prediction).strip())
    except (TypeError, ValueError):
        g = float(gold)
        return 1.0 if abs(1 - g) > abs(5 - g) else 5.0


def label_index(labels: Sequence[str], value: str | None) -> int:
    try:
        return list(labels).index(str(value).strip())
    except ValueError:
        return -1


def score_row(task: TaskSpec, prediction: str | None, gold: str) -> dict[str, float]:
    """Per-row scores: ``score`` (the row's share of the headline metric) and the task's extra columns."""
    if task.metric == "rouge":
        r1, rl = rouge(prediction or "", gold)
        return {"score": r1, "rouge1": r1, "rougeL": rl}
    if task.metric == "accuracy_f1":
        ok = label_index(task.labels, prediction) == label_index(task.labels, gold) != -1
        return {"score": float(ok)}
    err = abs(rating_value(prediction, gold) - float(gold))
    return {"score": err, "abs_error": err}


def aggregate(task: TaskSpec, predictions: Sequence[str | None], golds: Sequence[str]) -> dict[str, float | None]:
    """The official metrics of a set of predictions, with the official keys."""
    if not golds:
        return {k: None for k in OFFICIAL_KEYS[task.metric]}
    if task.metric == "rouge":
        pairs = [rouge(p or "", g) for p, g in zip(predictions, golds)]
        return {"rouge-1": float(np.mean([p[0] for p in pairs])), "rouge-L": float(np.mean([p[1] for p in pairs]))}
    if task.metric == "accuracy_f1":
        y_pred = [label_index(task.labels, p) for p in predictions]
        y_true = [label_index(task.labels, g) for g in golds]
        return _accuracy_f1(y_true, y_pred, len(task.labels))
    err = np.array([rating_value(p, g) for p, g in zip(predictions, golds)]) - np.array([float(g) for g in golds])
    return {"MAE": float(np.mean(np.abs(err))), "RMSE": float(math.sqrt(np.mean(err**2)))}


def _accuracy_f1(y_true: list[int], y_pred: list[int], n_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 over every label (sklearn imported here: a second at start for processes that
    never score a classification task)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, labels=list(range(n_labels)), average="macro", zero_division=0)),
    }


class MetricAccumulator:
    """The official metrics of a stream of scored rows, without holding the rows: sums of the per-row scores
    (ROUGE, absolute error) and, for classification, the label indices. Equal to :func:`aggregate` on the same
    predictions."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.n = 0
        self.sums = {"rouge1": 0.0, "rougeL": 0.0, "abs_error": 0.0, "sq_error": 0.0}
        self.y_true: list[int] = []
        self.y_pred: list[int] = []

    def add(
        self,
        prediction: str | None,
        gold: str,
        rouge1: float | None = None,
        rougeL: float | None = None,
        abs_error: float | None = None,
    ) -> None:
        self.n += 1
        if self.task.metric == "rouge":
            if rouge1 is None or rougeL is None:
                rouge1, rougeL = rouge(prediction or "", gold)
            self.sums["rouge1"] += rouge1
            self.sums["rougeL"] += rougeL
        elif self.task.metric == "accuracy_f1":
            self.y_true.append(label_index(self.task.labels, gold))
            self.y_pred.append(label_index(self.task.labels, prediction))
        else:
            err = abs_error if abs_error is not None else abs(rating_value(prediction, gold) - float(gold))
            self.sums["abs_error"] += err
            self.sums["sq_error"] += err * err

    def result(self) -> dict[str, float | None]:
        if not self.n:
            return {k: None for k in OFFICIAL_KEYS[self.task.metric]}
        if self.task.metric == "rouge":
            return {"rouge-1": self.sums["rouge1"] / self.n, "rouge-L": self.sums["rougeL"] / self.n}
        if self.task.metric == "accuracy_f1":
            return _accuracy_f1(self.y_true, self.y_pred, len(self.task.labels))
        return {"MAE": self.sums["abs_error"] / self.n, "RMSE": math.sqrt(self.sums["sq_error"] / self.n)}


def bootstrap_ci(
    values: Sequence[float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    statistic: Callable[[np.ndarray], float] = np.mean,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over ``values`` (resampling rows with replacement).

    Resamples are drawn a few at a time (at most ~4M indices in memory), not as one resamples-by-rows matrix:
    over a million rows that matrix alone would take gigabytes."""
    arr = np.asarray(values, dtype=float)
    if len(arr) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    step = max(1, min(n_resamples, 4_000_000 // len(arr)))
    stats = np.empty(n_resamples)
    for start in range(0, n_resamples, step):
        idx = rng.integers(0, len(arr), size=(min(step, n_resamples - start), len(arr)))
        stats[start : start + len(idx)] = [statistic(arr[i]) for i in idx]
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
