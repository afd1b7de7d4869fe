"""What the job reports about the profiles it committed: counts, tokens, statuses, origins, and their model-free
quality (:mod:`stepback_ray.profiling.quality`) on a sample."""

from __future__ import annotations

import json
from typing import Any

from stepback_ray import profiling
from stepback_ray.config import JobSpec
from stepback_ray.data.rows import status_kind
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_users
from stepback_ray.pipeline.work import Work
from stepback_ray.profiling import quality as profile_quality
from stepback_ray.storage import RunStore
from stepback_ray.store.versions import StoreVersion
from stepback_ray.tasks import get_task


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
