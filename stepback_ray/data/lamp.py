"""Read the official LaMP JSON pair (``*_questions.json`` + ``*_outputs.json``) into query rows.

The LaMP layout: questions are a JSON list of ``{"id", "user_id"?, "input", "profile": [items]}``; outputs are
``{"task": "LaMP_N", "golds": [{"id", "output"}]}``. Official LaMP files carry no ``user_id``: each question's
profile then stands for its own user (``user_id = "q:<id>"``). Multi-author questions (PSW) carry
``"authors": [{"user_id", "profile"}, ...]`` in byline order instead of one ``profile``.

Bad input is reported as one line naming the file, the record and the field; nothing is silently dropped.
"""

from __future__ import annotations

import json
from typing import Any

from stepback_ray.config import StorageConfig
from stepback_ray.data.rows import Query, text_problem, user_id_problem
from stepback_ray.errors import InputError
from stepback_ray.storage import read_bytes
from stepback_ray.tasks import TaskSpec, same_task


def _load_json(uri: str, storage: StorageConfig | None) -> Any:
    raw = read_bytes(uri, storage)
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise InputError(uri, f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(uri, f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _valid(uri: str, where: str, field: str, text: str) -> str:
    """``text`` if it is valid Unicode text (:func:`~stepback_ray.data.rows.text_problem`), else one line naming
    the question and the field."""
    problem = text_problem(text)
    if problem:
        raise InputError(uri, problem, record=where, field=field)
    return text


def _parse_item(uri: str, where: str, field: str, item: Any, task: TaskSpec) -> dict[str, str]:
    if not isinstance(item, dict):
        raise InputError(uri, f"expected an object, got {type(item).__name__}", record=where, field=field)
    out: dict[str, str] = {}
    for k, v in item.items():
        problem = text_problem(str(k))
        if problem:
            raise InputError(uri, f"field name {str(k)!r}: {problem}", record=where, field=field)
        text = _as_text(v)
        if text is None and v is not None:
            raise InputError(uri, f"expected text, got {type(v).__name__}", record=where, field=f"{field}.{k}")
        if text is not None:
            out[str(k)] = _valid(uri, where, f"{field}.{k}", text)
    for need in task.item_fields:
        if need not in out:
            raise InputError(
                uri,
                f"missing (task {task.name} needs {', '.join(task.item_fields)})",
                record=where,
                field=f"{field}.{need}",
            )
    if "id" not in out:
        out["id"] = f"{where.strip(chr(39))}/{field}"
    return out


def _items(uri: str, where: str, field: str, profile: Any, task: TaskSpec) -> list[dict[str, str]]:
    if not isinstance(profile, list):
        raise InputError(
            uri, f"expected a list of history items, got {type(profile).__name__}", record=where, field=field
        )
    return [_parse_item(uri, where, f"{field}[{i}]", it, task) for i, it in enumerate(profile)]


def _user_id(uri: str, where: str, field: str, value: Any) -> str:
    """A user id as written, under the same rule as a dataset's (:func:`~stepback_ray.data.rows.user_id_problem`)."""
    uid = _as_text(value)
    if uid is None:
        raise InputError(uri, "missing or not text", record=where, field=field)
    problem = user_id_problem(uid)
    if problem:
        raise InputError(uri, problem, record=where, field=field)
    return uid


def _users_of(uri: str, qid: str, rec: dict[str, Any], task: TaskSpec) -> tuple[list[str], list[list[dict]]]:
    """(user ids, histories) of one question: its ``authors`` in byline order, or its single ``profile``."""
    where = repr(qid)
    authors = rec.get("authors")
    if authors is not None:
        if not isinstance(authors, list) or not authors:
            raise InputError(uri, "expected a non-empty list of {user_id, profile}", record=where, field="authors")
        ids: list[str] = []
        histories: list[list[dict]] = []
        for i, a in enumerate(authors):
            if not isinstance(a, dict):
                raise InputError(
                    uri, f"expected an object, got {type(a).__name__}", record=where, field=f"authors[{i}]"
                )
            uid = _user_id(uri, where, f"authors[{i}].user_id", a.get("user_id"))
            items = _items(uri, where, f"authors[{i}].profile", a.get("profile", []), task)
            if uid in ids:  # the same name twice on a byline: one user, both item lists
                histories[ids.index(uid)].extend(items)
                continue
            ids.append(uid)
            histories.append(items)
        return ids, histories
    profile = rec.get("profile")
    if profile is None:
        raise InputError(
            uri,
            "missing (a LaMP question carries its user's history as 'profile', a multi-author one as 'authors')",
            record=where,
            field="profile",
        )
    given = rec.get("user_id")
    uid = f"q:{qid}" if given is None else _user_id(uri, where, "user_id", given)
    return [uid], [_items(uri, where, "profile", profile, task)]


def parse_questions(uri: str, data: Any, task: TaskSpec) -> list[Query]:
    """Validate the questions document and turn it into :class:`Query` objects (gold not yet attached)."""
    if isinstance(data, dict) and "golds" in data:
        raise InputError(uri, "this is a LaMP outputs file (it has 'golds'); expected the questions file")
    if not isinstance(data, list):
        raise InputError(uri, f"expected a JSON list of questions (LaMP *_questions.json), got {type(data).__name__}")
    queries: list[Query] = []
    seen: set[str] = set()
    for n, rec in enumerate(data):
        where = f"#{n}"
        if not isinstance(rec, dict):
            raise InputError(uri, f"expected an object, got {type(rec).__name__}", record=where)
        qid = _as_text(rec.get("id"))
        if qid is None or qid == "":
            raise InputError(uri, "missing or not text", record=where, field="id")
        qid = _valid(uri, where, "id", qid)
        where = repr(qid)
        if qid in seen:
            raise InputError(uri, "duplicate question id", record=where, field="id")
        seen.add(qid)
        text = rec.get("input")
        if not isinstance(text, str):
            raise InputError(uri, "missing or not text", record=where, field="input")
        _valid(uri, where, "input", text)
        user_ids, histories = _users_of(uri, qid, rec, task)
        queries.append(Query(query_id=qid, task=task.name, input=text, user_ids=user_ids, histories=histories))
    return queries


def attach_golds(uri: str, data: Any, task: TaskSpec, queries: list[Query]) -> None:
    """Attach gold outputs; every question must have exactly one gold (none, or two for one id, is an error)."""
    if isinstance(data, list):
        raise InputError(
            uri,
            'this looks like a LaMP questions file (a list); expected the outputs file {"task": ..., "golds": [...]}',
        )
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise InputError(uri, 'expected an object {"task": ..., "golds": [{"id", "output"}]}', field="golds")
    file_task = data.get("task")
    if file_task is not None and not same_task(str(file_task), task.name):
        raise InputError(uri, f"golds are for task {file_task!r} but the job's task is {task.name!r}", field="task")
    golds: dict[str, str] = {}
    for n, g in enumerate(data["golds"]):
        if not isinstance(g, dict):
            raise InputError(uri, f"expected an object, got {type(g).__name__}", record=f"golds[{n}]")
        gid = _as_text(g.get("id"))
        if gid is None:
            raise InputError(uri, "missing or not text", record=f"golds[{n}]", field="id")
        gid = _valid(uri, f"golds[{n}]", "id", gid)
        out = _as_text(g.get("output"))
        if out is None:
            raise InputError(uri, "missing or not text", record=repr(gid), field="output")
        _valid(uri, repr(gid), "output", out)
        problem = task.gold_problem(out)
        if problem:
            raise InputError(uri, problem, record=repr(gid), field="output")
        if gid in golds:  # which one is right cannot be told: the file is broken, not the later entry
            raise InputError(uri, "duplicate gold id", record=repr(gid), field="id")
        golds[gid] = out
    for q in queries:
        if q.query_id not in golds:
            raise InputError(uri, "question has no gold output in this file", record=repr(q.query_id), field="id")
        q.gold = golds[q.query_id]


def read_lamp(questions: str, outputs: str | None, task: TaskSpec, storage: StorageConfig | None = None) -> list[Query]:
    """Read a LaMP questions file (and optionally its outputs) from a path or fsspec URI."""
    queries = parse_questions(questions, _load_json(questions, storage), task)
    if outputs is not None:
        attach_golds(outputs, _load_json(outputs, storage), task, queries)
    return queries
