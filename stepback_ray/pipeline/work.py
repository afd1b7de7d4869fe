"""A job's input cut into chunks for its passes (:class:`Work`): LaMP JSON read in the driver, a dataset staged by
Ray Data; forgotten users left out either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.data import collect_users, generation_chunks, lead_groups, profile_chunks
from stepback_ray.data.datasets import input_files, stage_dataset, staged_chunks
from stepback_ray.data.lamp import read_lamp
from stepback_ray.data.rows import Query, UserHistory
from stepback_ray.errors import StepbackError
from stepback_ray.generation import prompting
from stepback_ray.pipeline.profile_pass import Profiled
from stepback_ray.store import forget
from stepback_ray.tasks import get_task


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


def prepare_work(job: JobSpec, profiled: Profiled) -> Work | None:
    """Read (LaMP JSON: in the driver) or stage (datasets: a Ray Data pass) the input into per-shard chunks.
    Outside a Ray session only LaMP JSON is read (None for datasets): bad input then fails before Ray starts.
    ``profiled``: whose profiles the job computes (:func:`~stepback_ray.pipeline.profile_pass.profiled_authors`)."""
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
        counts = {"queries_in": n_in, "queries": len(kept), "users": len(users)}
        if denied:
            counts.update(forgotten_users=len(met), forgotten_queries=dropped)
        return in_memory_work(job, users, groups, profiled, counts, num_shards(job, len(groups)), deny_token)
    input_files(job)  # a missing input (or a folder without data files) is one line, before anything is written
    import ray  # deferred: a LaMP JSON job never imports Ray here

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


def in_memory_work(
    job: JobSpec,
    users: list[UserHistory],
    groups: list[list[Query]],
    profiled: Profiled,
    counts: dict[str, int],
    shards: int,
    deny_token: str | None = None,
) -> Work:
    """Chunks carried inline for users and lead-grouped queries held in memory: LaMP JSON as the driver reads it,
    and a plan's sample (:mod:`~stepback_ray.pipeline.plan_sample`). Only the users in ``profiled`` are in the
    profile chunks; every user's history travels with the generation chunks for the random-profile donors."""
    with_donors = any(prompting.uses_donor(m) for m in job.modes)
    histories = {u.user_id: u.history for u in users} if with_donors else None
    expected = sum(len(g) for g in groups)
    if profiled == "lead":
        leads = {g[0].user_id for g in groups}
        users = [u for u in users if u.user_id in leads]
    return Work(
        shards,
        profile_chunks(users, shards),
        generation_chunks(groups, shards, profiled, with_donors, histories),
        counts,
        expected,
        deny_token,
    )
