"""The job: read the input into chunks, run the passes (profile, embed, generate) on the executor, then read
back the committed rows into ``metrics.json``, the official-format predictions, the report and ``manifest.json``.

:func:`run_job` is ``stepback run`` (every pass), :func:`run_profile_job` is ``stepback profile`` (the nightly
profile pass alone). Both record the spec first (a rerun of the same output must match it) and, when the run
cannot do its work, leave a ``status: failed`` manifest with the counts it reached before raising.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from stepback_ray import profiling
from stepback_ray.config import JobSpec
from stepback_ray.data import collect_users, generation_chunks, lead_groups, profile_chunks
from stepback_ray.data.datasets import input_files, stage_dataset, staged_chunks
from stepback_ray.data.lamp import read_lamp
from stepback_ray.data.rows import status_kind
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.errors import RunFailed, StepbackError
from stepback_ray.generation import prompting
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_users
from stepback_ray.pipeline.commit import pending
from stepback_ray.pipeline.embed_pass import EMBED_PASS
from stepback_ray.pipeline.gate_sample import measure_lift
from stepback_ray.pipeline.generation_pass import GENERATION_PASS
from stepback_ray.pipeline.manifest import check_error_budget, check_resume, failed_manifest, manifest_head, summarize
from stepback_ray.pipeline.profile_pass import PROFILE_PASS
from stepback_ray.pipeline.runner import Executor, executor
from stepback_ray.profiling import quality as profile_quality
from stepback_ray.storage import RunStore
from stepback_ray.store import forget
from stepback_ray.store import gate as store_gate
from stepback_ray.store.versions import StoreVersion, commit_version, open_version
from stepback_ray.tasks import get_task

PASSES = {p.name: p for p in (PROFILE_PASS, EMBED_PASS, GENERATION_PASS)}
"""The passes a run is made of, each declared in its own module; a new pass is a new entry (its stages), not a
branch in the driver."""


@dataclass
class RunResult:
    output_uri: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def num_shards(job: JobSpec, lead_users: int | None) -> int:
    """The job's shard count: fixed in the spec, or about ``users_per_chunk`` lead users per shard (a dataset,
    whose size is not known before reading it, gets 256)."""
    if job.ray.num_shards != "auto":
        return int(job.ray.num_shards)
    if lead_users is None:
        return 256
    return max(1, -(-lead_users // job.ray.users_per_chunk))


@dataclass
class Work:
    """A job's input cut into chunks for the two passes, with the counts the manifest reports."""

    shards: int
    profile_chunks: list[dict[str, Any]]
    generation_chunks: list[dict[str, Any]]
    counts: dict[str, int]
    expected_queries: int | None
    deny_token: str | None = None
    """The store's deny-list as the job read it (:mod:`~stepback_ray.store.forget`): checked again before the commit."""


def prepare_work(job: JobSpec, needs_profiles: bool) -> Work | None:
    """Read (LaMP JSON: in the driver) or stage (datasets: a Ray Data pass) the input into per-shard chunks.
    Outside a Ray session only LaMP JSON is read (None for datasets): bad input then fails before Ray starts."""
    denied, deny_token = forget.denied_users(job.profile_store.uri, job.storage)
    if job.input.format == "lamp":
        task = get_task(job.task)
        queries = read_lamp(job.input.questions, job.input.outputs, task, job.storage)
        n_in = len(queries)
        queries, met, dropped = forget.leave_out(queries, denied)
        groups = lead_groups(queries, job.limit)
        if not groups:
            raise StepbackError(
                f"{job.input.questions}: no questions to run"
                + (f" ({dropped} asked by forgotten users)" if dropped else "")
            )
        kept = [q for g in groups for q in g]
        users = collect_users(kept)
        shards = num_shards(job, len(groups))
        with_donors = any(prompting.uses_donor(m) for m in job.modes)
        histories = {u.user_id: u.history for u in users} if with_donors else None
        counts = {"queries_in": n_in, "queries": len(kept), "users": len(users)}
        if denied:
            counts.update(forgotten_users=len(met), forgotten_queries=dropped)
        return Work(
            shards,
            profile_chunks(users, shards),
            generation_chunks(groups, shards, needs_profiles, with_donors, histories),
            counts,
            len(kept),
            deny_token,
        )
    input_files(job)  # a missing input (or a folder without data files) is one line, before anything is written
    import ray

    if not ray.is_initialized():
        return None
    shards = num_shards(job, None)
    counts = stage_dataset(job, shards, denied)
    if counts["rows_staged"] == 0:  # e.g. an upstream schema change: nothing to profile, not an empty success
        raise StepbackError(
            f"{job.input.path}: no valid records ({counts['rows_quarantined']} quarantined"
            + (f", {counts['forgotten_rows']} of forgotten users" if counts.get("forgotten_rows") else "")
            + f"; the reason for each is in {job.output_uri}/quarantine/)"
        )
    chunks = staged_chunks(job)
    return Work(shards, chunks, chunks, counts, None, deny_token)


def profiles_target(job: JobSpec, shards: int, resuming: bool = False) -> tuple[ProfilesAt, StoreVersion | None]:
    if job.profile_store.uri:
        sv = open_version(job, shards, resuming)
        return ProfilesAt(job.profile_store.uri, sv.profiles_dir, sv.previous_profiles_dir, sv.full, sv.version), sv
    return ProfilesAt(job.output_uri, "profiles"), None


def engine_start_times(name: str, summaries: list[dict[str, Any]], t0: float) -> dict[str, float | int]:
    """A pass's fixed engine costs from its commit summaries' stamps (:meth:`EngineStage.stamp`): how many engines
    started, the seconds from the pass's start until the first was ready (scheduling, actor start, model load), and
    the longest model load. Nothing when the pass started no engine (nothing to do, or the in-process
    executor's engine reused from the profile pass)."""
    stamps = [(s["engine_started_at"], s["engine_ready_at"]) for s in summaries if s.get("engine_ready_at") is not None]
    if not stamps:
        return {}
    return {
        f"{name}_engines_started": len(stamps),
        f"{name}_first_engine_ready_s": round(min(r for _, r in stamps) - t0, 3),
        f"{name}_model_load_s": round(max(r - s for s, r in stamps), 3),
    }


def engine_usage(name: str, summaries: list[dict[str, Any]]) -> dict[str, float | int]:
    """What a pass's engine processes used from their engines' start on (:func:`~.runner.process_usage`), from its
    commit summaries: CPU seconds and involuntary context switches, each process's latest (largest) count, summed
    over the processes. Many switches per CPU second mean the engine shared its cores (on a 2-core VM, with a
    local Ray's own processes; see docs/benchmarks.md): its engine time is then not the engine's alone."""
    latest: dict[str, tuple[float, int]] = {}
    for s in summaries:
        if s.get("engine_process") is None:
            continue
        cpu, switches = latest.get(s["engine_process"], (0.0, 0))
        latest[s["engine_process"]] = (max(cpu, s["engine_cpu_s"]), max(switches, s["engine_preemptions"]))
    if not latest:
        return {}
    return {
        f"{name}_engine_cpu_s": round(sum(c for c, _ in latest.values()), 3),
        f"{name}_engine_preemptions": sum(n for _, n in latest.values()),
    }


def run_user_passes(
    ex: Executor, job: JobSpec, work: Work, resuming: bool = False, needs_profiles: bool = True
) -> tuple[ProfilesAt | None, dict[str, Any] | None, dict[str, float]]:
    """The per-user passes, each where a mode needs it: the step-back profiles, and the Persona-Plug item
    embeddings beside them. With a profile store both go into one new version, committed after both (over the
    error budget, the store's pointer does not move); a rerun whose version is already committed gets that
    version's stats back and redoes nothing. Returns where the profiles are, their stats and the times: each
    pass's wall time (``*_pass_s``, ``gate_sample_s``), its engine start costs, and ``between_passes_s``, the
    bookkeeping around the passes (statistics, quality measures, the store's commit): this call's wall time less
    the passes' own, whatever passes there are."""
    t_enter = time.time()
    walls: dict[str, float] = {}  # the passes' wall times: disjoint intervals, so the rest is bookkeeping
    details: dict[str, float | int] = {}

    def times() -> dict[str, float]:
        between = round(time.time() - t_enter - sum(walls.values()), 3)
        return {"profile_pass_s": 0.0, **walls, **details, "between_passes_s": between}

    plug = any(prompting.uses_plug(m) for m in job.modes)
    if not needs_profiles:
        if not plug:
            return None, None, times()
        at, sv = ProfilesAt(job.output_uri, "profiles"), None
    else:
        at, sv = profiles_target(job, work.shards, resuming)
    t0 = time.time()
    if sv is not None and sv.committed is not None:
        stats = {k: v for k, v in sv.committed.items() if k not in ("run_id", "config", "files", "pointer")}
        return at, {**stats, "chunks_committed_this_run": 0, "wall_s": round(time.time() - t0, 3)}, times()
    summaries = ex.run(PROFILE_PASS, pending(at.uri, at.folder, job, work.profile_chunks), at) if needs_profiles else []
    walls["profile_pass_s"] = round(time.time() - t0, 3)
    details.update(engine_start_times("profile", summaries, t0), **engine_usage("profile", summaries))
    if plug:
        t1 = time.time()
        ex.run(EMBED_PASS, pending(at.uri, at.embeddings, job, work.profile_chunks), at)
        walls["embedding_pass_s"] = round(time.time() - t1, 3)
    if not needs_profiles:
        return at, None, times()
    # a forget that ran while this job did: its users go out of this version before it is measured and committed
    late = (
        forget.recheck_before_commit(job.profile_store.uri, job.storage, work.deny_token, sv.version)
        if sv is not None
        else None
    )
    stats = profile_stats(job, at, work, sv)
    if late is not None and late.rows:
        stats["forgotten_during_run"] = late.rows
    stats.update(chunks_committed_this_run=len(summaries), wall_s=round(time.time() - t0, 3))
    check_error_budget(
        job,
        "profiles",
        stats["statuses"].get("error", 0),
        stats["users"],
        {"profiles": stats["users"], "profiles_by_status": stats["statuses"]},
    )
    if sv is not None:
        stats.update(store_uri=job.profile_store.uri, version=sv.version, previous=sv.previous, full_rebuild=sv.full)
        if job.profile_store.gate.min_lift is not None:
            t1 = time.time()
            stats["gate_sample"] = measure_lift(ex, job, work.generation_chunks, work.shards, at)
            walls["gate_sample_s"] = round(time.time() - t1, 3)
        gate = store_gate.evaluate_gate(job, sv, stats)
        if gate is not None:
            stats["gate"] = gate
        stats["retention"] = commit_version(
            sv,
            job,
            work.shards,
            {
                **stats,
                "run_id": job.run_id,
                "config": job.public_dict(),
                "files": RunStore(at.uri, job.storage).list(at.folder, ".parquet"),
            },
        )
    return at, stats, times()


def profile_stats(job: JobSpec, at: ProfilesAt, work: Work, sv: StoreVersion | None) -> dict[str, Any]:
    """Counts, tokens, statuses and origins over the committed profiles, and their model-free quality."""
    store = RunStore(at.uri, job.storage)
    origins = {"new": 0, "recomputed": 0, "incremental": 0, "carried": 0}
    sums = {
        "users": 0,
        "llm_calls": 0,
        "map_reduced_users": 0,
        "prompt_tokens": 0,
        "cached_prompt_tokens": 0,
        "completion_tokens": 0,
    }
    secs, statuses = 0.0, {}
    for r in store.scan(
        at.folder,
        [
            "status",
            "prompt_tokens",
            "cached_prompt_tokens",
            "completion_tokens",
            "engine_seconds",
            "llm_calls",
            "parts",
            "origin",
        ],
        optional=("cached_prompt_tokens",),
    ):
        origins[r["origin"]] = origins.get(r["origin"], 0) + 1
        sums["users"] += 1
        sums["llm_calls"] += r["llm_calls"]
        sums["map_reduced_users"] += int(r["parts"] > 1)
        sums["prompt_tokens"] += r["prompt_tokens"]
        sums["cached_prompt_tokens"] += r["cached_prompt_tokens"] or 0
        sums["completion_tokens"] += r["completion_tokens"]
        secs += r["engine_seconds"]
        key = status_kind(r["status"])
        statuses[key] = statuses.get(key, 0) + 1
    toks = sums["prompt_tokens"] + sums["completion_tokens"]
    return {
        **sums,
        "statuses": statuses,
        "origins": origins,
        "quality": measure_profiles(job, at, work),
        "deleted": max(
            0, (sv.previous_users if sv else 0) - origins["recomputed"] - origins["incremental"] - origins["carried"]
        ),
        "engine_seconds": round(secs, 3),
        "tokens_per_s": round(toks / secs, 1) if secs else None,
    }


def measure_profiles(job: JobSpec, at: ProfilesAt, work: Work) -> dict[str, Any]:
    """:mod:`~stepback_ray.profiling.quality` over a sample of the pass's users: whole chunks in chunk order (hash
    shards, so independent of the input order) until :data:`~stepback_ray.profiling.quality.SAMPLE_USERS`."""
    task = get_task(job.task)
    store = RunStore(at.uri, job.storage)
    users: list[tuple[dict[str, Any] | None, list]] = []
    for chunk in sorted(work.profile_chunks, key=lambda c: c["chunk_id"]):
        if len(users) >= profile_quality.SAMPLE_USERS:
            break
        rel = f"{at.folder}/chunk-{chunk['chunk_id']}.parquet"
        rows = {r["user_id"]: r for r in store.read_table(rel, columns=["user_id", "profile_json"]).to_pylist()}
        for u in chunk_users(job, chunk):
            raw = rows.get(u.user_id, {}).get("profile_json")
            users.append((json.loads(raw) if raw else None, u.history))
    users = users[: profile_quality.SAMPLE_USERS]
    return {
        "sample_users": len(users),
        **profile_quality.measure(
            task,
            users,
            lambda p: profiling.render_profile(p, task, habits=False),
            lambda p: profiling.render_profile(p, task),
        ),
    }


def _start(job: JobSpec, needs_profiles: bool) -> tuple[RunStore, Work | None, bool, float]:
    """What every job does before any cluster work: claim the output (empty, new, or this run's own), read LaMP
    input (bad input fails here, before the seconds the next check costs), check the model's tokenizer loads, and
    record or match the spec."""
    t_start = time.time()
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable(run_marker="_run_spec.json")
    work = prepare_work(job, needs_profiles)
    PromptFormatter(job.engine)  # fail here, before any cluster work, if the model or its tokenizer is unusable
    if job.engine.kind == "openai" and not job.ray.address:  # local engine actors share this environment
        from stepback_ray.engines.openai_engine import api_key

        api_key(job.engine.openai)  # a missing API key variable fails here, as one line
    return store, work, check_resume(store, job), t_start


def run_job(job: JobSpec, engine: Any = None) -> RunResult:
    """Run the whole job: read, profile, generate, score, write. Returns the metrics and the manifest.
    ``engine``: one the caller built for ``job.engine`` and keeps (the in-process executor only; a profile of the
    run reads its phases)."""
    if engine is not None and job.executor != "in-process":
        raise StepbackError("run_job: an engine built by the caller runs in process only (executor: in-process)")
    if job.input.format != "lamp" and job.input.layout == "item":
        raise StepbackError(
            "input.layout 'item' holds histories only, no queries to generate for: profile it with "
            "`stepback profile`, or give one row per user with its queries (layout: user)"
        )
    needs_profiles = any(prompting.mode_uses(m)[0] for m in job.modes)
    store, work, resumed, t_start = _start(job, needs_profiles)
    try:
        return _run_job(job, store, work, needs_profiles, resumed, t_start, engine)
    except RunFailed as e:
        failed_manifest(job, store, t_start, resumed, e)
        raise


def _run_job(
    job: JobSpec,
    store: RunStore,
    work: Work | None,
    needs_profiles: bool,
    resumed: bool,
    t_start: float,
    engine: Any = None,
) -> RunResult:
    t_exec = time.time()
    with executor(job, engine) as ex:
        t_ray = time.time()
        work = work or prepare_work(job, needs_profiles)
        t_passes = time.time()
        timings: dict[str, float] = {
            "read_s": round(t_exec - t_start + t_passes - t_ray, 3),
            "ray_start_s": round(t_ray - t_exec, 3),
        }
        at, profile_stats, pass_times = run_user_passes(ex, job, work, resumed, needs_profiles)
        timings.update(pass_times)
        t0 = time.time()
        gen_summaries = ex.run(GENERATION_PASS, pending(job.output_uri, "generations", job, work.generation_chunks), at)
        t1 = time.time()
        timings["generation_pass_s"] = round(t1 - t0, 3)
        timings.update(engine_start_times("generation", gen_summaries, t0), **engine_usage("generation", gen_summaries))
    timings["shutdown_s"] = round(time.time() - t1, 3)  # engines closed, the local Ray stopped

    result_metrics, gen_counts = summarize(job, store)
    if gen_counts["generation_rows"] == 0:
        raise StepbackError(
            f"{job.input.path or job.input.questions}: no queries to generate for (a dataset with "
            "layout: user needs a `queries` list in its rows)"
        )
    by_status = gen_counts["generation_rows_by_status"]
    check_error_budget(
        job,
        "generation rows",
        by_status.get("error", 0),
        gen_counts["generation_rows"],
        {"generation_rows": gen_counts["generation_rows"], "generation_rows_by_status": by_status},
    )
    if profile_stats:
        result_metrics["profiles"] = profile_stats
    store.write_json("metrics.json", result_metrics)
    timings["total_s"] = round(time.time() - t_start, 3)
    queries = work.expected_queries if work.expected_queries is not None else gen_counts["queries_generated"]
    expected = queries * len(job.modes)
    generated = gen_counts["generation_rows"]
    manifest = {
        **manifest_head(job, t_start, resumed, "ok"),
        "counts": {
            **work.counts,
            "shards": work.shards,
            "profile_chunks": len(work.profile_chunks) if needs_profiles else 0,
            "generation_chunks": len(work.generation_chunks),
            "generation_rows": generated,
            "expected_generation_rows": expected,
            "generation_rows_by_status": gen_counts["generation_rows_by_status"],
        },
        "chunks_committed_this_run": {
            "profiles": profile_stats["chunks_committed_this_run"] if profile_stats else 0,
            "generations": len(gen_summaries),
        },
        "profiles": {"uri": at.uri, "folder": at.folder, "version": at.version} if at else None,
        "files": {
            "generations": store.list("generations", ".parquet"),
            "predictions": [f"predictions/{m}.json" for m in job.modes],
            "metrics": "metrics.json",
        },
        "timings": timings,
    }
    if generated != expected:
        raise StepbackError(f"{job.output_uri}: {generated} generation rows committed, expected {expected}")
    store.write_json("manifest.json", manifest)
    from stepback_ray.evaluation.report import build_report

    build_report(job.output_uri, job.storage)
    return RunResult(job.output_uri, result_metrics, manifest)


def run_profile_job(job: JobSpec) -> RunResult:
    """Profile only (the nightly job): every user of the input, unchanged ones carried over from the store."""
    store, work, resumed, t_start = _start(job, needs_profiles=True)
    try:
        with executor(job) as ex:
            work = work or prepare_work(job, needs_profiles=True)
            at, stats, _ = run_user_passes(ex, job, work, resumed)
    except RunFailed as e:
        failed_manifest(job, store, t_start, resumed, e)
        raise
    manifest = {
        **manifest_head(job, t_start, resumed, "ok"),
        "counts": {**work.counts, "shards": work.shards},
        "profiles": {"uri": at.uri, "folder": at.folder, "version": at.version, **stats},
        "timings": {"total_s": round(time.time() - t_start, 3)},
    }
    store.write_json("manifest.json", manifest)
    return RunResult(job.output_uri, {"profiles": stats}, manifest)
