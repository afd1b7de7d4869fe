"""The per-user passes of a job (the step-back profiles, the Persona-Plug item embeddings beside them) and, with a
profile store, the version they go into: measured, gated and committed after them."""

from __future__ import annotations

import time
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.errors import RunFailed
from stepback_ray.pipeline.chunks import ProfilesAt
from stepback_ray.pipeline.executors import Executor
from stepback_ray.pipeline.gate_sample import measure_lift
from stepback_ray.pipeline.manifest import check_error_budget
from stepback_ray.pipeline.passes import passes_for
from stepback_ray.pipeline.profile_pass import PROFILE_PASS
from stepback_ray.pipeline.profile_stats import profile_stats
from stepback_ray.pipeline.run_passes import run_passes
from stepback_ray.pipeline.stages import Command
from stepback_ray.pipeline.work import Work
from stepback_ray.storage import RunStore
from stepback_ray.store import forget, integrity
from stepback_ray.store import gate as store_gate
from stepback_ray.store.versions import StoreVersion, commit_version, open_version


def profiles_target(job: JobSpec, shards: int, resuming: bool = False) -> tuple[ProfilesAt, StoreVersion | None]:
    """Where the profiles go: a new version of the job's profile store, or the run's own output."""
    if job.profile_store.uri:
        sv = open_version(job, shards, resuming)
        return ProfilesAt(job.profile_store.uri, sv.profiles_dir, sv.previous_profiles_dir, sv.full, sv.version), sv
    return ProfilesAt(job.output_uri, "profiles"), None


def run_user_passes(
    ex: Executor, job: JobSpec, work: Work, command: Command = "run", resuming: bool = False
) -> tuple[ProfilesAt | None, dict[str, Any] | None, dict[str, float]]:
    """The declared per-user passes the job needs (:func:`~.passes.passes_for`). With a profile store the profiles
    and embeddings go into one new version, committed after the passes (over the error budget, the store's pointer
    does not move); a rerun whose version is already committed gets that version's stats back and redoes nothing.
    Returns where the profiles are, their stats (None when the job profiles nobody) and the times: each pass's
    wall time (``*_pass_s``, ``gate_sample_s``), its engine start costs, and ``between_passes_s``, the bookkeeping
    around the passes (statistics, quality measures, the store's commit): this call's wall time less the passes'
    own, whatever passes there are."""
    t_enter = time.time()
    walls: dict[str, float] = {}  # the passes' wall times: disjoint intervals, so the rest is bookkeeping
    details: dict[str, float | int] = {}

    def times() -> dict[str, float]:
        between = round(time.time() - t_enter - sum(walls.values()), 3)
        return {"profile_pass_s": 0.0, **walls, **details, "between_passes_s": between}

    passes = passes_for(job, command, "users")
    profiled = PROFILE_PASS in passes
    if not passes:
        return None, None, times()
    at, sv = profiles_target(job, work.shards, resuming) if profiled else (ProfilesAt(job.output_uri, "profiles"), None)
    t0 = time.time()
    if sv is not None and sv.committed is not None:
        stats = {k: v for k, v in sv.committed.items() if k not in ("run_id", "config", "files", "pointer")}
        return at, {**stats, "chunks_committed_this_run": 0, "wall_s": round(time.time() - t0, 3)}, times()
    summaries = run_passes(ex, job, passes, work.profile_chunks, at, walls, details)
    if not profiled:
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
    damaged = integrity.base_damage(RunStore(at.uri, job.storage), sv.version) if sv is not None else []
    if damaged:  # files of the base version not carried: their users were profiled again
        stats["damaged_base_files"] = damaged
    stats.update(chunks_committed_this_run=len(summaries[PROFILE_PASS.name]), wall_s=round(time.time() - t0, 3))
    try:
        _check_and_commit(ex, job, work, at, sv, stats, walls)
    except RunFailed as e:  # what the run measured goes into its failed manifest, and so into its report
        e.counts = {
            **getattr(e, "counts", {}),
            "profile_stats": {"uri": at.uri, "folder": at.folder, "version": at.version, **stats},
        }
        raise
    return at, stats, times()


def _check_and_commit(
    ex: Executor,
    job: JobSpec,
    work: Work,
    at: ProfilesAt,
    sv: StoreVersion | None,
    stats: dict[str, Any],
    walls: dict[str, float],
) -> None:
    """The profiles' error budget, then with a profile store the gate's sample, its checks and the version's
    commit (``stats`` gains their figures, ``walls`` the sample's wall time)."""
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
