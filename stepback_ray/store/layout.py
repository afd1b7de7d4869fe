"""The profile store's layout and what every part of the store reads of it: step-back profiles kept by user across
runs, so a nightly job redoes only what changed.

Layout under the store's URI::

    versions/date=2026-11-22/run=<run_id>/profiles/chunk-<shard>.parquet   one file per shard (user hash)
    versions/date=2026-11-22/run=<run_id>/started.json                    the version it builds on
    versions/date=2026-11-22/run=<run_id>/manifest.json                   counts: carried, recomputed, ...
    CURRENT.json                                                          the latest complete version

A run writes a complete new version (unchanged users are carried over row for row), and only then moves
``CURRENT.json`` to it: readers always see a whole version, a failed night leaves yesterday's in place, and a
rerun with the same run id resumes the version it started. Each row keeps the fingerprint of (history, model,
prompt version, profile settings); a user whose fingerprint is unchanged is carried over without an LLM call.
In incremental mode a user whose history only grew gets the old profile merged with a profile of the new items
(old profile + new items -> new profile); every ``full_rebuild_every``-th run rebuilds everyone from scratch.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from stepback_ray.storage import RunStore


@dataclass
class StoreVersion:
    """Where this run writes its profiles, what it builds on, and whether it rebuilds everyone."""

    root: RunStore
    version: str
    """Folder of this run's version, relative to the store root."""
    previous: str | None
    """Folder of the version it builds on (None: first run)."""
    full: bool
    """Rebuild every profile (first run, or the periodic full rebuild)."""
    runs_since_full: int
    previous_users: int
    base_token: str | None = None
    """``CURRENT.json`` as this run read it (its ETag or hash): the commit is a compare-and-swap against it."""
    committed: dict[str, Any] | None = None
    """The version's manifest when this run already committed it (a rerun after a later stage failed): the
    profile pass is done and is not run or committed again."""

    @property
    def profiles_dir(self) -> str:
        return f"{self.version}/profiles"

    @property
    def previous_profiles_dir(self) -> str | None:
        return f"{self.previous}/profiles" if self.previous else None


def list_versions(root: RunStore) -> list[str]:
    """Every version folder of the store (``versions/date=.../run=...``), finished or not, in folder order."""
    out = []
    for date_dir in root.list("versions"):
        out.extend(root.list(date_dir))
    return out


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
