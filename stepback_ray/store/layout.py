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
import json
from dataclasses import dataclass
from typing import Any

from stepback_ray.errors import DamagedFile
from stepback_ray.storage import RunStore

POINTER = "CURRENT.json"


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


MODEL_FREE_ENGINES = frozenset({"dry-run"})
"""Engine kinds whose profiles come from no model (placeholders of the expected length, for capacity planning)."""


def engine_of(manifest: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(engine kind, model) a finished version was made with: its pointer's record, or for a version written before
    the kind was recorded there, the job spec its manifest keeps (None where neither says)."""
    manifest = manifest or {}
    pointer, engine = manifest.get("pointer") or {}, (manifest.get("config") or {}).get("engine") or {}
    return pointer.get("engine_kind") or engine.get("kind"), pointer.get("model") or engine.get("model")


def placeholders_over_model(
    root: RunStore, manifest: dict[str, Any], current: dict[str, Any] | None
) -> tuple[str, str, str | None] | None:
    """When the version of ``manifest`` was made by a model-free engine (dry-run) and the ``current`` pointer's
    version by a model: (the new version's engine kind, the current one's, its model); else None. A pointer written
    before kinds were recorded is read through its version's manifest."""
    kind = engine_of(manifest)[0]
    if kind not in MODEL_FREE_ENGINES or not current:
        return None
    current_kind, current_model = current.get("engine_kind"), current.get("model")
    if current_kind is None and root.exists(f"{current['version']}/manifest.json"):
        current_kind, current_model = engine_of(root.read_json(f"{current['version']}/manifest.json"))
    if current_kind is None or current_kind in MODEL_FREE_ENGINES:
        return None
    return kind, current_kind, current_model


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pointer_problem(data: bytes) -> str | None:
    """What is wrong with the bytes of a ``CURRENT.json`` (None: a pointer every reader can use)."""
    if not data.strip():
        return "empty (0 bytes)" if not data else "empty (only whitespace)"
    try:
        pointer = json.loads(data)
    except ValueError as e:
        return f"not valid JSON ({e}; truncated?)"
    if not isinstance(pointer, dict):
        return (
            f"not a store pointer (a JSON {type(pointer).__name__}, expected an object with a version and num_shards)"
        )
    for key, kind in (("version", str), ("num_shards", int)):
        if key not in pointer:
            return f"not a store pointer (no '{key}')"
        if not isinstance(pointer[key], kind) or isinstance(pointer[key], bool):
            return f"not a store pointer ('{key}' is {pointer[key]!r})"
    return None


def read_pointer(root: RunStore, damaged_ok: bool = False) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """``CURRENT.json``: (the pointer, its compare-and-swap token, what is wrong with it). A damaged pointer is one
    line naming it and how to mend it (:class:`DamagedFile`), unless ``damaged_ok`` (``stepback promote``, which
    writes a verified version over it): then (None, its token, the problem)."""
    data, token = root.read_versioned(POINTER, parse=lambda raw: raw)
    if data is None:
        return None, None, None
    problem = pointer_problem(data)
    if problem is None:
        return json.loads(data), token, None
    if damaged_ok:
        return None, token, problem
    raise DamagedFile(
        root.uri_of(POINTER),
        f"{problem}; point it at a finished version with `stepback promote --store {root.uri} --version V`",
    )
