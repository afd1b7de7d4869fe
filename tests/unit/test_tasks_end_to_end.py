"""Every task runs end to end through the pipeline on a fixture in the official shape, with its metric (on the
in-process executor: the task logic, not Ray, is under test; test_pipeline runs the same stages through Ray)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stepback_ray.config import load_job
from stepback_ray.evaluation.scoring import score_files
from stepback_ray.pipeline import run_job
from stepback_ray.tasks import TASKS
from tests.support import FIXTURES, REPO

FAST = [
    "generation.max_new_tokens=12",
    "profile.max_new_tokens=24",
    "profile.history_token_budget=200",
    "ray.progress_bars=false",
    "executor=in-process",
]  # short profiles: the task logic is under test here
# Two tasks in the default run (a rating task: parsing and MAE/RMSE; co-authored writing: proposals and the
# lead-author merge; LaMP_5 generation runs by default in test_pipeline); the rest run with `-m slow`, so each
# task has its end-to-end test.
FAST_TASKS = ["LaMP_3", "PSW_title"]
SLOW_TASKS = ["LaMP_1", "LaMP_2", "LaMP_2_news", "LaMP_4", "LaMP_5", "LaMP_6", "LaMP_7", "PSW_abstract"]
ALL_TASKS = FAST_TASKS + [pytest.param(t, marks=pytest.mark.slow) for t in SLOW_TASKS]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_task_runs_with_its_metric(tmp_path, task):
    out = tmp_path / task
    modes = "[none, profile+rag, random-profile]"
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            *FAST,
            f"task={task}",
            f"input.questions={FIXTURES / f'{task}_questions.json'}",
            f"input.outputs={FIXTURES / f'{task}_outputs.json'}",
            f"output={out}",
            f"modes={modes}",
            "limit=null",
            # the path with every engine call a co-authored query can make: each author's proposal, then the merge
            *(["multi_author.strategy=lead-merge"] if TASKS[task].multi_author else []),
        ],
    )
    result = run_job(job)
    spec = TASKS[task]
    gens = pd.read_parquet(out / "generations")
    n_queries = len(json.loads((FIXTURES / f"{task}_questions.json").read_text()))
    assert len(gens) == n_queries * 3
    assert gens.groupby(["query_id", "mode"]).size().eq(1).all()
    assert set(gens["status"]) <= {"ok", "unparsed"}
    keys = {"rouge": ["rouge-1", "rouge-L"], "accuracy_f1": ["accuracy", "f1"], "mae_rmse": ["MAE", "RMSE"]}[
        spec.metric
    ]
    for mode, m in result.metrics["modes"].items():
        assert m["queries"] == n_queries and m["scored"] == n_queries
        for k in keys:
            assert isinstance(m[k], float), (mode, k)
        # the official-format predictions reproduce the run's numbers through `stepback score`
        scored = score_files(str(out / "predictions" / f"{mode}.json"), str(FIXTURES / f"{task}_outputs.json"), task)
        assert scored == pytest.approx({k: m[k] for k in keys})
    assert gens["score"].notna().all()
    if spec.multi_author:
        full = gens[gens["mode"] == "profile+rag"]
        n_authors = {q["id"]: len(q["authors"]) for q in json.loads((FIXTURES / f"{task}_questions.json").read_text())}
        for _, row in full.iterrows():  # one proposal per author, then the lead author's merge
            assert len(row["proposals"]) == n_authors[row["query_id"]]
            assert row["llm_calls"] == n_authors[row["query_id"]] + 1
            assert "You are the lead author" in row["prompt"]
        profiles = pd.read_parquet(out / "profiles")
        assert profiles["user_id"].is_unique  # an author of several papers is profiled once
