"""Forgetting a person: their profiles, embeddings and outputs removed everywhere, and kept out afterwards.

``stepback forget --store URI --user ID`` does three things, in this order, each safe to repeat:

1. **Deny-list.** The ids go into the store's ``forgotten/deny-list.json`` (ids and the date only), written by
   compare-and-swap so two forget calls never lose each other's ids. Every later ``stepback profile`` / ``run``
   against the store reads it and neither profiles nor generates for a listed user; the manifest counts them as
   ``forgotten_users`` (and ``forgotten_queries``), so nobody disappears silently. ``--undo`` takes ids off the
   list (what was deleted stays deleted).
2. **Store.** Every Parquet file of every version under ``versions/`` (the current one, the retained ones, and a
   version a running job is still writing) that holds a listed user is rewritten without that user's rows, one
   atomic write per file (local: temporary file and rename; S3: one PUT). Files without such a user are not
   touched.
3. **Run outputs** (``--runs URI``): the same for ``generations/``, ``profiles/``, ``embeddings/`` and the staged
   input ``_staged/``. A generation row goes when the user is among its authors *or* its prompt borrowed the
   user's profile and history (the ``random-profile`` / ``pplug-random`` controls of other users). The run's
   ``predictions/``, per-mode ``metrics.json`` and report are rebuilt from the rows that remain.

Why this order: the deny-list is written before any file is scanned, so a nightly job racing the forget either
read the list at its start (and skips the user), or finds the new list when it re-reads it just before its
commit and removes the user from its own version (:func:`recheck_before_commit`), or had already written its
files before this call scanned the version folders (and the scan removes the user there). No interleaving brings
the user back. A forget killed part-way leaves every file either old or rewritten; rerunning it finishes the job.

Each call writes an audit record (``forgotten/audit/<time>-<id>.json``, also printed): the ids, which were
found nowhere (reported, not an error), the files rewritten, the rows removed per kind and per file, and the store's
current version.

``--dry-run`` reads what a forget reads and writes nothing (no deny-list, no file, no audit record): it prints the
same record for what the forget would do, the files it would rewrite and the rows it would remove from each. The
scrubbing itself is :mod:`~stepback_ray.store.scrub`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from stepback_ray.config import StorageConfig
from stepback_ray.errors import RunFailed, StepbackError
from stepback_ray.storage import PointerMoved, RunStore
from stepback_ray.store.layout import list_versions, read_pointer
from stepback_ray.store.scrub import Scrubbed, scrub_run, scrub_version

DENY_LIST = "forgotten/deny-list.json"
AUDIT_DIR = "forgotten/audit"


# ------------------------------------------------------------------------------------------------ deny-list
def read_deny_list(store: RunStore) -> tuple[dict[str, str], str | None]:
    """The forgotten ids (id -> date forgotten) and the token a compare-and-swap checks against."""
    data, token = store.read_versioned(DENY_LIST)
    return (dict((data or {}).get("users", {})), token)


def denied_users(store_uri: str | None, storage: StorageConfig) -> tuple[frozenset[str], str | None]:
    """The ids a job against ``store_uri`` must leave out, and the deny-list's token (to notice a forget that
    ran while the job did). No store: nothing is denied."""
    if not store_uri:
        return frozenset(), None
    users, token = read_deny_list(RunStore(store_uri, storage))
    return frozenset(users), token


def update_deny_list(
    store: RunStore, add: list[str] = (), remove: list[str] = (), attempts: int = 20
) -> tuple[list[str], list[str]]:
    """Add and remove ids by compare-and-swap (retried when another forget wrote in between). Returns (ids that
    were already listed, ids that were not listed) among those asked for."""
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    for _ in range(attempts):
        users, token = read_deny_list(store)
        before = set(users)
        users.update({u: users.get(u, today) for u in add})
        for u in remove:
            users.pop(u, None)
        try:
            store.swap_json(DENY_LIST, {"users": dict(sorted(users.items()))}, token)
        except PointerMoved:
            continue
        asked = [*add, *remove]
        return [u for u in asked if u in before], [u for u in asked if u not in before]
    raise StepbackError(f"{store.uri_of(DENY_LIST)}: kept changing under {attempts} attempts to update it")


class ForgetIncomplete(RunFailed):
    """A forget that met damaged files: every other file is scrubbed and the ids are on the deny-list, but the
    damaged ones may still hold the users' rows (exit 3). ``record`` is the audit record, written all the same."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


def is_store(store: RunStore) -> bool:
    return store.exists("CURRENT.json") or store.exists("versions")


# ------------------------------------------------------------------------------------------------ the command
def forget(
    store_uri: str,
    ids: list[str],
    runs: list[str] = (),
    storage: StorageConfig | None = None,
    undo: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Forget ``ids`` in the store (and ``runs``), or with ``undo`` take them off the deny-list. Returns the
    audit record, which is also written to the store. ``dry_run``: the record of what the call would do (files
    to rewrite, rows to remove per kind and per file, ids on the deny-list already), and nothing written."""
    storage = storage or StorageConfig()
    ids = list(dict.fromkeys(i.strip() for i in ids if i and i.strip()))
    if not ids:
        raise StepbackError("no user ids given (--user ID or --users-file FILE)")
    store = RunStore(store_uri, storage)
    if not is_store(store):
        raise StepbackError(f"{store_uri}: not a profile store (no CURRENT.json and no versions/)")
    for uri in runs:  # before anything changes: a wrong --runs is one line, not half a forget
        if not RunStore(uri, storage).exists("_run_spec.json"):
            raise StepbackError(f"{uri}: not a run output (no _run_spec.json)")
    current = (read_pointer(store)[0] or {}).get("version")  # a damaged pointer: one line before anything changes
    now = dt.datetime.now(dt.timezone.utc)
    record: dict[str, Any] = {
        "action": ("undo" if undo else "forget") + (" (dry run: nothing written)" if dry_run else ""),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "store": store_uri,
        "current_version": current,
        "users": ids,
    }
    if undo:
        if dry_run:
            listed = set(read_deny_list(store)[0])
            listed, not_listed = [u for u in ids if u in listed], [u for u in ids if u not in listed]
        else:
            listed, not_listed = update_deny_list(store, remove=ids)
        record.update(removed_from_deny_list=listed, not_on_deny_list=not_listed)
    else:
        if dry_run:
            denied = read_deny_list(store)[0]
            already = [u for u in ids if u in denied]
        else:
            already, _ = update_deny_list(store, add=ids)  # first: from here on no job brings them back
        wanted = set(ids)
        done = Scrubbed()
        versions = list_versions(store)
        for version in versions:
            done.add(scrub_version(store, version, wanted, dry_run=dry_run))
        for uri in runs:
            done.add(scrub_run(uri, wanted, storage, dry_run=dry_run))
        record.update(
            already_on_deny_list=already,
            not_found=[u for u in ids if u not in done.found],
            versions_scanned=len(versions),
            runs=list(runs),
            **{"files_to_rewrite" if dry_run else "files_rewritten": done.files},
            **{"rows_to_remove" if dry_run else "rows_removed": done.rows},
            rows_by_file=done.rows_by_file,
            incomplete=bool(done.damaged),
            damaged_files=done.damaged,
        )
    if dry_run:
        return record
    audit = f"{AUDIT_DIR}/{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}.json"
    store.write_json(audit, record)
    if record.get("incomplete"):
        first, n = record["damaged_files"][0], len(record["damaged_files"])
        raise ForgetIncomplete(
            f"forget incomplete: {n} file{'s' if n > 1 else ''} could not be checked and may still hold the "
            f"users' rows, e.g. {first['file']} ({first['problem']}); every other file is done and the ids are on "
            f"the deny-list; restore or delete the damaged file{'s' if n > 1 else ''} and run forget again "
            f"(audit: {store.uri_of(audit)})",
            record,
        )
    return record


# ------------------------------------------------------------------------------------------------ in a job
def leave_out(queries: list, denied: frozenset[str]) -> tuple[list, set[str], int]:
    """The queries a job may run once ``denied`` users are left out: a query led by a forgotten user is dropped;
    a forgotten co-author is taken off the byline (with their history) and the paper runs with the others.
    Returns (queries kept, forgotten users met, queries dropped)."""
    if not denied:
        return queries, set(), 0
    kept, met, dropped = [], set(), 0
    for q in queries:
        gone = [u for u in q.user_ids if u in denied]
        if not gone:
            kept.append(q)
            continue
        met.update(gone)
        if q.user_ids[0] in denied:
            dropped += 1
            continue
        pairs = [(u, h) for u, h in zip(q.user_ids, q.histories) if u not in denied]
        q.user_ids, q.histories = [u for u, _ in pairs], [h for _, h in pairs]
        kept.append(q)
    return kept, met, dropped


def recheck_before_commit(
    store_uri: str, storage: StorageConfig, token_at_start: str | None, version: str
) -> Scrubbed | None:
    """Just before a job moves ``CURRENT.json`` to ``version``: if a forget ran since the job read the deny-list,
    remove the newly forgotten users from the version it built (they may have been carried over before the
    forget). None when the list is unchanged."""
    store = RunStore(store_uri, storage)
    users, token = read_deny_list(store)
    if token == token_at_start or not users:
        return None
    return scrub_version(store, version, set(users))
