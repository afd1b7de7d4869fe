"""Choosing among sampled candidates: consensus, agreement with the person, and the stage that applies it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stepback_ray.config import load_job
from stepback_ray.generation import selection
from stepback_ray.generation.prompting import Persona
from stepback_ray.generation.selection import PersonalRefs, choose
from stepback_ray.tasks import TASKS
from tests.support import REPO

LAMP5, LAMP2, LAMP3 = TASKS["LaMP_5"], TASKS["LaMP_2"], TASKS["LaMP_3"]


def test_consensus_keeps_the_answer_the_model_keeps_coming_back_to():
    cands = [
        "A Study of Cats",
        "Sparse Attention for Long Video",
        "Sparse Attention for Long Video Diffusion",
        "Long Video Sparse Attention",
    ]  # the greedy answer is the outlier; the second sits between the rest
    assert choose(LAMP5, cands, PersonalRefs()) == 1
    assert choose(LAMP2, ["comedy", "action", "action"], PersonalRefs()) == 1  # labels: the majority
    assert choose(LAMP5, ["same", "same", "same"], PersonalRefs()) == 0  # ties keep the greedy answer


def test_the_persons_outputs_and_profile_pull_towards_their_own_wording():
    cands = [
        "Efficient Transformers for Speech Recognition",
        "Speech Recognition with Efficient Transformers",
        "Towards Efficient Speech Transformers",
    ]
    assert choose(LAMP5, cands, PersonalRefs()) == 0  # consensus alone: 0 and 1 tie, the earlier is kept
    mine = PersonalRefs(outputs=["Towards Robust Vision Models", "Towards Fair Language Models"])
    assert choose(LAMP5, cands, mine) == 2  # this author writes "Towards ..."
    profile = PersonalRefs(profiles=["Keywords: speech recognition, efficient transformers"])
    assert selection.scores(LAMP5, cands, profile)[2] < selection.scores(LAMP5, cands, profile)[0]
    # ratings: the user who always gives 5 pulls a split 4/5 towards 5; labels: the user's usual tag
    assert choose(LAMP3, ["4", "5", "4", "5"], PersonalRefs(outputs=["5", "5", "5"])) == 1
    assert choose(LAMP2, ["action", "comedy"], PersonalRefs(outputs=["comedy", "comedy"])) == 1


def test_unparseable_candidates_are_never_kept_over_parseable_ones():
    assert choose(LAMP2, [None, "comedy", None], PersonalRefs()) == 1
    assert choose(LAMP2, [None, None], PersonalRefs()) == 0


def test_personal_refs_take_each_persons_newest_outputs_and_profile():
    old = [
        {"id": str(i), "title": f"Old title {i}", "abstract": "a", "date": f"2020-{1 + i // 28:02d}-{1 + i % 28:02d}"}
        for i in range(40)
    ]
    people = [Persona("a", "p", old), Persona("b", None, [{"id": "x", "title": "B's title", "abstract": "b"}])]
    refs = selection.personal_refs(LAMP5, people, {"a": "Keywords: cats"})
    assert len(refs.outputs) == selection.MAX_OWN_OUTPUTS + 1
    assert refs.outputs[0] == "Old title 39" and refs.outputs[-1] == "B's title"
    assert refs.profiles == ["Keywords: cats"]
    assert PersonalRefs.from_list(refs.to_list()) == refs and PersonalRefs.from_list(None) == PersonalRefs()


def test_scoring_stage_keeps_the_chosen_candidate_and_says_so(tmp_path):
    """The commit stage called directly: the kept candidate becomes the output, the others stay visible."""
    from stepback_ray.pipeline.generation_pass import score_and_commit_generations
    from stepback_ray.storage import RunStore

    job = load_job(REPO / "jobs" / "demo.yaml", [f"output={tmp_path}", "generation.candidates=3"])
    row = {
        "chunk_id": "00000",
        "chunk_rows": 1,
        "query_id": "q1",
        "mode": "profile+rag",
        "user_id": "u",
        "user_ids": ["u"],
        "task": "LaMP_5",
        "input": "x",
        "gold": "Towards Efficient Speech Transformers",
        "profile_text": "p",
        "profile_status": "ok",
        "retrieved_ids": [],
        "prompt": "prompt",
        "proposals": [],
        "raw_output": "Efficient Transformers for Speech Recognition",
        "engine_error": None,
        "truncated": False,
        "notes": [],
        "history_items": 2,
        "prompt_tokens": 10,
        "completion_tokens": 30,
        "engine_seconds": 0.1,
        "llm_calls": 2,
        "finish_reason": "stop",
        "candidates": [
            "Efficient Transformers for Speech Recognition",
            "Speech Recognition with Efficient Transformers",
            "Towards Efficient Speech Transformers",
        ],
        "select_refs": PersonalRefs(outputs=["Towards Robust Vision Models"]).to_list(),
    }
    score_and_commit_generations(pa.Table.from_pylist([row]), job)
    out = RunStore(str(tmp_path), job.storage).read_table("generations/chunk-00000.parquet").to_pylist()[0]
    assert out["output"] == "Towards Efficient Speech Transformers" and out["rouge1"] == pytest.approx(1.0)
    assert out["notes"] == ["kept sampled candidate 2 of 3"] and len(out["candidates"]) == 3


def test_dry_run_engine_returns_n_samples():
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams, build_engine

    eng = build_engine(EngineConfig(kind="dry-run"))
    one, many = (eng.generate(["hello"], SamplingParams(max_new_tokens=8, temperature=0.7, n=n))[0] for n in (1, 4))
    assert one.samples == [] and len(many.samples) == 4 and many.completion_tokens == 4 * one.completion_tokens


def test_transformers_engine_samples_n_completions_per_prompt(engine):
    from stepback_ray.engines import SamplingParams

    prompts = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Name a planet."}]]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=1))
    assert len(out) == 2 and all(len(c.samples) == 3 and c.text == c.samples[0] for c in out)
    assert all(0 < c.completion_tokens <= 18 for c in out)
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=6, n=3))  # n needs sampling: greedy is one
    assert all(c.samples == [] for c in greedy)
