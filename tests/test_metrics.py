"""ROUGE against values computed by hand."""

from __future__ import annotations

import pytest

from stepback_ray import metrics


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
