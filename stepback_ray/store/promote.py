"""``stepback promote``: move a profile store's ``CURRENT.json`` to any finished version (also back to an older
one, or to a version the quality gate refused, once an operator has looked at it) by compare-and-swap.

A version the dry-run engine made (placeholder profiles, no model) is refused over a current version a model made,
unless forced: a capacity test run against a production store must not replace its profiles by a slip of the
version name."""

from __future__ import annotations

import datetime as dt
from typing import Any

from stepback_ray.config import StorageConfig
from stepback_ray.errors import StepbackError
from stepback_ray.storage import PointerMoved, RunStore
from stepback_ray.store.integrity import verify_version
from stepback_ray.store.layout import engine_of, list_versions, placeholders_over_model, read_pointer

DAMAGED_POINTER = "a damaged CURRENT.json"


def resolve_version(root: RunStore, uri: str, version: str) -> str:
    """A version as written (``versions/date=.../run=<id>``), or its run id alone."""
    version = version.strip("/")
    found = list_versions(root)
    if version in found:
        return version
    by_run = [v for v in found if v.endswith(f"/run={version}") or v.endswith(f"/{version}")]
    if len(by_run) == 1:
        return by_run[0]
    raise StepbackError(
        f"{uri}: no version {version} in the store (its versions: "
        f"{', '.join(found[-3:]) or 'none'}{', ...' if len(found) > 3 else ''})"
    )


def refuse_model_free_over_model(
    root: RunStore, uri: str, version: str, manifest: dict[str, Any], current: dict[str, Any] | None
) -> None:
    """One line (:class:`StepbackError`) when ``version`` was made by a model-free engine (dry-run) and the current
    version by a model."""
    clash = placeholders_over_model(root, manifest, current)
    if clash:
        kind, current_kind, current_model = clash
        raise StepbackError(
            f"{uri}: {version} was made by the {kind} engine (placeholder profiles, no model) and the current "
            f"version {current['version']} by the {current_kind} engine ({current_model}); promoting it would "
            "serve placeholders: add --force to promote it anyway"
        )


def promote(
    uri: str, version: str, storage: StorageConfig, force: bool = False
) -> tuple[str | None, str, dict[str, Any]]:
    """Point ``CURRENT.json`` at a finished ``version`` by compare-and-swap. Returns (the version it pointed at
    before, the version it points at now, the promoted version's manifest). ``force``: also a dry-run version over
    a model's (:func:`refuse_model_free_over_model`)."""
    root = RunStore(uri, storage)
    version = resolve_version(root, uri, version)
    if not root.exists(f"{version}/manifest.json"):
        raise StepbackError(
            f"{uri}: {version} is incomplete (no manifest.json: its run never finished); only a "
            "finished version can be promoted"
        )
    manifest = root.read_json(f"{version}/manifest.json")
    missing = [f for f in manifest.get("files", []) if not root.exists(f)]
    if missing:
        raise StepbackError(
            f"{uri}: {version} is incomplete ({len(missing)} of its {len(manifest['files'])} profile "
            f"files are gone, e.g. {missing[0]}); it cannot be promoted"
        )
    damaged = verify_version(root, version, manifest)
    if damaged:
        (file, problem), more = damaged[0], f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise StepbackError(
            f"{uri}: {version} cannot be promoted: {file} is damaged: {problem}{more}; restore the file or "
            "promote another version"
        )
    current, token, damage = read_pointer(root, damaged_ok=True)
    before = current["version"] if current else None
    if before == version:
        return before, version, manifest
    if not force:
        refuse_model_free_over_model(root, uri, version, manifest, current)
    pointer = manifest.get("pointer") or {  # a manifest written before pointers were recorded in it
        "version": version,
        "run_id": manifest.get("run_id"),
        "users": manifest.get("users"),
        "num_shards": (current or {}).get("num_shards"),
        "runs_since_full": 0,
        "full_rebuild": manifest.get("full_rebuild"),
        "model": engine_of(manifest)[1],
        "engine_kind": engine_of(manifest)[0],
    }
    if damage:  # a damaged CURRENT.json is replaced by this verified version (its shard count cannot be compared)
        before = DAMAGED_POINTER
    elif current and pointer.get("num_shards") != current.get("num_shards"):
        raise StepbackError(
            f"{uri}: {version} has {pointer.get('num_shards')} shards, the store "
            f"{current['num_shards']}; it cannot be promoted"
        )
    try:
        root.swap_json(
            "CURRENT.json",
            {
                **pointer,
                "committed": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "promoted_from": None if damage else before,
            },
            token,
        )
    except PointerMoved:
        now = (read_pointer(root, damaged_ok=True)[0] or {}).get("version")
        raise StepbackError(
            f"{uri}: CURRENT.json moved to {now} while promoting; nothing changed, run promote again"
        ) from None
    return before, version, manifest
