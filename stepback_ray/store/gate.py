"""The quality gate of a profile store.

Before ``CURRENT.json`` moves to a new version, the version is checked against ``profile_store.gate`` (every
threshold optional; none set: no gate):

- ``min_ok_share``: profiles with status ``ok`` (not ``error``, ``partial``, ...) over all of the version's;
- ``min_identifiability_top1``: the top-1 identifiability that :mod:`~stepback_ray.profiling.quality` measures on
  every pass (a model or prompt change that makes profiles generic shows here first);
- ``min_lift``: ``profile+rag`` minus ``random-profile`` (mean score) on a fixed sample of ``lift_users`` users
  with golds, generated against the new version (:mod:`~stepback_ray.pipeline.gate_sample`): the profiles still
  carry the person, not only the prompt format;
- ``max_changed_without_history_change``: of the users present in the previous version with a profile (not an
  ``error`` row: a failed profile is retried, and changes by design) and the same history (the same set of
  ``history_ids``), the share whose profile text changed. Carried-over users never change, so this is the share
  of profiles rewritten for no new evidence: a settings or model change, or a periodic full rebuild redoing
  incremental profiles. An item edited in place under the same id counts as the same history. The first version
  (nothing to compare with), or one where no user kept their history, passes this check.

A ``min_...`` figure that cannot be measured (no profiles, fewer than two users to identify) fails its check. A
version that fails is kept, complete, with the gate's figures in its manifest; ``CURRENT.json`` does not move,
and the run fails with :class:`GateFailed` (exit 4) naming every failed check. An operator who has looked at it
can serve it anyway with ``stepback promote`` (:mod:`~stepback_ray.store.promote`).
"""

from __future__ import annotations

from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.data.rows import status_kind
from stepback_ray.errors import DamagedFile, RunFailed
from stepback_ray.store.integrity import VersionFiles
from stepback_ray.store.layout import StoreVersion


class GateFailed(RunFailed):
    """The new version did not pass ``profile_store.gate``: it is kept, not made current."""

    exit_code = 4

    def __init__(self, message: str, gate: dict[str, Any]):
        super().__init__(message)
        self.counts = {"gate": gate}


def _check(
    name: str, value: float | None, limit: float, at_least: bool, detail: str, unmeasured_passes: bool = False
) -> dict[str, Any]:
    if value is None:
        passed = unmeasured_passes
    else:
        passed = value >= limit if at_least else value <= limit
    return {
        "check": name,
        "value": None if value is None else round(value, 4),
        "limit": limit,
        "passed": passed,
        "detail": detail,
    }


def changed_without_history_change(sv: StoreVersion) -> tuple[int, int]:
    """(users whose profile text changed, users eligible): eligible are the users of both the previous and the new
    version whose previous row is not an engine error and whose set of history ids is the same. Shard by shard: a store
    keeps its shard count, so user u is in ``chunk-<s>.parquet`` of both versions."""
    if sv.previous is None:
        return 0, 0
    cols = ["user_id", "history_ids", "profile_text", "status"]
    changed = eligible = 0
    base = VersionFiles(sv.root, sv.previous)
    for rel in sv.root.list(sv.previous_profiles_dir, ".parquet"):
        new_rel = f"{sv.profiles_dir}/{rel.rsplit('/', 1)[1]}"
        if not sv.root.exists(new_rel):
            continue
        try:
            old = {r["user_id"]: r for r in base.read(rel, columns=cols).to_pylist()}
        except DamagedFile:  # not carried (the version names it): nothing to compare its users with
            continue
        for r in sv.root.read_table(new_rel, columns=cols).to_pylist():
            p = old.get(r["user_id"])
            if (
                p is None
                or status_kind(p["status"]) == "error"
                or sorted(p["history_ids"] or []) != sorted(r["history_ids"] or [])
            ):
                continue
            eligible += 1
            changed += int(r["profile_text"] != p["profile_text"])
    return changed, eligible


def evaluate_gate(job: JobSpec, sv: StoreVersion, stats: dict[str, Any]) -> dict[str, Any] | None:
    """The gate's checks of a new version with its figures (None: no gate configured)."""
    gate = job.profile_store.gate
    if not gate.enabled:
        return None
    checks = []
    if gate.min_ok_share is not None:
        users, ok = stats["users"], stats["statuses"].get("ok", 0)
        checks.append(
            _check(
                "min_ok_share", ok / users if users else None, gate.min_ok_share, True, f"{ok} of {users} profiles ok"
            )
        )
    if gate.min_identifiability_top1 is not None:
        ident = stats["quality"]["identifiability"]
        checks.append(
            _check(
                "min_identifiability_top1",
                ident["top1"],
                gate.min_identifiability_top1,
                True,
                f"{ident['users']} sample users, chance {ident['chance_top1']}",
            )
        )
    if gate.max_changed_without_history_change is not None:
        changed, eligible = changed_without_history_change(sv)
        detail = (
            f"{changed} of {eligible} users with an unchanged history got a new profile text"
            if eligible
            else "no previous version to compare with"
            if sv.previous is None
            else "no user kept the same history"
        )
        checks.append(
            _check(
                "max_changed_without_history_change",
                changed / eligible if eligible else None,
                gate.max_changed_without_history_change,
                False,
                detail,
                unmeasured_passes=True,
            )
        )
    if gate.min_lift is not None:
        lift = stats.get("gate_sample") or {}
        detail = (
            f"profile+rag {lift['profile+rag']} - random-profile {lift['random-profile']} over {lift['users']} "
            f"sample users, 95 % interval [{lift['lo']:+g}, {lift['hi']:+g}]"
            if lift.get("mean") is not None
            else lift.get("detail", "not measured")
        )
        checks.append(_check("min_lift", lift.get("mean"), gate.min_lift, True, detail))
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def describe_failures(gate: dict[str, Any]) -> str:
    parts = []
    for c in gate["checks"]:
        if not c["passed"]:
            op = ">=" if c["check"].startswith("min_") else "<="
            value = "not measurable" if c["value"] is None else f"{c['value']:g}"
            parts.append(f"{c['check']}: {value}, needs {op} {c['limit']:g} ({c['detail']})")
    return "; ".join(parts)


def refuse_failed(job: JobSpec, sv: StoreVersion, manifest: dict[str, Any]) -> None:
    """Raise :class:`GateFailed` when the manifest's gate failed (the version stays, uncommitted)."""
    gate = manifest.get("gate")
    if gate is None or gate["passed"]:
        return
    raise GateFailed(
        f"{job.profile_store.uri}: quality gate refused {sv.version}: {describe_failures(gate)}; "
        f"CURRENT.json stays on {sv.previous or 'nothing (an empty store)'}. Inspect the version, then "
        f"`stepback promote --store {job.profile_store.uri} --version {sv.version}` to serve it anyway",
        gate,
    )
