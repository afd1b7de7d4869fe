"""A plan's sample (``stepback plan --sample N``): N users of the job's input, drawn by id hash, as the work of a
dry run in this process, with what the whole input holds to scale the sample's cost up to.

The unit drawn is a lead user (the user a query is asked for; in a dataset, every user): the N with the smallest
:func:`~stepback_ray.data.rows.user_hash`, with all their queries and the profiles those need (co-authors' too
where the strategy shows them: :func:`~stepback_ray.pipeline.profile_pass.profiled_authors`).
LaMP JSON is read whole (it is read whole by every run); a dataset is read for its user ids and the drawn users'
rows alone (:mod:`~stepback_ray.data.sample`), never staged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.data import collect_users, lead_groups
from stepback_ray.data.lamp import read_lamp
from stepback_ray.data.rows import smallest_hashes
from stepback_ray.data.sample import sample_dataset
from stepback_ray.errors import StepbackError
from stepback_ray.pipeline.profile_pass import Profiled
from stepback_ray.pipeline.work import Work, in_memory_work
from stepback_ray.tasks import get_task

PLAN_USERS_PER_CHUNK = 64
"""Users per chunk of a sample's dry run: chunks only cut work into commits, and a sample needs no more of them
than this makes (a job's own ``ray.num_shards``, 1024 for a nightly store, would give most chunks one user)."""


@dataclass
class PlanSample:
    """The sample as work for the dry run, and the input it stands for."""

    work: Work
    units: list[str]
    """The lead users drawn, in hash order."""
    unit_of: dict[str, str]
    """Per user of the sample, the drawn lead user whose cost it counts to (itself, or a co-author's lead)."""
    input_units: int
    """Lead users in the whole input: what the sample's cost per unit scales up to."""
    input: dict[str, Any]
    """What the input holds and how each count was made (for the plan's output)."""


def draw_sample(job: JobSpec, n: int, profiled: Profiled) -> PlanSample:
    """The ``n`` lead users of the job's input with the smallest id hashes (all of them, when it has fewer)."""
    if job.input.format == "lamp":
        queries = read_lamp(job.input.questions, job.input.outputs, get_task(job.task), job.storage)
        groups = lead_groups(queries, job.limit)
        input_units = len(groups)
        everyone = {u for g in groups for q in g for u in q.user_ids}
        about = {
            "users": len(everyone),
            "lead_users": input_units,
            "queries": sum(len(g) for g in groups),
            "users_counted_from": "the LaMP JSON, read whole"
            + (f" (limit {job.limit}: its first {job.limit} lead users)" if job.limit is not None else ""),
        }
        if not groups:
            raise StepbackError(f"{job.input.questions}: no questions to run")
        units = smallest_hashes([g[0].user_id for g in groups], n)
        chosen = set(units)
        groups = [g for g in groups if g[0].user_id in chosen]
        users = collect_users([q for g in groups for q in g])
    else:
        sample = sample_dataset(job, n)
        if not sample.drawn:
            raise StepbackError(f"input.path {job.input.path}: no user ids to sample from")
        units, users, queries = sample.drawn, sample.users, sample.queries
        groups = lead_groups(queries)
        input_units = sample.input_users
        about = {
            "rows": sample.input_rows,
            "rows_counted_from": sample.rows_from,
            "layout": job.input.layout,
            "rows_are": "history items (one row per item: users are counted by id, below)"
            if job.input.layout == "item"
            else "users (one row per user; a user split over rows is counted once, below)",
            "users": sample.input_users,
            "users_counted_from": "distinct valid user ids of the whole input (its user_id values alone)",
            "sampled_rows_refused": sample.refused_rows,
        }
        if sample.row_groups is not None:
            opened, total = sample.row_groups
            about["row_groups_drawn_from"] = f"{opened} of {total}" + (
                "" if opened == total else " (drawn by the users' id hashes; see `stepback plan --help`)"
            )
        if sample.unreadable:
            about["unreadable_files"] = sample.unreadable
    unit_of: dict[str, str] = {}
    for g in groups:  # a co-author's profile is counted with the first drawn query that needs it
        for q in g:
            for u in q.user_ids:
                unit_of.setdefault(u, g[0].user_id)
    shards = max(1, -(-len(units) // PLAN_USERS_PER_CHUNK))
    counts = {"users": len(users), "queries": sum(len(g) for g in groups)}
    work = in_memory_work(job, users, groups, profiled, counts, shards)
    return PlanSample(work, units, unit_of, input_units, about)
