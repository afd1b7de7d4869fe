"""Opening and committing a version of the profile store (:mod:`~stepback_ray.store.layout`).

A run writes a complete new version (unchanged users are carried over row for row), and only then moves
``CURRENT.json`` to it: readers always see a whole version, a failed night leaves yesterday's in place, and a
rerun with the same run id resumes the version it started."""

from __future__ import annotations

import datetime as dt
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.errors import RunFailed, StepbackError
from stepback_ray.storage import PointerMoved, RunStore
from stepback_ray.store import gate as store_gate
from stepback_ray.store import integrity
from stepback_ray.store import retention as store_retention
from stepback_ray.store.layout import StoreVersion, list_versions, placeholders_over_model, read_pointer, utc_now


def open_version(job: JobSpec, shards: int, resuming: bool = False) -> StoreVersion:
    """Start (or resume) this run's version of the job's profile store.

    A version belongs to the job that started it (its output, recorded in ``started.json``); any other job that
    names the same run id is refused. ``resuming``: the run's own output says this is a rerun of the same job
    (same spec). A version this run already committed is then reused as it is (its generation pass, say, failed
    after the profiles were committed), and ``CURRENT.json`` stays where it is, also when later runs have
    committed since: rerunning an old night never rolls the store back. A version whose manifest was written but
    whose ``CURRENT.json`` move was not (killed in between) is committed again. An interrupted version is not
    finished once the store has moved on past the version it was building on."""
    cfg = job.profile_store
    assert cfg.uri is not None
    root = RunStore(cfg.uri, job.storage)
    current, token, _ = read_pointer(root)
    current_version = current["version"] if current else None
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    version = f"versions/date={date}/run={job.run_id}"
    existing = [v for v in list_versions(root) if v.endswith(f"/run={job.run_id}")]
    if existing:  # resuming: keep the version folder the interrupted run started
        version = existing[0]
        started = root.read_json(f"{version}/started.json") if root.exists(f"{version}/started.json") else {}
        owner = started.get("output")
        if owner is not None and owner != job.output_uri:
            raise StepbackError(f"{cfg.uri}: run {job.run_id} belongs to the job writing to {owner}; use a new run_id")
        if root.exists(f"{version}/manifest.json"):
            manifest = root.read_json(f"{version}/manifest.json")
            committed = current_version == version or current_version != manifest.get("previous")
            if committed and current_version != version and (manifest.get("gate") or {}).get("passed") is False:
                raise StepbackError(
                    f"{cfg.uri}: run {job.run_id}'s version {version} was refused by the quality "
                    f"gate and the store has moved on to {current_version}; use a new run_id (or "
                    "`stepback promote` the version)"
                )
            if committed and resuming:
                return StoreVersion(
                    root,
                    version,
                    manifest.get("previous"),
                    bool(manifest.get("full_rebuild")),
                    runs_since_full=0,
                    previous_users=0,
                    committed=manifest,
                )
            if committed:
                where = (
                    "already the store's current version"
                    if current_version == version
                    else f"already committed as {version} (the store's current version is {current_version})"
                )
                raise StepbackError(f"{cfg.uri}: run {job.run_id} is {where}; use a new run_id")
            # else: killed between writing the manifest and moving CURRENT.json: finish the commit below
        base = started.get("previous", current_version)
        if base != current_version:
            raise StepbackError(
                f"{cfg.uri}: run {job.run_id} was interrupted while building on {base}, and the store has moved on "
                f"to {current_version} since; finishing it would roll the store back: use a new run_id"
            )
    if current is not None and current["num_shards"] != shards:
        raise StepbackError(
            f"{cfg.uri}: the store has {current['num_shards']} shards but the job has {shards}; "
            "keep ray.num_shards fixed for a store (or start a new store)"
        )
    if not existing:
        root.write_json(
            f"{version}/started.json", {"run_id": job.run_id, "previous": current_version, "output": job.output_uri}
        )
    runs_since_full = current.get("runs_since_full", 0) + 1 if current else 0
    full = current is None or not cfg.incremental or runs_since_full >= cfg.full_rebuild_every
    return StoreVersion(
        root,
        version,
        current_version,
        full,
        0 if full else runs_since_full,
        current.get("users", 0) if current else 0,
        base_token=token,
    )


def _refuse_placeholders_over_a_model(job: JobSpec, sv: StoreVersion, manifest: dict[str, Any]) -> None:
    """A night run on the dry-run engine (a capacity test pointed at a production store, say) does not replace a
    model's profiles: its version stays uncommitted, and ``stepback promote --force`` serves it if that was meant."""
    current = read_pointer(sv.root, damaged_ok=True)[0]
    clash = placeholders_over_model(sv.root, manifest, current)
    if clash:
        kind, current_kind, current_model = clash
        uri = job.profile_store.uri
        raise StepbackError(
            f"{uri}: this run's {kind} engine made placeholder profiles and the current version "
            f"{current['version']} came from the {current_kind} engine ({current_model}): {sv.version} is left "
            f"uncommitted; `stepback promote --store {uri} --version {sv.version} --force` serves it anyway"
        )


def commit_version(sv: StoreVersion, job: JobSpec, shards: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write the version's manifest, then point ``CURRENT.json`` at it (the commit point): a compare-and-swap
    against the pointer this run built on, so of two jobs that started from one version only the first commits;
    the other fails, naming the version that beat it, and leaves its own version uncommitted. A version whose
    ``manifest["gate"]`` failed is left uncommitted (:mod:`~stepback_ray.store.gate`). The manifest keeps the
    pointer (what ``stepback promote`` writes) and when it was written (the commit order retention goes by).
    Returns what :func:`~stepback_ray.store.retention.apply_retention` deleted after the commit."""
    pointer = {
        "version": sv.version,
        "run_id": job.run_id,
        "num_shards": shards,
        "users": manifest["users"],
        "runs_since_full": sv.runs_since_full,
        "full_rebuild": sv.full,
        "model": job.engine.model,
        "engine_kind": job.engine.kind,  # a dry-run version is no model's profiles (``stepback promote`` checks)
    }
    manifest = {
        **manifest,
        "pointer": pointer,
        "finished_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        # every file as committed: the next night carries from it, and promote serves it, only if it still is
        integrity.CHECKSUMS: integrity.checksums_of(sv.root, integrity.version_files(sv.root, sv.version)),
    }
    sv.root.write_json(f"{sv.version}/manifest.json", manifest)
    store_gate.refuse_failed(job, sv, manifest)
    _refuse_placeholders_over_a_model(job, sv, manifest)
    try:
        sv.root.swap_json("CURRENT.json", {**pointer, "committed": utc_now()}, sv.base_token)
    except PointerMoved:
        now = read_pointer(sv.root, damaged_ok=True)[0] or {}
        raise RunFailed(
            f"{job.profile_store.uri}: another job committed {now.get('version')} (run "
            f"{now.get('run_id')}) while this run built on {sv.previous or 'an empty store'}; "
            f"{sv.version} is left uncommitted: rerun with a new run_id to build on the new version"
        ) from None
    return store_retention.apply_retention(sv.root, job.profile_store.keep_versions)
