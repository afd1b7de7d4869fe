"""Retrieval over one user's own history: which past items to show the model for this query.

BM25 uses ``bm25s`` (sparse-matrix BM25, English stopwords removed). Ties, including the no-overlap case where
every score is 0, keep history order, so retrieval is deterministic.
"""

from __future__ import annotations

import bm25s
import numpy as np


def bm25_scores(query: str, docs: list[str]) -> np.ndarray:
    """BM25 score of every document for ``query``."""
    if not docs:
        return np.zeros(0)
    corpus = bm25s.tokenize(docs, stopwords="en", show_progress=False)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    q = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
    if not q:
        return np.zeros(len(docs))
    return np.asarray(retriever.get_scores(q), dtype=float)


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` best scores, best first; ties keep the original order."""
    if k <= 0 or len(scores) == 0:
        return []
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(i) for i in order[:k]]


def bm25_top_k(query: str, docs: list[str], k: int) -> list[int]:
    return top_k(bm25_scores(query, docs), k)
