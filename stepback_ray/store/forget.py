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
commit and removes the user from its own version (:func:`scrub_version`), or had already written its files
before this call scanned the version folders (and the scan removes the user there). No interleaving brings the
user back. A forget killed part-way leaves every file either old or rewritten; rerunning it finishes the job.

Each call writes an audit record (``forgotten/audit/<time>-<id>.json``, also printed): the ids, which were
found nowhere (reported, not an error), the files rewritten, the rows removed per kind, and the store's current
version.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stepback_ray.config import StorageConfig
from stepback_ray.data import donors
from stepback_ray.errors import RunFailed, StepbackError
from stepback_ray.evaluation.report import build_report
from stepback_ray.evaluation.summary import summarize
from stepback_ray.modes import mode_spec
from stepback_ray.storage import PointerMoved, RunStore
from stepback_ray.store.integrity import VersionFiles
from stepback_ray.store.layout import list_versions, read_pointer

DENY_LIST = "forgotten/deny-list.json"
AUDIT_DIR = "forgotten/audit"
REBUILD_OWED = "_forget_rebuild_owed.json"
"""In a run output: a forget removed generation rows there but met a damaged file, so its predictions, metrics and
report still hold the removed rows until a later forget rebuilds them."""
RUN_FOLDERS = ("generations", "profiles", "embeddings")
"""The row folders of a run output scrubbed by ``--runs`` (``_staged/`` shard folders too, see below)."""


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


# ------------------------------------------------------------------------------------------------ scrubbing
@dataclass
class Scrubbed:
    """What one scrub removed: files rewritten, rows per kind, and which of the ids it found."""

    files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    found: set[str] = field(default_factory=set)
    damaged: list[dict[str, str]] = field(default_factory=list)
    """Files that could not be checked (unreadable, or not the bytes their version committed): they may still hold
    the users' rows."""

    def add(self, other: Scrubbed) -> None:
        self.files += other.files
        for k, v in other.rows.items():
            self.rows[k] = self.rows.get(k, 0) + v
        self.found |= other.found
        self.damaged += other.damaged


class ForgetIncomplete(RunFailed):
    """A forget that met damaged files: every other file is scrubbed and the ids are on the deny-list, but the
    damaged ones may still hold the users' rows (exit 3). ``record`` is the audit record, written all the same."""

    def __init__(self, message: str, record: dict[str, Any]):
        super().__init__(message)
        self.record = record


def _hits(table: pa.Table, ids: pa.Array, donors_of: dict[str, str] | None) -> pa.Array:
    """Per row: does it belong to, or borrow from, one of ``ids``?"""
    names = table.column_names
    hit = pc.is_in(table.column("user_id"), value_set=ids) if "user_id" in names else pa.array([False] * table.num_rows)
    for col in ("user_ids", "context_user_ids"):
        if col in names:
            lists = table.column(col).combine_chunks()
            flat = pc.is_in(lists.flatten(), value_set=ids)
            parents = pc.list_parent_indices(lists)
            per_row = [False] * table.num_rows
            for parent, h in zip(parents.to_pylist(), flat.to_pylist()):
                per_row[parent] = per_row[parent] or bool(h)
            hit = pc.or_(hit, pa.array(per_row))
    if donors_of and "context_user_ids" not in names and "mode" in names:
        wanted = set(ids.to_pylist())
        borrowed = [
            mode_spec(m).donor and donors_of.get(u) in wanted
            for m, u in zip(table.column("mode").to_pylist(), table.column("user_id").to_pylist())
        ]
        hit = pc.or_(hit, pa.array(borrowed))
    return hit


def _found(table: pa.Table, ids: set[str]) -> set[str]:
    names = table.column_names
    out = set(table.column("user_id").to_pylist()) & ids if "user_id" in names else set()
    for col in ("user_ids", "context_user_ids"):
        if col in names:
            out |= set(table.column(col).combine_chunks().flatten().to_pylist()) & ids
    return out


def scrub_file(
    store: RunStore, rel: str, ids: set[str], kind: str, seed: int | None = None, version: VersionFiles | None = None
) -> Scrubbed:
    """Rewrite one Parquet file without the rows of ``ids`` (not touched when it holds none). An emptied file is
    kept, with its schema and no rows: readers that expect one file per shard still find it. ``version``: the
    finished store version the file belongs to, whose checksums it is checked against and kept in step with. A file
    that does not parse, or is not what its version committed, is reported in ``damaged`` (what rows of it could
    be read are scrubbed all the same)."""
    out = Scrubbed()
    try:
        data = store.read_bytes(rel)  # read once: the id columns to decide, the whole file only if it changes
    except FileNotFoundError:  # deleted since the listing (retention removed its version): nothing left to scrub
        return out
    problem = version.problem(rel, data) if version is not None else None
    try:
        probe = _id_columns(data)
        if probe is None:
            return out
        value_set = pa.array(sorted(ids), pa.string())
        donors_of = _chunk_donors(probe, seed) if seed is not None else None
        hit = _hits(probe, value_set, donors_of)
        n = pc.sum(pc.cast(hit, pa.int64())).as_py() or 0
        keep = pq.read_table(io.BytesIO(data)).filter(pc.invert(hit)) if n else None
    except (pa.ArrowException, OSError) as e:  # the bytes are here: what fails is their content
        problem = f"not a readable Parquet file ({str(e).splitlines()[0]})"
        n = 0
    if problem:
        out.damaged.append({"file": store.uri_of(rel), "problem": problem})
    if not n:
        return out
    if version is not None and not problem:  # its new checksum first: killed after the write, it still verifies
        version.expect(rel, keep)
    store.write_table(rel, keep)
    out.files.append(store.uri_of(rel))
    out.rows[kind] = n
    out.found = _found(probe, ids)
    if donors_of:
        out.found |= {donors_of[u] for u in probe.column("user_id").to_pylist() if donors_of.get(u) in ids}
    return out


def _id_columns(data: bytes) -> pa.Table | None:
    """The columns of a Parquet file that say whose a row is (None: a file without user ids)."""
    names = pq.ParquetFile(io.BytesIO(data)).schema_arrow.names
    present = [c for c in ("user_id", "user_ids", "context_user_ids", "mode") if c in names]
    if not {"user_id", "user_ids"} & set(present):
        return None
    return pq.read_table(io.BytesIO(data), columns=present)


def _chunk_donors(probe: pa.Table, seed: int) -> dict[str, str] | None:
    """For rows written before ``context_user_ids`` existed: each lead user's donor, recomputed as the
    generation pass chose it (a fixed derangement of the chunk's users under the run's seed)."""
    if "context_user_ids" in probe.column_names or "user_ids" not in probe.column_names:
        return None
    users = sorted(set(probe.column("user_ids").combine_chunks().flatten().to_pylist()))
    return donors(users, seed)


def scrub_tree(
    store: RunStore, folder: str, ids: set[str], kind: str, seed: int | None = None, version: VersionFiles | None = None
) -> Scrubbed:
    """Every Parquet file under ``folder`` (any depth)."""
    out = Scrubbed()
    for rel in _parquet_files(store, folder):
        out.add(scrub_file(store, rel, ids, kind, seed, version))
    return out


def _parquet_files(store: RunStore, folder: str) -> list[str]:
    """Relative paths of the Parquet files under ``folder``, at any depth (temporary files left out)."""
    if not store.exists(folder):
        return []
    base = store.path(folder)
    if hasattr(store.fs, "invalidate_cache"):
        store.fs.invalidate_cache(base)
    root = store.root.rstrip("/") + "/"
    return sorted(
        p[len(root) :]
        for p in store.fs.find(base)
        if p.endswith(".parquet") and ".tmp-" not in p.rsplit("/", 1)[-1] and p.startswith(root)
    )


def scrub_version(store: RunStore, version: str, ids: set[str]) -> Scrubbed:
    """One store version: its profiles and its Persona-Plug item embeddings; a finished version's checksums are
    checked and follow the rewritten files (:mod:`~stepback_ray.store.integrity`)."""
    files = VersionFiles(store, version)
    out = scrub_tree(store, f"{version}/profiles", ids, "profiles", version=files)
    out.add(scrub_tree(store, f"{version}/embeddings", ids, "embeddings", version=files))
    files.settle()
    return out


def is_store(store: RunStore) -> bool:
    return store.exists("CURRENT.json") or store.exists("versions")


# ------------------------------------------------------------------------------------------------ run outputs
def scrub_run(uri: str, ids: set[str], storage: StorageConfig) -> Scrubbed:
    """One run output: its row folders, its staged input, then predictions, metrics and report rebuilt."""
    run = RunStore(uri, storage)
    if not run.exists("_run_spec.json"):
        raise StepbackError(f"{uri}: not a run output (no _run_spec.json)")
    spec = run.read_json("_run_spec.json")
    seed = (spec.get("generation") or {}).get("seed", 0)
    out = Scrubbed()
    out.add(scrub_tree(run, "generations", ids, "generations", seed))
    out.add(scrub_tree(run, "_gate_sample/generations", ids, "gate_sample", seed))  # the quality gate's sample
    out.add(scrub_tree(run, "profiles", ids, "profiles"))
    out.add(scrub_tree(run, "embeddings", ids, "embeddings"))
    out.add(scrub_tree(run, "_staged", ids, "staged_input"))
    owed = run.exists(REBUILD_OWED)  # an earlier forget removed rows but could not rebuild the summary
    if (out.rows.get("generations") or owed) and run.exists("metrics.json"):
        if out.damaged:  # the summary would read the damaged files: the forget that finds none rebuilds it
            run.write_json(REBUILD_OWED, {"since": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})
            out.damaged.append({"file": run.uri_of("predictions/"), "problem": "not rebuilt (damaged run files)"})
        else:
            _rebuild_summary(run, spec, out)
            run.remove(REBUILD_OWED)
    return out


def _rebuild_summary(run: RunStore, spec: dict[str, Any], out: Scrubbed) -> None:
    """Predictions and per-mode metrics from the remaining rows; the report again if the run had one."""
    metrics, counts = summarize(run, spec["task"], spec["modes"])
    old = run.read_json("metrics.json")
    run.write_json("metrics.json", {**old, **metrics})
    if out.rows.get("generations"):
        out.rows["predictions"] = out.rows["generations"]  # one prediction per generation row
    for m in spec["modes"]:
        out.files.append(run.uri_of(f"predictions/{m}.json"))
    if run.exists("manifest.json"):
        manifest = run.read_json("manifest.json")
        manifest.setdefault("forgotten", []).append(
            {
                "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "generation_rows_removed": out.rows.get("generations", 0),
                "generation_rows_now": counts["generation_rows"],
            }
        )
        run.write_json("manifest.json", manifest)
    if run.exists("report.html"):
        build_report(run.uri, run.storage)
        out.files.append(run.uri_of("report.html"))


# ------------------------------------------------------------------------------------------------ the command
def forget(
    store_uri: str, ids: list[str], runs: list[str] = (), storage: StorageConfig | None = None, undo: bool = False
) -> dict[str, Any]:
    """Forget ``ids`` in the store (and ``runs``), or with ``undo`` take them off the deny-list. Returns the
    audit record, which is also written to the store."""
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
        "action": "undo" if undo else "forget",
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "store": store_uri,
        "current_version": current,
        "users": ids,
    }
    if undo:
        listed, not_listed = update_deny_list(store, remove=ids)
        record.update(removed_from_deny_list=listed, not_on_deny_list=not_listed)
    else:
        already, _ = update_deny_list(store, add=ids)  # first: from here on no job brings them back
        wanted = set(ids)
        done = Scrubbed()
        versions = list_versions(store)
        for version in versions:
            done.add(scrub_version(store, version, wanted))
        for uri in runs:
            done.add(scrub_run(uri, wanted, storage))
        record.update(
            already_on_deny_list=already,
            not_found=[u for u in ids if u not in done.found],
            versions_scanned=len(versions),
            runs=list(runs),
            files_rewritten=done.files,
            rows_removed=done.rows,
            incomplete=bool(done.damaged),
            damaged_files=done.damaged,
        )
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
