"""One dataset record, read and checked: a JSON Lines line or a Parquet row parsed on its own, then validated
against the task (a user id, a history of items with the task's fields, optional queries). A record that fails is
a :class:`BadRecord` whose message is the quarantine's reason; nothing here is fatal to a run."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stepback_ray.data.rows import text_problem, user_id_problem
from stepback_ray.tasks import TaskSpec

MAX_ITEM_CHARS = 100_000


class BadRecord(ValueError):
    """A record that cannot be used; its message is the reason recorded in the quarantine."""


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        problem = text_problem(value)
        if problem:
            raise BadRecord(f"{what}: {problem}")
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise BadRecord(f"{what}: expected text, got {type(value).__name__}")


def check_user_id(value: Any) -> str:
    """The row's user id, as written (:func:`~stepback_ray.data.rows.user_id_problem` says what is refused)."""
    uid = _text(value, "user_id")
    problem = user_id_problem(uid)
    if problem:
        raise BadRecord(f"user_id: {problem}")
    return uid


def _content_id(uid: str, item: dict[str, Any]) -> str:
    """The id of an item that has none: from its content, so the same item gets the same id in every row, file
    and night it appears in (a position would shift when items are added, and collide across rows)."""
    return f"{uid}#" + hashlib.sha1(json.dumps(item, sort_keys=True, default=str).encode()).hexdigest()[:12]


def check_item(item: Any, task: TaskSpec, where: str, uid: str) -> dict[str, str]:
    if not isinstance(item, dict):
        raise BadRecord(f"{where}: expected an object, got {type(item).__name__}")
    out: dict[str, str] = {}
    for k, v in item.items():
        problem = text_problem(str(k))
        if problem:
            raise BadRecord(f"{where}: field name {str(k)!r}: {problem}")
        if v is None:
            continue
        text = _text(v, f"{where}.{k}")
        if len(text) > MAX_ITEM_CHARS:
            raise BadRecord(f"{where}.{k}: {len(text)} characters, over the limit of {MAX_ITEM_CHARS}")
        out[str(k)] = text
    for need in task.item_fields:
        if need not in out:
            raise BadRecord(f"{where}.{need}: missing (task {task.name} needs {', '.join(task.item_fields)})")
    if "id" not in out:
        out["id"] = _content_id(uid, out)
    return out


def check_record(rec: Any, task: TaskSpec, layout: str) -> dict[str, Any]:
    """A validated, normalized record, or :class:`BadRecord` with the reason."""
    if not isinstance(rec, dict):
        raise BadRecord(f"expected an object, got {type(rec).__name__}")
    uid = check_user_id(rec.get("user_id"))
    if layout == "item":
        item = {k: v for k, v in rec.items() if k != "user_id"}
        return {"user_id": uid, "item": check_item(item, task, "item", uid)}
    history = rec.get("history", [])
    if history is None:
        history = []
    if not isinstance(history, list):
        raise BadRecord(f"history: expected a list, got {type(history).__name__}")
    items = [check_item(it, task, f"history[{i}]", uid) for i, it in enumerate(history)]
    queries = []
    first: dict[str, int] = {}
    for i, q in enumerate(rec.get("queries") or []):
        if not isinstance(q, dict):
            raise BadRecord(f"queries[{i}]: expected an object, got {type(q).__name__}")
        qid = _text(q.get("query_id"), f"queries[{i}].query_id")
        if qid in first:
            raise BadRecord(f"queries[{i}].query_id: duplicate {qid!r} (also queries[{first[qid]}])")
        first[qid] = i
        text = _text(q.get("input"), f"queries[{i}].input")
        gold = q.get("gold")
        gold = None if gold is None else _text(gold, f"queries[{i}].gold")
        problem = None if gold is None else task.gold_problem(gold)
        if problem:
            raise BadRecord(f"queries[{i}].gold: {problem}")
        queries.append({"query_id": qid, "input": text, "gold": gold})
    return {"user_id": uid, "history": items, "queries": queries}


def jsonl_records(data: bytes, path: str) -> Iterator[tuple[Any, str, int, str | None, str]]:
    """A JSON Lines file's records, line by line: a line of bad JSON or invalid UTF-8 is one bad record."""
    for n, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        where = place(path, n + 1)
        try:
            yield json.loads(line.decode("utf-8")), path, n + 1, None, where
        except UnicodeDecodeError as e:
            yield line[:2000].decode("utf-8", "replace"), path, n + 1, f"invalid UTF-8 ({e.reason})", where
        except json.JSONDecodeError as e:
            yield line[:2000].decode("utf-8", "replace"), path, n + 1, f"bad JSON: {e.msg}", where


def parquet_records(data: bytes, path: str) -> Iterator[tuple[Any, str, int, str | None, str]]:
    """A Parquet file's records, read with the file's own schema (never merged with another file's), a row group
    at a time. A file that is not readable Parquet is one bad record naming it; a row whose text is not UTF-8,
    one bad row."""
    try:
        batches = pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=1024)
        n = 0
        for rb in batches:
            try:
                rows = rb.to_pylist()
            except (UnicodeDecodeError, pa.ArrowException):
                rows = [_one_row(rb, i) for i in range(rb.num_rows)]
            for rec in rows:
                n += 1
                if isinstance(rec, BadRecord):
                    yield "", "", 0, str(rec), f"{path}:{n}"
                else:
                    yield rec, "", 0, None, f"{path}:{n}"
    except (pa.ArrowException, OSError) as e:
        yield "", "", 0, f"not a readable Parquet file ({str(e).splitlines()[0][:300]})", path


def _one_row(rb: pa.RecordBatch, i: int) -> dict[str, Any] | BadRecord:
    try:
        return rb.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as e:  # as a JSON Lines line's
        return BadRecord(f"invalid UTF-8 ({e.reason})")
    except pa.ArrowException as e:
        return BadRecord(f"not readable: {str(e).splitlines()[0][:300]}")


def place(source: str, line: int) -> str:
    """A row's place in the input as the quarantine shows it: ``file:line`` (JSON Lines; Parquet: ``file:row``)."""
    return f"{source}:{line}" if source else ""
