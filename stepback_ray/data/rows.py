"""The rows that flow through a run: queries, users (a history plus that user's queries) and chunks of users.

A *chunk* is the unit of work and of commit: a fixed, deterministic group of users that travels through every
stage together and is written as one file per output folder. Chunk ids depend only on the input and
``users_per_chunk``, so a rerun of the same job finds the same chunks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

Item = dict[str, str]


@dataclass
class Query:
    query_id: str
    user_id: str
    task: str
    input: str
    profile: list[Item]
    gold: str | None = None


@dataclass
class UserWork:
    """One user: the history to profile (the union of the user's query profiles) and the user's queries."""

    user_id: str
    history: list[Item] = field(default_factory=list)
    queries: list[Query] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "history": self.history, "queries": [asdict(q) for q in self.queries]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UserWork":
        return cls(user_id=d["user_id"], history=d["history"], queries=[Query(**q) for q in d["queries"]])


def group_by_user(queries: list[Query], limit: int | None = None) -> list[UserWork]:
    """Group queries by user in first-appearance order, keeping the first ``limit`` users."""
    users: dict[str, UserWork] = {}
    seen_items: dict[str, set[str]] = {}
    for q in queries:
        u = users.get(q.user_id)
        if u is None:
            if limit is not None and len(users) >= limit:
                continue
            u = users[q.user_id] = UserWork(q.user_id)
            seen_items[q.user_id] = set()
        u.queries.append(q)
        for item in q.profile:
            if item["id"] not in seen_items[q.user_id]:
                seen_items[q.user_id].add(item["id"])
                u.history.append(item)
    return list(users.values())


def chunk_users(users: list[UserWork], users_per_chunk: int) -> list[dict[str, Any]]:
    """Rows for the work dataset: ``{"chunk_id", "n_users", "n_queries", "payload"}`` (payload: JSON users)."""
    rows = []
    for start in range(0, len(users), users_per_chunk):
        part = users[start:start + users_per_chunk]
        rows.append({
            "chunk_id": f"{start // users_per_chunk:06d}",
            "n_users": len(part),
            "n_queries": sum(len(u.queries) for u in part),
            "payload": json.dumps([u.to_dict() for u in part]),
        })
    return rows


def decode_chunk(payload: str) -> list[UserWork]:
    return [UserWork.from_dict(d) for d in json.loads(payload)]


def _item_type(items: list[Item]) -> pa.DataType:
    keys = sorted({k for it in items for k in it})
    return pa.struct([(k, pa.string()) for k in keys])


def queries_to_arrow(queries: list[Query]) -> pa.Table:
    """One Arrow row per query: user_id, query_id, task, input, profile (list of item structs), gold."""
    item_t = _item_type([it for q in queries for it in q.profile])
    schema = pa.schema([
        ("user_id", pa.string()), ("query_id", pa.string()), ("task", pa.string()), ("input", pa.string()),
        ("profile", pa.list_(item_t)), ("gold", pa.string()),
    ])
    names = [f.name for f in item_t]
    return pa.Table.from_pylist([
        {"user_id": q.user_id, "query_id": q.query_id, "task": q.task, "input": q.input,
         "profile": [{k: it.get(k) for k in names} for it in q.profile], "gold": q.gold}
        for q in queries
    ], schema=schema)
