"""Retention of profile store versions: after each commit, finished versions beyond the newest
``profile_store.keep_versions`` are deleted, so a nightly store does not grow by a full copy of every profile
each night, and a user's old profiles do not outlive the window.

What is a version's place in the order: the time its manifest was written (``finished_at``, set by
:func:`~stepback_ray.store.versions.commit_version` just before it moves ``CURRENT.json``: commit order), for a
manifest written before that field existed the day in its folder name. Never deleted:

- the version ``CURRENT.json`` points at (also when it was promoted back to an old one);
- a folder without ``manifest.json`` (a run in progress, a failed run that may resume, or one abandoned after the
  store moved on: retention cannot tell a live run from a dead one, and deleting under a live run would leave it
  writing a partial version), and the version it builds on (``previous`` in its ``started.json``). Such folders
  are reported, those not built on the current version as ``abandoned`` (they can never commit: their
  compare-and-swap would fail and a rerun is refused), for an operator to remove.

Versions the quality gate refused have a manifest and count among the newest N like any finished version.
"""

from __future__ import annotations

from typing import Any

from stepback_ray.storage import RunStore
from stepback_ray.store.layout import list_versions, read_pointer


def _order_key(root: RunStore, version: str) -> tuple[str, str]:
    manifest = root.read_json(f"{version}/manifest.json")
    day = version.split("date=", 1)[-1].split("/", 1)[0]
    return (manifest.get("finished_at") or f"{day}T00:00:00Z", version)


def apply_retention(root: RunStore, keep: int) -> dict[str, Any]:
    """Delete the finished versions beyond the newest ``keep`` (see the module doc); returns what was deleted and
    what was kept for which reason."""
    current = (read_pointer(root)[0] or {}).get("version")
    finished: list[tuple[str, str]] = []
    building: dict[str, str | None] = {}  # a folder without a manifest -> the version it builds on
    for v in list_versions(root):
        if root.exists(f"{v}/manifest.json"):
            finished.append(_order_key(root, v))
        else:
            started = root.read_json(f"{v}/started.json") if root.exists(f"{v}/started.json") else {}
            building[v] = started.get("previous")
    finished.sort(reverse=True)
    newest = [v for _, v in finished[:keep]]
    bases = {b for b in building.values() if b}
    deleted = [v for _, v in finished if v not in newest and v != current and v not in bases]
    for v in deleted:
        root.remove(v)
    for date_dir in {v.rsplit("/", 1)[0] for v in deleted}:
        if not root.list(date_dir):
            root.remove(date_dir)
    return {
        "keep_versions": keep,
        "deleted": deleted,
        "newest": newest,
        "in_progress": sorted(v for v, b in building.items() if b == current),
        "abandoned": sorted(v for v, b in building.items() if b != current),
        "kept_as_base": sorted(b for b in bases if b not in newest and b != current),
    }
