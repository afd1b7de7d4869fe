"""A sample of a dataset's users for ``stepback plan --sample``, read without staging the dataset.

The sample is drawn by id hash (:func:`~stepback_ray.data.rows.user_hash`, the hash that shards users): the same
users whatever the input's order or files, and a uniform draw whatever their ids look like. Drawing it needs every
row's user id, and nothing else of the rows: Parquet files are read for their ``user_id`` column only (their row
counts come from the file metadata), JSON Lines line by line for the id alone (the first ``"user_id"`` of the
line; a line where that is not found is parsed whole). Only the rows of the drawn users are then read whole (the
Parquet row groups that hold them, within a budget: :func:`sample_dataset`; the JSON Lines lines), validated like
staging validates them (:func:`~stepback_ray.data.records.check_record`) and grouped by user as a staged shard is
(:func:`~stepback_ray.data.datasets.load_staged`): a row staging would quarantine is left out here too, and
counted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stepback_ray.config import JobSpec
from stepback_ray.data.datasets import group_records, input_files
from stepback_ray.data.records import BadRecord, check_record
from stepback_ray.data.rows import Query, UserHistory, smallest_hashes, user_id_problem
from stepback_ray.errors import StorageError
from stepback_ray.storage import describe_storage_error, filesystem_for, is_storage_error
from stepback_ray.tasks import get_task

_JSONL_USER_ID = re.compile(rb'"user_id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*[,}]')


@dataclass
class UserSample:
    """The drawn users of a dataset, and what the whole dataset holds."""

    drawn: list[str]
    """The ids drawn, in hash order (a drawn user whose rows were all refused has no entry in ``users``)."""
    users: list[UserHistory]
    queries: list[Query]
    input_rows: int
    rows_from: str
    """How ``input_rows`` was counted: ``parquet metadata`` (no row read) or ``lines read`` (JSON Lines)."""
    input_users: int
    """Distinct valid user ids in the whole input, counted from its ``user_id`` values."""
    refused_rows: int = 0
    """Rows of the drawn users that staging would quarantine (left out of the sample)."""
    unreadable: list[str] = field(default_factory=list)
    """Input files that could not be read (staging quarantines each as one record)."""
    row_groups: tuple[int, int] | None = None
    """Parquet: (row groups the drawn users were drawn from, row groups in all)."""


ROWS_READ_PER_USER = 100
"""What a Parquet sample reads whole, at most, beyond the user ids: the row groups holding ``ROWS_READ_PER_USER``
rows per user drawn (a Parquet reader decodes a row group's columns whole: drawing N users from a large input
uniformly would decode every row of it)."""


def sample_dataset(job: JobSpec, n: int) -> UserSample:
    """``n`` users of the job's dataset drawn by smallest id hash, with their histories and queries.

    JSON Lines: the ``n`` smallest hashes of the whole input. Parquet: the same while the row groups that hold
    those users fit in ``ROWS_READ_PER_USER * n`` rows (all of them, for an input that small); past that, the users
    are drawn in hash order from the row groups opened so far, a row group being opened by the first user (in hash
    order) whose first row it holds, until the budget is spent (a drawn user's rows in other row groups are read
    too). Row groups are then drawn with a chance that grows with their users, and users uniformly within them:
    every user has about the same chance, as long as the input is not sorted or split by something that changes
    what a user costs (``row_groups`` says how many were drawn from)."""
    fs, _ = filesystem_for(job.input.path, job.storage)
    files = input_files(job)
    try:
        if job.input.format == "parquet":
            per_file: list[Any] = [_ParquetIds(fs, path) for path in files]
            drawn, input_users, read = _draw_by_row_group(per_file, n, ROWS_READ_PER_USER * n)
        else:
            per_file = [_JsonlIds(fs, path) for path in files]
            valid = {u for f in per_file for u in f.distinct() if user_id_problem(u) is None}
            drawn, input_users, read = smallest_hashes(valid, n), len(valid), None
        chosen = set(drawn)
        records: list[tuple[Any, str | None]] = []
        for f in per_file:
            if f.error is None:
                records += f.records(chosen)
    except Exception as e:
        if not is_storage_error(e):
            raise
        raise StorageError(describe_storage_error(job.input.path, e)) from None
    users, queries, refused = _group(job, records)
    sample = UserSample(
        drawn,
        users,
        queries,
        input_rows=sum(f.rows for f in per_file),
        rows_from="parquet metadata" if job.input.format == "parquet" else "lines read",
        input_users=input_users,
        refused_rows=refused,
        unreadable=[f"{f.path}: {f.error}" for f in per_file if f.error],
    )
    if read is not None:
        sample.row_groups = read
    return sample


def _draw_by_row_group(files: list[_ParquetIds], n: int, budget_rows: int) -> tuple[list[str], int, tuple[int, int]]:
    """The drawn ids (hash order), the valid user ids in all, and (row groups opened, row groups in all): see
    :func:`sample_dataset`."""
    sizes = [size for f in files for size in f.group_rows]
    parts, base = [], 0
    for f in files:  # each row's row group, numbered across the files in their order
        if len(f.ids):
            group_of_row = np.repeat(np.arange(base, base + len(f.group_rows)), f.group_rows)
            parts.append(pa.table({"user_id": f.ids, "group": group_of_row}))
        base += len(f.group_rows)
    if not parts:
        return [], 0, (0, len(sizes))
    firsts = pa.concat_tables(parts).group_by("user_id").aggregate([("group", "min")])
    ids, groups = firsts.column("user_id").to_pylist(), firsts.column("group_min").to_pylist()
    valid = [k for k, u in enumerate(ids) if u is not None and user_id_problem(u) is None]
    # user_hash of each, as one array: the first 8 bytes of each sha1, big-endian (one Python call per id, not three)
    heads = b"".join([hashlib.sha1(ids[k].encode()).digest()[:8] for k in valid])
    hashes = np.frombuffer(heads, dtype=">u8").astype(np.uint64)
    opened: set[int] = set()
    rows, drawn = 0, []
    for j in np.argsort(hashes, kind="stable").tolist():
        uid, group = ids[valid[j]], groups[valid[j]]
        if group not in opened:
            if opened and rows + sizes[group] > budget_rows:
                continue
            opened.add(group)
            rows += sizes[group]
        drawn.append(uid)
        if len(drawn) == n:
            break
    return drawn, len(valid), (len(opened), len(sizes))


class _ParquetIds:
    """A Parquet file's row count (metadata) and user ids (that column alone), then the rows of chosen users."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path, self.error, self.rows = fs, path, None, 0
        self.ids = pa.array([], pa.string())
        self.group_rows: list[int] = []
        try:
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f)
                self.rows = meta.metadata.num_rows
                self.group_rows = [meta.metadata.row_group(i).num_rows for i in range(meta.num_row_groups)]
                column = meta.read(columns=["user_id"]).column("user_id")
            self.ids = pc.cast(column, pa.string()).combine_chunks()
        except (pa.ArrowException, KeyError) as e:
            self.error = f"not readable as Parquet with a user_id column ({str(e).splitlines()[0][:200]})"
            self.group_rows = []

    def records(self, chosen: set[str]) -> list[tuple[Any, str | None]]:
        hits = pc.indices_nonzero(pc.fill_null(pc.is_in(self.ids, value_set=pa.array(sorted(chosen))), False))
        wanted = hits.to_pylist()
        if not wanted:
            return []
        out: list[tuple[Any, str | None]] = []
        with self.fs.open(self.path, "rb") as f:
            pfile = pq.ParquetFile(f)
            start = 0
            for group, size in enumerate(self.group_rows):
                local = [i - start for i in wanted if start <= i < start + size]
                if local:
                    out += _rows(pfile.read_row_group(group).take(local))
                start += size
        return out


def _rows(table: pa.Table) -> list[tuple[Any, str | None]]:
    """A table's rows as records, a row that cannot be read (text that is not UTF-8) as its reason."""
    try:
        return [(r, None) for r in table.to_pylist()]
    except (UnicodeDecodeError, pa.ArrowException):
        out: list[tuple[Any, str | None]] = []
        for i in range(table.num_rows):
            try:
                out.append((table.slice(i, 1).to_pylist()[0], None))
            except (UnicodeDecodeError, pa.ArrowException) as e:
                out.append((None, f"not readable: {str(e).splitlines()[0][:200]}"))
        return out


class _JsonlIds:
    """A JSON Lines file's lines (counted) and their user ids, then the chosen users' lines parsed whole."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path, self.error = fs, path, None
        self.line_ids: list[str | None] = []
        for line in self._lines():
            self.line_ids.append(_line_user_id(line))
        self.rows = len(self.line_ids)

    def _lines(self) -> Iterator[bytes]:
        with self.fs.open(self.path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError) as e:
                self.error = f"not a readable gzip file ({e})"
                return
        for line in data.split(b"\n"):
            if line.strip():
                yield line

    def distinct(self) -> list[str]:
        return list({u for u in self.line_ids if u is not None})

    def records(self, chosen: set[str]) -> list[tuple[Any, str | None]]:
        if not chosen.intersection(self.line_ids):
            return []
        out: list[tuple[Any, str | None]] = []
        for uid, line in zip(self.line_ids, self._lines()):
            if uid in chosen:
                try:
                    out.append((json.loads(line.decode("utf-8")), None))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    out.append((None, f"bad line: {e}"))
        return out


def _line_user_id(line: bytes) -> str | None:
    """A JSON Lines line's user id as staging would read it (None: none that a record could have)."""
    found = _JSONL_USER_ID.search(line)
    try:
        if found is not None:
            value = json.loads(found.group(1))
        else:
            value = json.loads(line.decode("utf-8")).get("user_id")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def _group(job: JobSpec, records: list[tuple[Any, str | None]]) -> tuple[list[UserHistory], list[Query], int]:
    """The drawn users' records validated and grouped by user as a staged shard's are (histories merged, items
    once by id, a query id asked once); how many records were refused."""
    task = get_task(job.task)
    valid: list[dict[str, Any]] = []
    refused = 0
    for rec, error in records:
        try:
            if error is not None:
                raise BadRecord(error)
            valid.append(check_record(rec, task, job.input.layout))
        except BadRecord:
            refused += 1
    users, queries = group_records(job.task, iter(valid))
    return users, queries, refused
