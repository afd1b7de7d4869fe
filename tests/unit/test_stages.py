"""The fast tier: each pass's stages called directly on small Arrow tables with the dry-run engine (the real
tokenizer, no model weights), no Ray. A change to one stage is checked here in seconds; the end-to-end tests
through Ray (test_pipeline, test_faults, test_datasets) check the same stages in their actor pools."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from stepback_ray.config import load_job
from stepback_ray.engines import build_engine
from stepback_ray.pipeline import PASSES, PassSpec, ProfilesAt, Stage, pass_named, prepare_work, run_job
from stepback_ray.pipeline.commit import commit_chunks, pending
from stepback_ray.pipeline.embed_pass import EmbedStage
from stepback_ray.pipeline.engine_host import serve_on_host
from stepback_ray.pipeline.generation_pass import (
    GenerationEngineStage,
    GenerationPlanStage,
    score_and_commit_generations,
)
from stepback_ray.pipeline.on_ray import run_on_ray
from stepback_ray.pipeline.profile_pass import ProfileEngineStage, ProfilePlanStage, commit_profiles
from stepback_ray.pipeline.schemas import GENERATION_SCHEMA, row_key
from tests.support import REPO

MODES = "modes=[none, rag, profile, profile+rag, random-profile]"


def _job(tmp_path, *extra):
    return load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "engine.kind=dry-run",
            "limit=6",
            "ray.users_per_chunk=3",
            "ray.progress_bars=false",
            MODES,
            f"output={tmp_path / 'run'}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def engine():
    return build_engine(load_job(REPO / "jobs" / "demo.yaml", ["engine.kind=dry-run"]).engine)


def _profile_chunks(job, at, engine, chunks):
    """The profile pass's three stages, by hand, over each chunk: the rows of each stage."""
    plan, distill = ProfilePlanStage(job, at), ProfileEngineStage(job, engine=engine)
    planned, distilled, summaries = [], [], []
    for chunk in chunks:
        p = plan(pa.Table.from_pylist([chunk]))
        d = distill(p)
        planned += p.to_pylist()
        distilled += d.to_pylist()
        summaries += commit_profiles(d, job, at).to_pylist()
    return planned, distilled, summaries


def test_profile_stages_plan_distill_and_commit_each_chunk_then_carry_it_over(tmp_path, engine):
    job = _job(tmp_path)
    work = prepare_work(job, "all")
    at = ProfilesAt(job.output_uri, "profiles")
    planned, distilled, summaries = _profile_chunks(job, at, engine, work.profile_chunks)
    assert len(planned) == len(distilled) == work.counts["users"] == 6
    assert {r["origin"] for r in planned} == {"new"} and all(r["plan_json"] for r in planned)
    assert all(r["chunk_rows"] == sum(1 for x in planned if x["chunk_id"] == r["chunk_id"]) for r in planned)
    assert {r["status"] for r in distilled} <= {"ok", "partial", "fallback"}
    assert all(r["profile_text"] and r["llm_calls"] >= 1 and r["prompt_tokens"] > 0 for r in distilled)
    assert sum(s["rows"] for s in summaries) == 6 and len(summaries) == len(work.profile_chunks)
    committed = pd.read_parquet(tmp_path / "run" / "profiles")
    assert sorted(committed["user_id"]) == sorted(r["user_id"] for r in distilled)

    # the next night, nothing changed: every user is carried over from that version, no engine call
    again = ProfilesAt(job.output_uri, "night2/profiles", previous="profiles", full=False)
    planned2, distilled2, _ = _profile_chunks(job, again, engine, work.profile_chunks)
    assert {r["origin"] for r in planned2} == {"carried"} and not any(r["plan_json"] for r in planned2)
    assert all(r["llm_calls"] == 0 for r in distilled2)
    by_user = {r["user_id"]: r["profile_text"] for r in distilled}
    assert all(r["profile_text"] == by_user[r["user_id"]] for r in distilled2)


def test_generation_stages_build_prompts_per_mode_generate_and_score(tmp_path, engine):
    job = _job(tmp_path)
    work = prepare_work(job, "all")
    at = ProfilesAt(job.output_uri, "profiles")
    _profile_chunks(job, at, engine, work.profile_chunks)
    plan, generate = GenerationPlanStage(job, at), GenerationEngineStage(job, engine=engine)
    chunk = work.generation_chunks[0]
    planned = plan(pa.Table.from_pylist([chunk])).to_pylist()
    queries = {r["query_id"] for r in planned}
    assert len(planned) == len(queries) * 5 and {r["mode"] for r in planned} == set(job.modes)
    by = {(r["query_id"], r["mode"]): r for r in planned}
    q = sorted(queries)[0]
    assert by[q, "profile+rag"]["profile_text"] in by[q, "profile+rag"]["prompts"][0]
    assert by[q, "profile+rag"]["profile_text"] not in by[q, "none"]["prompts"][0]
    assert by[q, "rag"]["retrieved_ids"] and not by[q, "none"]["retrieved_ids"]
    # the control: the same prompt shape with another user's profile, never the user's own
    assert by[q, "profile+rag"]["profile_text"] not in by[q, "random-profile"]["prompts"][0]

    done = generate(pa.Table.from_pylist(planned))
    assert done.num_rows == len(planned) and all(r["raw_output"] is not None for r in done.to_pylist())
    summary = score_and_commit_generations(done, job).to_pylist()
    usage = {k: summary[0].get(k) for k in ("engine_process", "engine_cpu_s", "engine_preemptions")}
    assert summary == [
        {
            "chunk_id": chunk["chunk_id"],
            "file": f"generations/chunk-{chunk['chunk_id']}.parquet",
            "rows": len(planned),
            "statuses": json.dumps({"ok": len(planned)}),
            "engine_started_at": None,
            "engine_ready_at": None,
            **usage,
        }
    ]  # a given engine: no start
    assert usage["engine_process"].endswith(f":{os.getpid()}") and usage["engine_cpu_s"] > 0  # its process's use
    rows = pd.read_parquet(tmp_path / "run" / summary[0]["file"])
    assert rows["rouge1"].between(0, 1).all() and rows["output"].notna().all()
    assert list(rows.columns) == GENERATION_SCHEMA.names

    # a stage that builds its engine (as in an actor) stamps its first block with the build's times, once
    own = GenerationEngineStage(job)
    first, second = (own(pa.Table.from_pylist(planned[:2])).to_pylist() for _ in range(2))
    assert all(r["engine_started_at"] <= r["engine_ready_at"] for r in first)
    assert not any(r.get("engine_ready_at") for r in second)
    own.close()
    # a given engine is stamped with the times its giver passes (the in-process executor's, for the pass that built it)
    given = GenerationEngineStage(job, engine=engine, engine_times=(1.0, 2.0))
    first, second = (given(pa.Table.from_pylist(planned[:2])).to_pylist() for _ in range(2))
    assert [(r["engine_started_at"], r["engine_ready_at"]) for r in first] == [(1.0, 2.0)] * 2
    assert not any(r.get("engine_ready_at") for r in second)


def test_the_commit_refuses_a_chunk_with_a_row_missing_and_merges_a_retry_by_row_key(tmp_path):
    job = _job(tmp_path)
    rows = [
        {"chunk_id": "c0", "chunk_rows": 3, "query_id": f"q{i}", "mode": "none", "status": "ok", "output": str(i)}
        for i in range(3)
    ]
    with pytest.raises(RuntimeError, match="2 of 3 rows"):
        commit_chunks(job, "generations", rows[:2], GENERATION_SCHEMA)
    rows[1]["status"] = "error: injected"
    commit_chunks(job, "generations", rows, GENERATION_SCHEMA)
    todo = pending(job.output_uri, "generations", job, [{"chunk_id": "c0"}, {"chunk_id": "c1"}])
    assert todo == [{"chunk_id": "c0", "retry": json.dumps([row_key("q1", "none")])}, {"chunk_id": "c1", "retry": None}]
    # the rerun commits only the retried row: it replaces its old row, the other two are kept as they were
    commit_chunks(
        job, "generations", [{**rows[1], "chunk_rows": 1, "status": "ok", "output": "again"}], GENERATION_SCHEMA
    )
    out = pd.read_parquet(tmp_path / "run" / "generations" / "chunk-c0.parquet").set_index("query_id")
    assert list(out.index) == ["q0", "q2", "q1"] and out.loc["q1", "output"] == "again"
    assert pending(job.output_uri, "generations", job, [{"chunk_id": "c0"}]) == []


def test_a_retried_profile_chunk_plans_only_its_failed_users(tmp_path, engine):
    job = _job(tmp_path)
    work = prepare_work(job, "all")
    at = ProfilesAt(job.output_uri, "profiles")
    chunk = work.profile_chunks[0]
    _, distilled, _ = _profile_chunks(job, at, engine, [chunk])
    victim = distilled[0]["user_id"]
    failed = [{**r, "status": "error: injected"} if r["user_id"] == victim else r for r in distilled]
    commit_profiles(pa.Table.from_pylist(failed), job, at)
    (todo,) = pending(at.uri, at.folder, job, [chunk])
    assert json.loads(todo["retry"]) == [victim]
    planned = ProfilePlanStage(job, at)(pa.Table.from_pylist([todo])).to_pylist()
    assert [r["user_id"] for r in planned if r["plan_json"]] == [victim]
    assert all(r["retained"] for r in planned if r["user_id"] != victim)


def test_a_stage_s_resources_come_from_its_declaration_under_its_job_keys(tmp_path):
    from stepback_ray.pipeline.stages import stage_resources

    declared = [s for spec in PASSES for s in spec.stages]
    names = [s.name for s in declared]
    assert len(names) == len(set(names))  # one name, one ray.stages key
    assert [s.kind for s in pass_named("profile").stages] == ["cpu", "engine", "commit"]
    assert [p.name for p in PASSES] == ["profile", "embedding", "generation"]
    job = _job(tmp_path, "ray.stages.profile_plan.concurrency=3")
    embed, plan = pass_named("embedding").stages[0], pass_named("profile").stages[0]
    assert (stage_resources(job, embed).num_cpus, stage_resources(job, embed).concurrency) == (1.0, None)
    assert (stage_resources(job, plan).num_cpus, stage_resources(job, plan).concurrency) == (0.25, 3)
    with pytest.raises(ValueError, match="must end with a commit"):
        PassSpec(
            "broken",
            (Stage("profile_plan", ProfilePlanStage, "cpu"),),
            over="users",
            commits_to=lambda job, at: (at.uri, at.folder),
            needed=lambda job, command: True,
        )


def test_the_passes_a_command_runs_follow_the_job_s_modes(tmp_path):
    from stepback_ray.pipeline.passes import passes_for

    def names(modes, command, over):
        job = _job(tmp_path, f"modes={json.dumps(modes)}")
        return [p.name for p in passes_for(job, command, over)]

    assert names(["profile+rag", "rag"], "run", "users") == ["profile"]
    assert names(["rag"], "run", "users") == []
    assert names(["rag"], "profile", "users") == ["profile"]
    assert names(["rag"], "run", "queries") == ["generation"] and names(["rag"], "profile", "queries") == []


def test_per_stage_resources_reach_ray_data(tmp_path, monkeypatch):
    """What the Ray runner asks Ray Data for, stage by stage (Ray Data itself replaced by a recorder)."""
    import ray
    import ray.data

    calls = []

    class Recorder:
        def map_batches(self, fn, **kwargs):
            calls.append((fn, kwargs))
            return self

        def iter_rows(self):
            return iter([])

    monkeypatch.setattr(ray.data, "from_items", lambda items, **kw: Recorder())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    job = _job(
        tmp_path,
        "ray.stages.generation_plan.num_cpus=0.5",
        "ray.stages.generation_plan.concurrency=2",
        "ray.stages.score_and_commit.concurrency=3",
        "ray.engine_actor_cpus=1",
    )
    run_on_ray(job, pass_named("generation"), [{"chunk_id": "c0"}], None)
    (plan_fn, plan), (engine_fn, eng), (commit_fn, commit) = calls
    assert plan_fn is GenerationPlanStage and plan["num_cpus"] == 0.5 and plan["compute"].max_size == 2
    assert plan["fn_constructor_kwargs"] == {"job": job, "at": None}
    assert engine_fn is GenerationEngineStage and eng["max_restarts"] == job.engine.max_restarts
    assert eng["fn_constructor_kwargs"] == {"job": job}
    assert commit_fn is score_and_commit_generations and commit["concurrency"] == 3 and commit["num_cpus"] == 0.25
    assert all(kw["batch_size"] is None for _, kw in calls)  # one chunk per block, whole, to the commit
    calls.clear()
    run_on_ray(job, pass_named("embedding"), [{"chunk_id": "c0"}], None)
    assert calls[0][0] is EmbedStage and calls[0][1]["num_cpus"] == 1.0 and len(calls) == 2

    class Hosts:  # the run's engine actors kept across passes (ray.keep_engines): the engine stage is a task
        def for_job(self, j):
            assert j is job
            return ["host-a", "host-b"]

    calls.clear()
    run_on_ray(job, pass_named("generation"), [{"chunk_id": "c0"}], None, Hosts())
    engine_fn, eng = calls[1]
    assert engine_fn is serve_on_host and eng["num_cpus"] == 0 and "max_restarts" not in eng
    assert eng["compute"].size == 1  # as many blocks as the hosts take (2 x 2), or the pass has (1)
    assert eng["fn_kwargs"]["first_blocks"] == 1
    assert eng["fn_kwargs"]["hosts"] == ["host-a", "host-b"] and eng["fn_kwargs"]["stage_cls"] is GenerationEngineStage
    first_key = eng["fn_kwargs"]["pass_key"]
    run_on_ray(job, pass_named("generation"), [{"chunk_id": "c0"}], None, Hosts())
    assert calls[4][1]["fn_kwargs"]["pass_key"] != first_key  # each pass gets its own stage in the host


def test_a_whole_job_in_process_with_no_ray(tmp_path, monkeypatch):
    from stepback_ray.pipeline import executors

    def no_ray(*args, **kwargs):
        raise AssertionError("the in-process executor touched Ray")

    monkeypatch.setattr(executors, "ray_backend", no_ray)
    job = _job(tmp_path, "executor=in-process", "run_id=local")
    result = run_job(job)
    assert result.manifest["counts"]["generation_rows"] == result.manifest["counts"]["expected_generation_rows"] == 30
    assert result.manifest["config"]["executor"] == "in-process"
    # the run's fixed costs, each timed: one engine built in the profile pass, reused (not rebuilt) by generation
    t = result.manifest["timings"]
    assert t["profile_engines_started"] == 1 and "generation_engines_started" not in t
    assert 0 <= t["profile_model_load_s"] <= t["profile_first_engine_ready_s"] <= t["profile_pass_s"]
    for key in ("read_s", "ray_start_s", "between_passes_s", "generation_pass_s", "shutdown_s"):
        assert 0 <= t[key] <= t["total_s"], key
    assert (
        sum(
            t[k]
            for k in ("read_s", "ray_start_s", "profile_pass_s", "between_passes_s", "generation_pass_s", "shutdown_s")
        )
        <= t["total_s"] + 0.01
    )
    # what the engine's process used in each pass (the generation pass's engine too, though it started none)
    for name in ("profile", "generation"):
        assert 0 < t[f"{name}_engine_cpu_s"] and t[f"{name}_engine_preemptions"] >= 0, t
    assert not {"engine_ready_at", "engine_process", "engine_cpu_s"} & set(
        pd.read_parquet(tmp_path / "run" / "profiles").columns
    )  # stamps travel only
    again = run_job(_job(tmp_path, "executor=in-process", "run_id=local"))
    assert again.manifest["resumed"] and again.manifest["chunks_committed_this_run"] == {
        "profiles": 0,
        "generations": 0,
    }
    assert not any(k.endswith("engines_started") for k in again.manifest["timings"])  # nothing to do: no engine


def test_a_pass_sums_its_engine_processes_latest_usage():
    """Each block carries its engine process's usage since the engine was ready, cumulative: per process the
    largest counts are that process's whole pass (blocks commit in any order), and the pass sums its processes
    (an actor pool, or a restarted actor's new process); chunks no engine served carry nulls."""
    from stepback_ray.pipeline.run_passes import engine_usage

    summaries = [
        {"engine_process": "a:1", "engine_cpu_s": 30.0, "engine_preemptions": 900},
        {"engine_process": "a:1", "engine_cpu_s": 10.0, "engine_preemptions": 400},
        {"engine_process": "b:1", "engine_cpu_s": 5.5, "engine_preemptions": 7},
        {"engine_process": None, "engine_cpu_s": None, "engine_preemptions": None},
    ]
    assert engine_usage("profile", summaries) == {"profile_engine_cpu_s": 35.5, "profile_engine_preemptions": 907}
    assert engine_usage("generation", summaries[3:]) == {}


def test_an_engine_actors_usage_counts_the_processes_its_engine_started():
    """vLLM works in a child process of the actor (its engine core): an actor counts its live children, a driver
    (whose children would be Ray's) only itself."""
    import subprocess
    import sys

    from stepback_ray.pipeline.engine_stage import process_usage

    own, with_children = process_usage(), process_usage(children=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\ntime.sleep(30)",
        ]
    )
    try:
        deadline = time.time() + 20
        while time.time() < deadline and process_usage(children=True)[0] - with_children[0] < 0.5:
            time.sleep(0.1)
        assert process_usage(children=True)[0] - with_children[0] >= 0.5  # the child's CPU, while it lives
        assert process_usage()[0] - own[0] < 0.5  # not this process's own
    finally:
        child.kill()
        child.wait()


def test_a_callers_engine_serves_an_in_process_run_and_is_kept(tmp_path, engine):
    """``run_job(job, engine)``: the in-process executor uses the caller's engine (a profile of the run reads it
    afterwards) and leaves it open; on Ray, where engines live in actors, it is refused before any work."""
    from stepback_ray.errors import StepbackError

    calls, closed = [], []
    generate = engine.generate
    try:
        engine.generate = lambda requests, params: calls.append(len(requests)) or generate(requests, params)
        engine.close = lambda: closed.append(True)
        result = run_job(_job(tmp_path, "executor=in-process", "run_id=given"), engine)
    finally:
        del engine.generate, engine.close
    assert result.manifest["counts"]["generation_rows"] == 30 and sum(calls) >= 30
    assert "profile_engines_started" not in result.manifest["timings"]  # none was built for the run
    assert not closed
    with pytest.raises(StepbackError, match="in process only"):
        run_job(_job(tmp_path / "ray"), engine)
    assert not (tmp_path / "ray" / "run").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        (["executor=in-process", "ray.address=127.0.0.1:1"], "runs the passes in this process"),
        (["ray.stages.embed.num_cpus=0"], "num_cpus"),
    ],
)
def test_bad_executor_and_stage_settings_name_the_key(tmp_path, change, message):
    from stepback_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _job(tmp_path, *change)


def test_an_unknown_stage_name_is_one_line_before_the_run_creates_anything(tmp_path):
    from stepback_ray.errors import ConfigError

    job = _job(tmp_path, "ray.stages.embedd.num_cpus=1")
    with pytest.raises(ConfigError, match=r"ray\.stages\.embedd: no such stage .*embed, commit_embeddings"):
        run_job(job)
    assert not Path(job.output_uri).exists()


def test_an_engine_stage_closes_the_engine_it_built_never_one_it_was_given(tmp_path, engine, monkeypatch):
    from stepback_ray.engines.dry_run import DryRunEngine

    closed = []
    monkeypatch.setattr(DryRunEngine, "close", lambda self: closed.append(self))
    job = _job(tmp_path)
    own = GenerationEngineStage(job)  # as in an actor: builds its engine
    built = own.engine
    del own  # Ray Data drops the UDF when the actor exits gracefully
    assert closed == [built]
    given = ProfileEngineStage(job, engine=engine)
    del given
    assert closed == [built]  # the in-process executor's engine is closed by the executor, at the end of the run
