"""Scrubbing a store version or a run output: its Parquet files rewritten without a set of users' rows (for
``stepback forget``), or with ``dry_run`` only counted.

A file that holds none of the users is not touched; an emptied file is kept with its schema and no rows. A generation
row goes when one of the users is among its authors *or* its prompt borrowed that user's profile and history (the
``random-profile`` / ``pplug-random`` controls). A dry run reads exactly what a forget reads and writes nothing: not
the files, not a version's checksums, not a run's predictions.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stepback_ray.config import StorageConfig
from stepback_ray.data import donors
from stepback_ray.errors import StepbackError
from stepback_ray.evaluation.report import build_report, is_profile_run
from stepback_ray.evaluation.summary import summarize
from stepback_ray.modes import mode_spec
from stepback_ray.storage import RunStore
from stepback_ray.store.integrity import VersionFiles

LOGS = "logs"
"""A run output's log folder (Ray's own output, ``logs/ray.log``): a worker's error text may quote a user's id or
history, so a forget replaces every line naming a forgotten id (``log_lines`` in its counts)."""
REMOVED_LINE = b"[line removed by stepback forget]\n"

REBUILD_OWED = "_forget_rebuild_owed.json"
"""In a run output: a forget removed generation rows there but met a damaged file, so its predictions, metrics and
report still hold the removed rows until a later forget rebuilds them."""


@dataclass
class Scrubbed:
    """What one scrub removed (or, in a dry run, would remove): files rewritten, rows per kind and per file, and
    which of the ids it found."""

    files: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)
    rows_by_file: dict[str, int] = field(default_factory=dict)
    found: set[str] = field(default_factory=set)
    damaged: list[dict[str, str]] = field(default_factory=list)
    """Files that could not be checked (unreadable, or not the bytes their version committed): they may still hold
    the users' rows."""

    def add(self, other: Scrubbed) -> None:
        self.files += other.files
        for k, v in other.rows.items():
            self.rows[k] = self.rows.get(k, 0) + v
        self.rows_by_file.update(other.rows_by_file)
        self.found |= other.found
        self.damaged += other.damaged


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
    store: RunStore,
    rel: str,
    ids: set[str],
    kind: str,
    seed: int | None = None,
    version: VersionFiles | None = None,
    dry_run: bool = False,
) -> Scrubbed:
    """Rewrite one Parquet file without the rows of ``ids`` (not touched when it holds none). An emptied file is
    kept, with its schema and no rows: readers that expect one file per shard still find it. ``version``: the
    finished store version the file belongs to, whose checksums it is checked against and kept in step with. A file
    that does not parse, or is not what its version committed, is reported in ``damaged`` (what rows of it could
    be read are scrubbed all the same). ``dry_run``: the same report, and the file left as it is."""
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
        keep = pq.read_table(io.BytesIO(data)).filter(pc.invert(hit)) if n and not dry_run else None
    except (pa.ArrowException, OSError) as e:  # the bytes are here: what fails is their content
        problem = f"not a readable Parquet file ({str(e).splitlines()[0]})"
        n = 0
    if problem:
        out.damaged.append({"file": store.uri_of(rel), "problem": problem})
    if not n:
        return out
    if not dry_run:
        if version is not None and not problem:  # its new checksum first: killed after the write, it still verifies
            version.expect(rel, keep)
        store.write_table(rel, keep)
    out.files.append(store.uri_of(rel))
    out.rows[kind] = n
    out.rows_by_file[store.uri_of(rel)] = n
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
    store: RunStore,
    folder: str,
    ids: set[str],
    kind: str,
    seed: int | None = None,
    version: VersionFiles | None = None,
    dry_run: bool = False,
) -> Scrubbed:
    """Every Parquet file under ``folder`` (any depth)."""
    out = Scrubbed()
    for rel in _parquet_files(store, folder):
        out.add(scrub_file(store, rel, ids, kind, seed, version, dry_run))
    return out


def _files(store: RunStore, folder: str, suffix: str = "") -> list[str]:
    """Relative paths of the files under ``folder`` ending in ``suffix``, at any depth (temporary files left
    out)."""
    if not store.exists(folder):
        return []
    base = store.path(folder)
    if hasattr(store.fs, "invalidate_cache"):
        store.fs.invalidate_cache(base)
    root = store.root.rstrip("/") + "/"
    return sorted(
        p[len(root) :]
        for p in store.fs.find(base)
        if p.endswith(suffix) and ".tmp-" not in p.rsplit("/", 1)[-1] and p.startswith(root)
    )


def _parquet_files(store: RunStore, folder: str) -> list[str]:
    """Relative paths of the Parquet files under ``folder``, at any depth (temporary files left out)."""
    return _files(store, folder, ".parquet")


def scrub_version(store: RunStore, version: str, ids: set[str], dry_run: bool = False) -> Scrubbed:
    """One store version: its profiles and its Persona-Plug item embeddings; a finished version's checksums are
    checked and follow the rewritten files (:mod:`~stepback_ray.store.integrity`). ``dry_run``: counted only (the
    checksums of a forget killed part-way are not settled either)."""
    files = VersionFiles(store, version)
    out = scrub_tree(store, f"{version}/profiles", ids, "profiles", version=files, dry_run=dry_run)
    out.add(scrub_tree(store, f"{version}/embeddings", ids, "embeddings", version=files, dry_run=dry_run))
    if not dry_run:
        files.settle()
    return out


# ------------------------------------------------------------------------------------------------ run outputs
def scrub_run(uri: str, ids: set[str], storage: StorageConfig, dry_run: bool = False) -> Scrubbed:
    """One run output: its row folders, its staged input, then predictions, metrics and report rebuilt. ``dry_run``:
    counted only; the files that would be rebuilt are named (``files``), nothing is written."""
    run = RunStore(uri, storage)
    if not run.exists("_run_spec.json"):
        raise StepbackError(f"{uri}: not a run output (no _run_spec.json)")
    spec = run.read_json("_run_spec.json")
    seed = (spec.get("generation") or {}).get("seed", 0)
    out = Scrubbed()
    out.add(scrub_tree(run, "generations", ids, "generations", seed, dry_run=dry_run))
    gate_sample = "_gate_sample/generations"  # the quality gate's sample
    out.add(scrub_tree(run, gate_sample, ids, "gate_sample", seed, dry_run=dry_run))
    out.add(scrub_tree(run, "profiles", ids, "profiles", dry_run=dry_run))
    out.add(scrub_tree(run, "embeddings", ids, "embeddings", dry_run=dry_run))
    out.add(scrub_tree(run, "_staged", ids, "staged_input", dry_run=dry_run))
    out.add(scrub_logs(run, ids, dry_run=dry_run))
    owed = run.exists(REBUILD_OWED)  # an earlier forget removed rows but could not rebuild the summary
    if (out.rows.get("generations") or owed) and run.exists("metrics.json"):
        if out.damaged:  # the summary would read the damaged files: the forget that finds none rebuilds it
            if not dry_run:
                since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                run.write_json(REBUILD_OWED, {"since": since})
            out.damaged.append({"file": run.uri_of("predictions/"), "problem": "not rebuilt (damaged run files)"})
        elif dry_run:
            _name_rebuilt(run, spec, out)
        else:
            _rebuild_summary(run, spec, out)
            run.remove(REBUILD_OWED)
    if is_profile_run(run) and run.exists("report.html"):  # it names users not ok: rebuilt from what remains
        if not dry_run:
            build_report(run.uri, run.storage)
        out.files.append(run.uri_of("report.html"))
    return out


def scrub_logs(run: RunStore, ids: set[str], dry_run: bool = False) -> Scrubbed:
    """Every file under the run's ``logs/`` with each line that names one of ``ids`` as a whole word replaced by
    :data:`REMOVED_LINE` (bytes in, bytes out: nothing else in the file changes). A short numeric id may also
    match an unrelated number: such a line goes too, as a forget errs on the side of removing. Log hits count as
    ``log_lines``, not as finding the user (``found`` means rows)."""
    out = Scrubbed()
    if not ids:
        return out
    pattern = re.compile(b"|".join(rb"(?<!\w)" + re.escape(i.encode()) + rb"(?!\w)" for i in sorted(ids)))
    for rel in _files(run, LOGS):
        lines = run.read_bytes(rel).splitlines(keepends=True)
        hits = [i for i, line in enumerate(lines) if pattern.search(line)]
        if not hits:
            continue
        for i in hits:
            lines[i] = REMOVED_LINE
        out.files.append(run.uri_of(rel))
        out.rows["log_lines"] = out.rows.get("log_lines", 0) + len(hits)
        out.rows_by_file[run.uri_of(rel)] = len(hits)
        if not dry_run:
            run.write_bytes(rel, b"".join(lines))
    return out


def _name_rebuilt(run: RunStore, spec: dict[str, Any], out: Scrubbed) -> None:
    """The run's files a forget rewrites after its generation rows (predictions, metrics, manifest, report), named
    in ``out`` as :func:`_rebuild_summary` names them."""
    if out.rows.get("generations"):
        out.rows["predictions"] = out.rows["generations"]  # one prediction per generation row
    out.files += [run.uri_of(f"predictions/{m}.json") for m in spec["modes"]]
    out.files += [run.uri_of(f) for f in ("metrics.json", "manifest.json", "report.html") if run.exists(f)]


def _rebuild_summary(run: RunStore, spec: dict[str, Any], out: Scrubbed) -> None:
    """Predictions and per-mode metrics from the remaining rows; the report again if the run had one."""
    metrics, counts = summarize(run, spec["task"], spec["modes"])
    old = run.read_json("metrics.json")
    run.write_json("metrics.json", {**old, **metrics})
    if out.rows.get("generations"):
        out.rows["predictions"] = out.rows["generations"]  # one prediction per generation row
    out.files += [run.uri_of(f"predictions/{m}.json") for m in spec["modes"]] + [run.uri_of("metrics.json")]
    if run.exists("manifest.json"):
        out.files.append(run.uri_of("manifest.json"))
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
