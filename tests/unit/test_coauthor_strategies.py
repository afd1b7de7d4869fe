"""The co-author strategies of PSW (``multi_author.strategy``, declared in stepback_ray/modes.py): each one's
prompts, merge and choice, without a model; and the strategies that keep a proposal or merge with context through
the generation pass on the dry-run engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stepback_ray.config import MultiAuthorConfig, RetrievalConfig, load_job
from stepback_ray.data import Query, read_lamp
from stepback_ray.generation.prompting import keeps_a_proposal, merge_prompt, needs_merge_call, plan_generation
from stepback_ray.generation.retrieval import BM25Retriever, authors_pool, weighted
from stepback_ray.modes import AUTHOR_STRATEGIES
from stepback_ray.tasks import TASKS
from tests.support import FIXTURES, REPO

PSW = TASKS["PSW_title"]
PROFILES = {"Cy": "Keywords: benchmarks", "Ada": "Keywords: sparse attention", "Bo": "Keywords: retrieval"}


def _paper() -> Query:  # three authors: Cy (lead), Ada, Bo
    return read_lamp(str(FIXTURES / "PSW_title_questions.json"), str(FIXTURES / "PSW_title_outputs.json"), PSW)[1]


def _plan(formatter, strategy, q=None, mode="profile+rag", retriever=None, top_k=2, **multi):
    return plan_generation(
        PSW,
        q or _paper(),
        mode,
        PROFILES,
        {},
        RetrievalConfig(top_k=top_k),
        MultiAuthorConfig(strategy=strategy, **multi),
        retriever or BM25Retriever(),
        formatter,
        16,
    )


def test_every_declared_strategy_is_a_config_value_and_plans_a_prompt(formatter):
    assert set(MultiAuthorConfig.model_fields["strategy"].annotation.__args__) == set(AUTHOR_STRATEGIES)
    with pytest.raises(ValueError, match="strategy"):
        MultiAuthorConfig(strategy="telepathy")
    for name, spec in AUTHOR_STRATEGIES.items():
        plan = _plan(formatter, name)
        assert len(plan.prompts) == (3 if spec.proposals else 1), name
        assert needs_merge_call(plan.merge) == (spec.merge is not None), name
        assert keeps_a_proposal(plan.merge) == spec.choose, name


def test_context_merge_is_the_leads_own_prompt_with_the_proposals_after_the_input(formatter):
    plan = _plan(formatter, "context-merge")
    lead = formatter.render(plan.prompts[0].prompt)
    merged = formatter.render(merge_prompt(PSW, formatter, plan.merge, ["A", "B", "C"]))
    assert "Benchmarks for Long Documents" in lead and "Benchmarks for Long Documents" in merged  # the lead's item
    assert "benchmarks" in merged and "You are the lead author" in merged  # the lead's profile
    body = plan.merge["input"].split(": ", 1)[1]
    assert merged.index(body) < merged.index("Author 1 (you, the lead author): A\nAuthor 2: B\nAuthor 3: C")
    assert merged.count("<|im_start|>user") == lead.count("<|im_start|>user")  # the same turns, the last extended
    plain = merge_prompt(
        PSW, type("Plain", (), {"family": "plain"})(), {**plan.merge, "lead_prompt": "P\nTitle:"}, ["A"]
    )
    tail = "Author 1 (you, the lead author): A\nWrite the final title, keeping what is best in the proposals.\nTitle:"
    assert plain.startswith("P\nYour co-authors") and plain.endswith(tail)


def test_keep_merge_lets_the_lead_keep_a_proposal_and_lead_merge_asks_for_a_merge(formatter):
    keep = _plan(formatter, "keep-merge")
    text = formatter.render(merge_prompt(PSW, formatter, keep.merge, ["A", "B", "C"]))
    assert "reply with it exactly as written" in text and "Author 2: B" in text
    merge = _plan(formatter, "lead-merge")
    text = formatter.render(merge_prompt(PSW, formatter, merge.merge, ["A", "B", "C"]))
    assert "keeping what is best" in text and "exactly as written" not in text
    legacy = {k: v for k, v in merge.merge.items() if k not in ("kind", "choose", "strategy")}
    assert needs_merge_call(legacy) and not keeps_a_proposal(legacy)  # a merge planned before kinds existed


class FixedScores:
    """A retriever scoring each document by a fixed value per title word."""

    def __init__(self, scores: dict[str, float]):
        self.by_title = scores

    def scores(self, query, docs):
        return np.array([next((v for t, v in self.by_title.items() if t in d), 0.0) for d in docs])


def test_byline_rag_retrieves_from_every_author_weighted_by_byline_position(formatter):
    q = _paper()
    scores = FixedScores({"Benchmarks": 1.0, "Efficient Sparse": 1.2, "Retrieval-Augmented": 3.0})
    even = _plan(formatter, "byline-rag", q, retriever=scores, top_k=1, byline_decay=1.0)
    ids = {it["title"]: it["id"] for h in q.histories for it in h}
    assert even.retrieved_ids == [ids["Retrieval-Augmented Generation at Scale"]]  # the best score wins
    steep = _plan(formatter, "byline-rag", q, retriever=scores, top_k=1, byline_decay=0.3)
    assert steep.retrieved_ids == [ids["Benchmarks for Long Documents"]]  # 1.0 against 1.2 * 0.3 and 3 * 0.09
    text = formatter.render(steep.prompts[0].prompt)
    assert "benchmarks" in text and "sparse attention" not in text  # the lead's profile only
    assert [p.user_id for p in steep.people] == ["Cy", "Ada", "Bo"]
    concat = _plan(formatter, "concat", q, retriever=scores, top_k=1)
    assert concat.retrieved_ids == [ids["Retrieval-Augmented Generation at Scale"]]  # unweighted union


def test_authors_pool_keeps_each_item_once_at_its_best_byline_position():
    a, b, c = ({"id": i} for i in "abc")
    pool, w = authors_pool([[a], [b, a], [c]], 0.5)
    assert [it["id"] for it in pool] == ["a", "b", "c"] and w == [1.0, 0.5, 0.25]
    assert authors_pool([[a], [a, b]])[1] is None
    out = weighted(np.array([2.0, -1.0, -np.inf]), [0.5, 0.5, 0.5])
    assert list(out) == [1.0, -2.0, -np.inf]  # a smaller weight ranks lower whatever the sign


def _run(tmp_path, strategy: str, *more: str) -> Path:
    """PSW_title's fixture papers through the pipeline (dry-run engine, in process) under ``strategy``; the output."""
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "task=PSW_title",
            f"input.questions={FIXTURES / 'PSW_title_questions.json'}",
            f"input.outputs={FIXTURES / 'PSW_title_outputs.json'}",
            f"output={tmp_path / strategy}",
            "limit=null",
            "engine.kind=dry-run",
            "executor=in-process",
            "ray.progress_bars=false",
            f"multi_author.strategy={strategy}",
            *more,
        ],
    )
    from stepback_ray.pipeline import run_job

    run_job(job)
    return tmp_path / strategy


def test_the_pass_keeps_a_proposal_under_consensus_without_a_merge_call(tmp_path):
    """Through the generation pass (dry-run engine, in process): ``consensus`` makes no merge call and samples no
    candidates (it chooses among the proposals), its answer is one of them and its prompt that author's (the merge
    strategies share lead-merge's path: only their merge prompt differs, tested above)."""
    authors = {q["id"]: len(q["authors"]) for q in json.loads((FIXTURES / "PSW_title_questions.json").read_text())}
    out = _run(tmp_path, "consensus", "modes=[profile+rag]", "generation.candidates=3")
    chosen = pd.read_parquet(out / "generations")
    assert len(chosen) == len(authors)
    for r in chosen.itertuples():
        assert r.llm_calls == authors[r.query_id] and len(r.proposals) == authors[r.query_id]
        assert r.raw_output in list(r.proposals) and r.candidates is None
        assert any(n.startswith("kept the proposal of author") for n in r.notes)
        assert "You are the lead author" not in r.prompt and "Generate a title" in r.prompt


def _profiled_and_borrowed(tmp_path, strategy: str) -> tuple[set[str], dict[str, list[str]]]:
    out = _run(tmp_path, strategy, "modes=[profile+rag,random-profile]")
    profiled = set(pd.read_parquet(out / "profiles").user_id)
    rows = pd.read_parquet(out / "generations")
    borrowed = {r.query_id: list(r.context_user_ids) for r in rows.itertuples() if r.mode == "random-profile"}
    assert rows.profile_fingerprint.notna().all()  # every profile a prompt shows exists, a donor's included
    return profiled, borrowed


def test_only_the_authors_whose_profile_a_prompt_shows_are_profiled(tmp_path):
    """``byline-rag`` shows the lead's profile alone: the co-authors are retrieved from, never profiled, and each
    lead's random-profile donor is another lead (whose profile exists); ``lead-merge`` profiles every author."""
    papers = json.loads((FIXTURES / "PSW_title_questions.json").read_text())
    leads = {q["authors"][0]["user_id"] for q in papers}
    everyone = {a["user_id"] for q in papers for a in q["authors"]}
    assert len(everyone) > len(leads)
    profiled, borrowed = _profiled_and_borrowed(tmp_path, "byline-rag")
    assert profiled == leads
    for q in papers:
        lead = q["authors"][0]["user_id"]
        assert borrowed[q["id"]][0] in leads - {lead}
    profiled, _ = _profiled_and_borrowed(tmp_path, "lead-merge")
    assert profiled == everyone


def test_a_lead_borrows_another_leads_profile_where_there_is_one():
    """Under a strategy that profiles lead authors only, a lead's random-profile donor is another lead (whose
    profile exists); a lead alone in its chunk, and every co-author (whose history alone a prompt shows), keeps the
    pairing over all users; with every user a lead (single-author tasks) nothing changes."""
    from stepback_ray.data import donors

    users = ["a", "b", "c", "d", "e"]
    everyone = donors(users, 0)
    two = donors(users, 0, leads=["a", "b", "z"])
    assert (two["a"], two["b"]) == ("b", "a")
    assert {u: two[u] for u in "cde"} == {u: everyone[u] for u in "cde"}
    assert donors(users, 0, leads=["a"]) == everyone == donors(users, 0, leads=users)


def test_a_run_that_writes_a_profile_store_profiles_every_author(tmp_path):
    from stepback_ray.pipeline.profile_pass import profiled_authors

    def job(*more: str):
        return load_job(REPO / "jobs" / "psw_title.yaml", [f"output={tmp_path}", *more])

    assert profiled_authors(job()) == "lead" and profiled_authors(job(), "profile") == "all"
    assert profiled_authors(job(f"profile_store.uri={tmp_path / 'store'}")) == "all"
    assert profiled_authors(job("multi_author.strategy=concat")) == "all"
    assert profiled_authors(job("modes=[none,rag]")) is None
