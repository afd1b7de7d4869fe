"""The commit layer: whole chunks written atomically, exactly once per row, and what a rerun still has to do.

This is the pipeline's sink. A chunk reaches its commit stage as one block; the commit refuses a chunk with a row
missing (a lost row is an error, never a short file), merges into a chunk file that already exists (a rerun that
retried only its failed rows, or a block Ray retried after it committed) so that each row key is written once,
and reports one summary row per chunk. :func:`pending` is the other half: the chunks of a pass without a
committed file, and those whose file holds engine-error rows (only those rows are planned again).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from stepback_ray.config import JobSpec
from stepback_ray.data.rows import status_kind
from stepback_ray.pipeline.schemas import ENGINE_STAMPS, key_of, table
from stepback_ray.storage import RunStore


def commit_chunks(
    job: JobSpec, folder: str, rows: list[dict[str, Any]], schema: pa.Schema, uri: str | None = None
) -> list[dict[str, Any]]:
    """Write each complete chunk in ``rows`` as one file; refuse a chunk with rows missing. A chunk that already
    has a file is merged: the new rows replace the file's rows of the same key, the others are kept."""
    store = RunStore(uri or job.output_uri, job.storage)
    by_chunk: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_chunk.setdefault(r["chunk_id"], []).append(r)
    summaries = []
    for cid, part in sorted(by_chunk.items()):
        expected = part[0]["chunk_rows"]
        if len(part) != expected:
            raise RuntimeError(f"chunk {cid} reached the commit stage with {len(part)} of {expected} rows")
        rel = f"{folder}/chunk-{cid}.parquet"
        now = time.time()
        for r in part:
            r["committed_at"] = now
        if store.exists(rel):
            new = {key_of(r) for r in part}
            part = [r for r in store.read_table(rel).to_pylist() if key_of(r) not in new] + part
        store.write_table(rel, table(part, schema))
        summaries.append(
            {
                "chunk_id": cid,
                "file": rel,
                "rows": len(part),
                "statuses": json.dumps(count_statuses(part)),
                **engine_stamps(part),
            }
        )
    return summaries


def engine_stamps(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine stamps a chunk's rows carry (:data:`~.schemas.ENGINE_STAMPS`: its engine's start times if its
    block was the first that engine served, its engine process's usage), or nulls (no engine served it)."""
    stamped = next((r for r in rows if r.get("engine_process") is not None), {})
    return {name: stamped.get(name) for name, _ in ENGINE_STAMPS}


def count_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per status kind (:func:`~stepback_ray.data.rows.status_kind`)."""
    out: dict[str, int] = {}
    for r in rows:
        key = status_kind(r.get("status"))
        out[key] = out.get(key, 0) + 1
    return out


def pending(uri: str, folder: str, job: JobSpec, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks a (re)run still has to do: those without a committed file in ``folder``, and those whose file
    holds engine-error rows, with ``retry`` listing exactly those rows' keys (the others are kept)."""
    store = RunStore(uri, job.storage)
    done = {p.rsplit("/", 1)[-1] for p in store.list(folder, ".parquet")}
    out = []
    for c in chunks:
        name = f"chunk-{c['chunk_id']}.parquet"
        if name not in done:
            out.append({**c, "retry": None})
            continue
        t = store.read_table(f"{folder}/{name}")
        failed = [
            key_of(r)
            for r in t.select([n for n in ("user_id", "query_id", "mode", "status") if n in t.column_names]).to_pylist()
            if status_kind(r.get("status")) == "error"
        ]
        if failed:
            out.append({**c, "retry": json.dumps(failed)})
    return out
