"""ROUGE against values computed by hand."""

from __future__ import annotations

import pytest

from stepback_ray.evaluation import metrics


def test_rouge_by_hand():
    # pred: "the cat sat on the mat" (6 tokens), gold: "the cat lay on the mat" (6 tokens)
    # unigram overlap: the x2, cat, on, mat = 5 -> P = R = 5/6 -> F1 = 5/6
    # LCS: the cat _ on the mat = 5 -> ROUGE-L F = 5/6
    r1, rl = metrics.rouge("the cat sat on the mat", "the cat lay on the mat")
    assert r1 == pytest.approx(5 / 6)
    assert rl == pytest.approx(5 / 6)


def test_rouge_order_matters_only_for_l():
    # pred "mat the on sat cat the" has the same unigrams as the gold "the cat sat on the mat" -> ROUGE-1 = 1;
    # their longest common subsequence is 3 tokens ("the on the") -> ROUGE-L = 3/6
    r1, rl = metrics.rouge("mat the on sat cat the", "the cat sat on the mat")
    assert r1 == pytest.approx(1.0)
    assert rl == pytest.approx(3 / 6)


def test_rouge_tokenization_lowercases_and_drops_punctuation():
    # rouge-score's default tokenizer: lower case, non-alphanumerics become spaces, no stemming
    r1, _ = metrics.rouge("Sparse Attention: Long-Documents!", "sparse attention long documents")
    assert r1 == pytest.approx(1.0)
    r1, _ = metrics.rouge("transformers", "transformer")  # no stemming
    assert r1 == 0.0


def test_partial_overlap_f_measure():
    # pred 2 tokens, gold 4 tokens, overlap 2 -> P = 1, R = 0.5 -> F = 2/3
    r1, rl = metrics.rouge("graph networks", "graph neural networks everywhere")
    assert r1 == pytest.approx(2 / 3)
    assert rl == pytest.approx(2 / 3)
    assert metrics.rouge("", "anything") == (0.0, 0.0)
    assert metrics.mean([0.5, 1.0]) == 0.75 and metrics.mean([]) is None


# ------------------------------------------------------------------------------ official LaMP metrics by hand
from stepback_ray.tasks import TASKS  # noqa: E402


def test_classification_accuracy_and_macro_f1_count_unparseable_as_wrong():
    golds = ["sci-fi", "comedy", "comedy", "action"]
    preds = ["sci-fi", "comedy", "action", "not a tag"]
    # accuracy 2/4. Per-label F1 over the 15 movie tags: sci-fi 1, comedy (P 1, R 1/2) 2/3, action 0, the other
    # 12 labels 0 (no support, no predictions); the unparseable answer adds no class -> macro F1 = (5/3)/15 = 1/9
    m = metrics.aggregate(TASKS["LaMP_2"], preds, golds)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(1 / 9)
    # LaMP_1: y_true [1],[2],[1]; y_pred [1],[1],? -> accuracy 1/3; F1([1]) = 1/2, F1([2]) = 0 -> macro 1/4
    m = metrics.aggregate(TASKS["LaMP_1"], ["[1]", "[1]", "maybe"], ["[1]", "[2]", "[1]"])
    assert m == pytest.approx({"accuracy": 1 / 3, "f1": 0.25})


def test_rating_mae_rmse_score_unparseable_as_the_farther_extreme():
    # errors: |1-1| = 0, |2-5| = 3, 'oops' with gold 3 -> 5 (1 and 5 are equally far; the official code picks 5)
    # -> 2, |4.5-4| = 0.5. MAE = 5.5/4; RMSE = sqrt((0 + 9 + 4 + 0.25)/4)
    m = metrics.aggregate(TASKS["LaMP_3"], ["1", "2", "oops", "4.5"], ["1", "5", "3", "4"])
    assert m["MAE"] == pytest.approx(1.375)
    assert m["RMSE"] == pytest.approx((13.25 / 4) ** 0.5)
    assert metrics.rating_value(None, "2") == 5.0 and metrics.rating_value("x", "4") == 1.0


def test_per_row_scores_average_to_the_headline_metric():
    preds, golds = ["1", "2", None], ["1", "5", "3"]
    rows = [metrics.score_row(TASKS["LaMP_3"], p, g)["score"] for p, g in zip(preds, golds)]
    assert sum(rows) / 3 == pytest.approx(metrics.aggregate(TASKS["LaMP_3"], preds, golds)["MAE"])
    rows = [metrics.score_row(TASKS["LaMP_2"], p, g)["score"] for p, g in zip(["comedy", None], ["comedy", "action"])]
    assert rows == [1.0, 0.0]


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_data():
    rng = __import__("numpy").random.default_rng(1)
    small, large = rng.normal(0.3, 0.1, 30), rng.normal(0.3, 0.1, 3000)
    lo, hi = metrics.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = metrics.bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 5


def test_bootstrap_in_batches_equals_the_one_matrix_bootstrap():
    """Drawing resamples a few at a time (bounded memory) gives the interval of one resamples-by-rows matrix."""
    np = __import__("numpy")
    values = np.random.default_rng(2).normal(0.3, 0.1, 9000)  # 4M // 9000 = 444 resamples per batch
    idx = np.random.default_rng(0).integers(0, len(values), size=(1000, len(values)))
    expected = np.quantile(values[idx].mean(axis=1), [0.025, 0.975])
    assert metrics.bootstrap_ci(values, n_resamples=1000) == pytest.approx(tuple(expected), rel=1e-12)
