"""Dataset inputs (Parquet, JSON Lines) read without loading them whole, validated row by row, staged by shard.

Staging is a Ray Data pass: read the dataset in parallel -> validate every row (a bad row is *quarantined* with
its reason, never dropped silently and never fatal) -> write the good rows partitioned by shard (a stable hash of
the user id) under ``<run>/_staged/shard=<k>/``. Each shard is then a unit of work that the profile and
generation passes load on their own, so memory stays flat however many users there are.

Input files: ``input.path`` is a file, a glob, or a folder read by extension (:data:`INPUT_EXTENSIONS`: Parquet
``*.parquet``; JSON Lines ``*.jsonl``, ``*.ndjson``, ``*.json`` and each ``.gz``), hidden names skipped. Every
file is parsed on its own (Parquet with its own schema, so files that disagree, an integer ``user_id`` here and
text there, are never merged) and its values taken as text row by row; a file that cannot be read is one
quarantined record naming it.

Layouts: ``user`` (one row per user: ``user_id``, ``history`` list of items, optional ``queries`` list of
``{query_id, input, gold}``) and ``item`` (one row per history item: ``user_id`` plus the item's fields).
JSON Lines are split and parsed here, line by line, so a line of bad JSON or invalid UTF-8 is one quarantined
row, not a failed file.

A query id is asked once in a run. Rows are validated in parallel, and the rows of one query id may fall in
different shards (two users) or the same one (a user exported twice), so repeats are found after the rows are
staged, over the staged query ids of every shard: of the rows that carry a query id, the first keeps it and every
later one is quarantined whole (its reason names the query id and the row that kept it). "First" is input order
for JSON Lines (file path, then line); Parquet rows are read in parallel without a position, so among them the
first is the one whose user id (then content) sorts first. Either way the outcome does not depend on the shard
count or on how the input was cut into batches.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stepback_ray.config import JobSpec
from stepback_ray.data.records import BadRecord, check_record, jsonl_records, parquet_records, place
from stepback_ray.data.rows import Query, UserHistory, shard_of
from stepback_ray.errors import InputError, StepbackError, StorageError, StorageFull
from stepback_ray.storage import RunStore, describe_storage_error, filesystem_for, is_storage_error
from stepback_ray.tasks import get_task

FORGOTTEN_DIR = "_forgotten"
"""Counts of the rows left out because their user is forgotten (ids and counts only)."""
STAGING_FOLDERS = ("_staged", "quarantine", FORGOTTEN_DIR)
"""What a staging writes: removed before one starts again and after one fails."""
QUARANTINE_SCHEMA = pa.schema([("reason", pa.string()), ("record", pa.string()), ("source", pa.string())])
STAGED_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("user_id", pa.string()),
        ("record", pa.string()),
        ("query_ids", pa.list_(pa.string())),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("digest", pa.string()),
    ]
)
"""A staged row: the validated record, its query ids, and what orders it among rows that repeat a query id (the
input file and line, JSON Lines only; then the user id and a digest of the record)."""


class ValidateAndShard:
    """Ray Data stage: raw rows -> good rows ``(shard, user_id, record)``; bad rows go to the quarantine files.

    Its batches are input files read whole (``bytes``, ``path``: what staging reads, one file a batch), each
    parsed here on its own: JSON Lines line by line, Parquet with the file's own schema (files whose schemas
    disagree, an integer ``user_id`` in one and text in another, are never merged; values are taken as text row
    by row). A Parquet batch may also be a table of records (rows given in process).

    A quarantine file's name is a hash of the whole input batch it came from (good rows and the uncut bad ones;
    file batches carry their file's path), so a retried task rewrites the same file instead of adding a
    second one, while two batches that hold the same bad rows (a malformed record repeated through a Parquet
    dataset) still get a file each: quarantine counts reconcile exactly. Only two byte-identical input batches
    would share a file."""

    FLUSH_ROWS = 4096
    """Good rows are turned into Arrow this many at a time (a whole file's rows are never held as Python objects)."""

    def __init__(self, job: JobSpec, shards: int, denied: list[str] | None = None):
        self.job, self.task, self.shards = job, get_task(job.task), shards
        self.store = RunStore(job.output_uri, job.storage)
        self.denied = frozenset(denied or ())
        """Users forgotten in the profile store: not staged (neither kept nor quarantined: their records are
        exactly what must not be written), only counted, in ``_forgotten/``."""

    def _records(self, batch: pa.Table) -> Iterator[tuple[Any, str, int, str | None, str]]:
        """Per input row: (record, source file and line that order repeated query ids (JSON Lines; empty and 0
        for Parquet, see the module docstring), parse error or None, where the quarantine says it was)."""
        files = "bytes" in batch.column_names and "user_id" not in batch.column_names
        if self.job.input.format == "parquet" and not files:
            for rec in batch.to_pylist():
                yield rec, "", 0, None, ""
            return
        for n in range(batch.num_rows):
            row = batch.slice(n, 1).to_pylist()[0]
            data, path = row["bytes"], row.get("path") or ""
            if data[:2] == b"\x1f\x8b":  # gzip (Ray Data decompresses *.gz as it reads; this is for the rest)
                try:
                    data = gzip.decompress(data)
                except (OSError, EOFError) as e:
                    yield "", "", 0, f"not a readable gzip file ({e})", path
                    continue
            if self.job.input.format == "parquet":
                yield from parquet_records(data, path)
            else:
                yield from jsonl_records(data, path)

    def __call__(self, batch: pa.Table) -> pa.Table:
        good, bad, forgotten, tables = [], [], [], []
        for rec, source, line, error, where in self._records(batch):
            if error is None:
                try:
                    clean = check_record(rec, self.task, self.job.input.layout)
                except BadRecord as e:
                    error = str(e)
                else:
                    if clean["user_id"] in self.denied:
                        forgotten.append(clean["user_id"])
                        continue
                    text = json.dumps(clean)
                    good.append(
                        {
                            "shard": shard_of(clean["user_id"], self.shards),
                            "user_id": clean["user_id"],
                            "record": text,
                            "query_ids": [q["query_id"] for q in clean.get("queries", [])],
                            "source": source,
                            "line": line,
                            "digest": hashlib.sha1(text.encode()).hexdigest()[:16],
                        }
                    )
                    if len(good) >= self.FLUSH_ROWS:
                        tables.append(pa.Table.from_pylist(good, schema=STAGED_SCHEMA))
                        good = []
                    continue
            raw = rec if isinstance(rec, str) else json.dumps(rec, default=str)
            bad.append({"reason": error, "record": raw[:2000], "source": where})
        if bad:
            table = pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA)
            self.store.write_table(f"quarantine/part-{_batch_digest(batch)}.parquet", table)
        if forgotten:
            self.store.write_json(
                f"{FORGOTTEN_DIR}/part-{_batch_digest(batch)}.json",
                {"rows": len(forgotten), "users": sorted(set(forgotten))},
            )
        tables.append(pa.Table.from_pylist(good, schema=STAGED_SCHEMA))
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _batch_digest(batch: pa.Table) -> str:
    """A hash of a batch's content (its Arrow IPC bytes: slices hash as what they hold, not their parent)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_table(batch)
    return hashlib.sha1(sink.getvalue()).hexdigest()[:16]


INPUT_EXTENSIONS: dict[str, tuple[str, ...]] = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz"),
}
"""What a dataset input folder is read for: by format, the files whose names end so, in the folder and below it,
skipping hidden names (a file or folder whose name starts with ``.`` or ``_``, as Arrow and Spark do); any other
file there (a README, a checksum) is left alone. A file named directly, or matched by a glob, is read whatever
its name."""


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def _in_folder(fs: Any, folder: str, fmt: str) -> tuple[list[str], list[str]]:
    """(the data files of a folder under the extension rule, the other files in it) as paths relative to it."""
    root = folder.rstrip("/") + "/"
    names = sorted(p[len(root) :] for p in fs.find(folder) if p.startswith(root))
    keep = [n for n in names if n.endswith(INPUT_EXTENSIONS[fmt]) and not _hidden(n)]
    return [root + n for n in keep], [n for n in names if n not in set(keep)]


def input_files(job: JobSpec) -> list[str]:
    """The files a dataset input reads (paths inside its filesystem): ``input.path`` is a file, a folder (read by
    :data:`INPUT_EXTENSIONS`) or a glob. A path that does not exist, a glob that matches nothing or a folder
    without data files is one line naming the resolved path (and how a relative one was resolved): checked before
    anything is written."""
    uri, fmt = job.input.path, job.input.format
    where, note = f"input.path {uri}", job.path_note("input.path")
    fs, path = filesystem_for(uri, job.storage)
    try:
        if glob.has_magic(path):
            files: list[str] = []
            for p, info in sorted(fs.glob(path, detail=True).items()):
                files += _in_folder(fs, p, fmt)[0] if info.get("type") == "directory" else [p]
            if not files:
                raise InputError(where, f"no file matches{note}")
            return files
        if fs.isfile(path):
            return [path]
        if not fs.isdir(path):
            raise InputError(where, f"no such file or folder{note}")
        files, others = _in_folder(fs, path, fmt)
        if not files:
            rule = ", ".join(f"*{e}" for e in INPUT_EXTENSIONS[fmt])
            held = f"{len(others)} other files, e.g. {', '.join(others[:3])}" if others else "it is empty"
            raise InputError(
                where,
                f"no input files: a folder is read by extension (format {fmt}: {rule}) and holds none ({held}){note}",
            )
        return files
    except StepbackError:
        raise
    except Exception as e:
        if not is_storage_error(e):
            raise
        raise StorageError(describe_storage_error(uri, e)) from None


def stage_dataset(job: JobSpec, shards: int, denied: frozenset[str] = frozenset()) -> dict[str, int]:
    """Validate and shard the job's dataset into ``<run>/_staged/``; return row counts (in, good, quarantined,
    and, with ``denied`` users (forgotten in the profile store), the rows and users left out for that).
    A rerun of the same run finds the staging done (``_staged/_SUCCESS``) and reuses it; one that finds it
    unfinished stages again from scratch."""
    import ray.data  # deferred: a LaMP JSON job never imports Ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    store = RunStore(job.output_uri, job.storage)
    if not store.exists("_staged/_SUCCESS"):
        # a staging that was killed part-way left some shard files (and quarantine files): start it over, or a
        # rerun would stage those rows twice
        for folder in STAGING_FOLDERS:
            store.remove(folder)
        files = input_files(job)
        src_fs, _ = filesystem_for(job.input.path, job.storage)
        pa_src = PyFileSystem(FSSpecHandler(src_fs))
        # (a worker that reads or writes a whole input file keeps part of that peak afterwards, even with the system
        # allocator. Running these tasks in workers that exit afterwards (max_calls=1) removes it but starts a
        # process per file, which slows staging and every small run more than the memory is worth at these file
        # sizes.)
        # every input file read whole and parsed on its own (Parquet too: files whose schemas disagree are never
        # merged, which Ray Data's Parquet reader does before reading a row), one file a batch
        ds = ray.data.read_binary_files(files, filesystem=pa_src, include_paths=True)
        ds = ds.map_batches(
            ValidateAndShard,
            fn_constructor_kwargs={"job": job, "shards": shards, "denied": sorted(denied)},
            batch_format="pyarrow",
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.25,
        )
        out_fs = PyFileSystem(FSSpecHandler(store.fs))
        try:
            ds.write_parquet(store.path("_staged"), filesystem=out_fs, partition_cols=["shard"])
        except Exception as e:
            # what this staging wrote goes: the output of a first run holds no run yet (the spec is recorded after
            # the input is read), so a rerun would find files it cannot call its own; and on a full disk it frees
            # the space. A full disk met in a Ray worker arrives wrapped: one line, exit 3, not a traceback.
            for folder in STAGING_FOLDERS:
                with contextlib.suppress(Exception):
                    store.remove(folder)
            full = StorageFull.within(store.uri_of("_staged/"), e)
            if full is None:
                raise
            raise full from None
        quarantine_repeated_queries(store)
        store.write_bytes("_staged/_SUCCESS", b"")
    good = sum(_rows(store, p) for p in _staged_files(store))
    bad = sum(_rows(store, p) for p in store.list("quarantine", ".parquet"))
    gone = [store.read_json(p) for p in store.list(FORGOTTEN_DIR, ".json")]
    counts = {"rows_in": good + bad + sum(g["rows"] for g in gone), "rows_staged": good, "rows_quarantined": bad}
    if denied or gone:
        counts.update(
            forgotten_rows=sum(g["rows"] for g in gone), forgotten_users=len({u for g in gone for u in g["users"]})
        )
    return counts


def _staged_files(store: RunStore) -> list[str]:
    return [p for d in store.list("_staged") if "/shard=" in d for p in store.list(d, ".parquet")]


def quarantine_repeated_queries(store: RunStore) -> int:
    """Quarantine every staged row that repeats a query id of an earlier row (see the module docstring for
    "earlier"); return how many. Only the query-id column is read for all rows; rows are looked at one by one only
    where an id repeats, and only the staged files holding such rows are rewritten."""
    import pyarrow.compute as pc

    ids = {
        rel: pc.list_flatten(store.read_table(rel, columns=["query_ids"]).column("query_ids"))
        for rel in _staged_files(store)
    }
    ids = {rel: a for rel, a in ids.items() if len(a)}
    if not ids:
        return 0
    counts = pc.value_counts(pa.chunked_array(list(ids.values())).combine_chunks())
    repeated_ids = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated_ids):
        return 0
    repeated = set(repeated_ids.to_pylist())
    involved = []  # (order key, file, row index, query ids, user id)
    for rel, a in ids.items():
        if not pc.any(pc.is_in(a, value_set=repeated_ids)).as_py():
            continue
        t = store.read_table(rel, columns=["query_ids", "source", "line", "user_id", "digest"])
        for i, r in enumerate(t.to_pylist()):
            if repeated.intersection(r["query_ids"]):
                key = (r["source"] or "", r["line"] or 0, r["user_id"], r["digest"])
                involved.append((key, rel, i, r["query_ids"], r["user_id"]))
    kept: dict[str, tuple[str, str]] = {}  # query id -> (user id, where) of the row that asks it
    drop: dict[str, dict[int, str]] = {}  # file -> row index -> reason
    for key, rel, i, qids, uid in sorted(involved):
        clash = next(((n, q) for n, q in enumerate(qids) if q in kept), None)
        if clash is None:
            kept.update({q: (uid, place(key[0], key[1])) for q in qids})
            continue
        n, q = clash
        first_uid, first_at = kept[q]
        drop.setdefault(rel, {})[i] = (
            f"queries[{n}].query_id: duplicate {q!r}, asked first in the row of user "
            f"{first_uid!r}" + (f" at {first_at}" if first_at else "")
        )
    bad = []
    for rel, rows in sorted(drop.items()):
        table = store.read_table(rel)
        for i, reason in sorted(rows.items()):
            r = table.slice(i, 1).to_pylist()[0]
            bad.append({"reason": reason, "record": r["record"][:2000], "source": place(r["source"], r["line"])})
        keep = [i for i in range(table.num_rows) if i not in rows]
        if keep:
            store.write_table(rel, table.take(keep))
        else:
            store.remove(rel)
            folder = rel.rsplit("/", 1)[0]
            if not store.list(folder, ".parquet"):  # an empty shard would be a chunk without users
                store.remove(folder)
    store.write_table("quarantine/part-repeated-query-ids.parquet", pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA))
    return len(bad)


def _rows(store: RunStore, rel: str) -> int:
    return pq.ParquetFile(io.BytesIO(store.read_bytes(rel))).metadata.num_rows


def staged_chunks(job: JobSpec) -> list[dict[str, Any]]:
    """One work chunk per non-empty staged shard."""
    store = RunStore(job.output_uri, job.storage)
    rows = []
    for d in store.list("_staged"):
        name = d.rsplit("/", 1)[-1]
        if name.startswith("shard="):
            k = int(name.split("=", 1)[1])
            rows.append({"chunk_id": f"{k:05d}", "source": d})
    return sorted(rows, key=lambda r: r["chunk_id"])


def load_staged(job: JobSpec, source: str) -> tuple[list[UserHistory], list[Query]]:
    """The users (histories grouped by user, items de-duplicated by id) and queries of one staged shard. A user
    may come in several rows (or files): the histories are merged (all rows of a user land in the same shard).
    Staging has quarantined every row that repeats a query id, so each is asked once; the check here only keeps
    a staging from before that rule from asking one twice."""
    store = RunStore(job.output_uri, job.storage)
    records = (
        json.loads(row["record"])
        for rel in store.list(source, ".parquet")
        for row in store.read_table(rel, columns=["user_id", "record"]).to_pylist()
    )
    return group_records(job.task, records)


def group_records(task_name: str, records: Iterator[dict[str, Any]]) -> tuple[list[UserHistory], list[Query]]:
    """Valid records grouped by user, as a run reads a staged shard and a plan its sample: a user's histories
    merged (each item once, by id), each query id asked once, every query seeing its user's whole history; users
    and queries in user-id order."""
    task = get_task(task_name)
    users: dict[str, UserHistory] = {}
    seen: dict[str, set[str]] = {}
    queries: list[Query] = []
    asked: set[str] = set()
    for rec in records:
        uid = rec["user_id"]
        u = users.setdefault(uid, UserHistory(uid))
        ids = seen.setdefault(uid, set())
        for it in [rec["item"]] if "item" in rec else rec["history"]:
            if it["id"] not in ids:
                ids.add(it["id"])
                u.history.append(it)
        for q in rec.get("queries", []):
            if q["query_id"] not in asked:
                asked.add(q["query_id"])
                queries.append(Query(q["query_id"], task.name, q["input"], [uid], [], q["gold"]))
    for q in queries:  # a query sees its user's whole history
        q.histories = [users[q.user_id].history]
    queries.sort(key=lambda q: (q.user_id, q.query_id))
    return sorted(users.values(), key=lambda u: u.user_id), queries
