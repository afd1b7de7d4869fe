"""research/candidate_ranker.py: its ROUGE-1 matches the metric's, its features never see the gold, and the
cross-fit choice finds a feature that predicts the label without using a query's own gold."""

from __future__ import annotations

import numpy as np
import pytest

from research import candidate_ranker as cr


@pytest.fixture(scope="module")
def task():
    from stepback_ray.tasks import get_task

    return get_task("LaMP_5")


def _row(i: int, gold: str) -> dict:
    cands = [
        "Graph Networks for Protein Folding",
        "ProteinGraph: Folding with Graph Networks",
        "A Study of Folding",
        "",
        "Protein Folding",
    ]
    return {
        "query_id": f"q{i}",
        "user_id": f"u{i}",
        "gold": gold,
        "candidates": cands,
        "output": cands[0],
        "rouge1": 0.5,
        "input": "Generate a title for the following abstract of a paper: We fold proteins "
        "with graph networks and call it ProteinGraph.",
    }


def _synthetic(n_users: int = 40, k: int = 8, seed: int = 0) -> list:
    """Queries whose label is exactly one feature (distinct values), the others noise; one candidate unparseable."""
    rng = np.random.default_rng(seed)
    j = list(cr.FEATURES).index("input precision")
    out = []
    for u in range(n_users):
        X = rng.normal(size=(k, len(cr.FEATURES)))
        X[:, j] = rng.permutation(k).astype(float)
        ok = np.ones(k, bool)
        ok[int(np.argmax(X[:, j]))] = u % 4 != 0  # every 4th query: its best candidate does not parse
        out.append(cr.Query(f"q{u}", f"u{u}", X, X[:, j] / 10, ok, 0.0, True))
    return out


def test_r1_is_the_metric(task):
    from stepback_ray.evaluation.metrics import rouge

    pairs = [
        ("ProteinGraph: Folding with Graph Networks", "Graph networks fold proteins"),
        ("A a a b", "a b b c"),
        ("", "anything"),
        ("Same words", "same WORDS"),
    ]
    for a, b in pairs:
        assert cr.r1(cr.unigrams(a), cr.unigrams(b))[2] == pytest.approx(rouge(a, b)[0])


def test_features_never_see_the_gold(task):
    person = cr.Person(["GraphFold: Proteins as Graphs", "Learning to Fold"], "Keywords: protein folding")
    a = cr.build_query(task, _row(0, "Graph Networks for Protein Folding"), person)
    b = cr.build_query(task, _row(0, "Something else entirely"), person)
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.y, b.y)
    assert not a.ok[3]  # the empty candidate: unparseable, never chosen


def test_features_a_mode_lacks_are_zero(task):
    names = list(cr.FEATURES)
    hist = [names.index(f) for f in cr.HISTORY]
    prof = [names.index(f) for f in cr.PROFILE]
    none = cr.build_query(task, _row(0, "g"), None).X
    rag = cr.build_query(task, _row(0, "g"), cr.Person(["Protein Folding Networks: A Graph View"], None)).X
    assert not none[:, hist + prof].any()
    assert rag[:, hist].any() and not rag[:, prof].any()


def test_crossfit_finds_the_predictive_feature():
    queries = _synthetic()
    fold = cr.folds_of([q.user_id for q in queries], 10, 0)
    chosen = cr.crossfit(queries, fold, alpha=1.0)
    for q in queries:
        best = int(np.argmax(np.where(q.ok, q.y, -np.inf)))
        assert chosen[q.query_id] == best and q.ok[chosen[q.query_id]]


def test_a_querys_own_gold_never_reaches_its_choice():
    queries = _synthetic()
    fold = cr.folds_of([q.user_id for q in queries], 10, 0)
    before = cr.crossfit(queries, fold, alpha=1.0)
    for target in (queries[1], queries[7]):
        saved = target.y
        target.y = -1000 * saved  # the worst candidate is now the best, by a margin that would swamp any fit
        after = cr.crossfit(queries, fold, alpha=1.0)
        assert after[target.query_id] == before[target.query_id]
        target.y = saved


def test_no_fold_trains_on_the_queries_it_chooses_for(monkeypatch):
    queries = _synthetic()
    fold = cr.folds_of([q.user_id for q in queries], 10, 0)
    trained_on, fit = [], cr.fit
    monkeypatch.setattr(
        cr, "fit", lambda train, alpha: trained_on.append({q.user_id for q in train}) or fit(train, alpha)
    )
    cr.crossfit(queries, fold, alpha=1.0)
    assert len(trained_on) == 10
    for f, users in enumerate(trained_on):
        assert users and all(fold[u] != f for u in users)


def test_folds_group_users():
    fold = cr.folds_of(["a", "b", "a", "c", "d"], 2, 0)
    assert set(fold) == {"a", "b", "c", "d"} and sorted(fold.values()) == [0, 0, 1, 1]
