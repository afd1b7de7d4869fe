"""The whole job on the in-process executor with the real embedded model: the official-shape fixture with an empty
history. On local Ray (local output, a rerun, S3 through moto): tests/ray/test_pipeline.py."""

from __future__ import annotations

import json

import pandas as pd

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from tests.support import FIXTURES, REPO

FAST = [
    "generation.max_new_tokens=10",
    "profile.max_new_tokens=24",
    "profile.history_token_budget=200",
    "profile.max_item_tokens=48",
    "retrieval.max_item_tokens=48",
    "profile.max_parts=1",
    "ray.progress_bars=false",
]  # short prompts and outputs: nothing here needs long texts


def test_official_shape_fixture_with_an_empty_history(tmp_path):
    out = tmp_path / "official"
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            *FAST,
            f"input.questions={FIXTURES / 'LaMP_5_questions.json'}",
            f"input.outputs={FIXTURES / 'LaMP_5_outputs.json'}",
            f"output={out}",
            "modes=[none, profile+rag, rag]",
            "engine.kind=dry-run",
            "profile.habits=true",  # about empty and one-item histories, not the model's answers
            "executor=in-process",
        ],
    )
    run_job(job)
    profiles = pd.read_parquet(out / "profiles").set_index("user_id")
    assert profiles.loc["q:312", "status"] == "skipped: empty history"
    # measured habits ride beside the LLM's fields (none from a single item); the prompts show them
    assert json.loads(profiles.loc["q:310", "profile_json"])["habits"][0].startswith("Titles are ")
    assert "Title habits: Titles are " in profiles.loc["q:310", "profile_text"]
    assert "habits" not in json.loads(profiles.loc["q:311", "profile_json"])
    assert pd.isna(profiles.loc["q:312", "prompt"]) and profiles.loc["q:312", "prompt_tokens"] == 0
    gens = pd.read_parquet(out / "generations")
    assert len(gens) == 9
    empty = gens[gens["user_id"] == "q:312"].set_index("mode")
    assert "no profile (empty history): generated without one" in list(empty.loc["profile+rag", "notes"])
    assert "no history to retrieve from" in list(empty.loc["rag", "notes"])
    assert empty["output"].notna().all() and (empty["status"] == "ok").all()
    one_item = gens[(gens["user_id"] == "q:311") & (gens["mode"] == "rag")].iloc[0]
    assert list(one_item["retrieved_ids"]) == ["3110"]
