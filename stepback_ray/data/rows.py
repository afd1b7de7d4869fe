"""The rows that flow through a run: queries, the users behind them, and chunks of work.

A query has one user (LaMP) or several authors in byline order (PSW), each with the history visible to that
query. The profile pass works on *users* (every distinct user once, with the union of their histories, so an
author of many papers is profiled once per run); the generation pass works on *queries*.

A *chunk* is the unit of work and of commit: the users (or the queries of the lead users) of one shard, where a
user's shard is a stable hash of their id. It travels through every stage together and is written as one file.
Chunk ids depend only on the user ids and the number of shards, so a rerun of the same job (or tomorrow's run)
finds the same chunks, and the profile of any user is found in the profile file of that user's shard.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

Item = dict[str, str]

MAX_ID_CHARS = 512
_BAD_ID = re.compile(r"(^\.\.?$)|[/\\\x00-\x1f\x7f-\x9f]|(\.\.)")


def text_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode text (None: it is): a lone surrogate, which JSON can carry as an escape
    (``"\\ud800"``) and Python reads into a string, but no tokenizer, Parquet file or UTF-8 writer accepts. Every
    reader checks its text fields with this, so such a record stops at the read (LaMP JSON) or is quarantined
    (datasets) instead of failing the run later."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"lone surrogate {text[e.start]!r} at character {e.start} (not valid Unicode text)"
    return None


def user_id_problem(uid: str) -> str | None:
    """Why ``uid`` cannot be a user id (None: it can): the one rule of every reader (LaMP JSON, datasets). An id
    is used exactly as written, never cleaned up: one that ends in a newline or a space would otherwise become
    another user's id, and one with a path separator or ``..`` has no place in an id."""
    if not uid:
        return "empty"
    if len(uid) > MAX_ID_CHARS:
        return f"longer than {MAX_ID_CHARS} characters"
    if _BAD_ID.search(uid):
        return "contains a path separator, '..' or a control character"
    if uid != uid.strip():
        return "leading or trailing whitespace"
    return text_problem(uid)


def status_kind(status: str | None) -> str:
    """The kind of a row's status: ``ok``, ``truncated``, ``unparsed``, ``partial``, ``error``, ...; text after a
    colon is detail (``error: engine failed: ...``). A missing status is ``ok``."""
    return (status or "ok").split(":", 1)[0]


@dataclass
class Query:
    query_id: str
    task: str
    input: str
    user_ids: list[str]
    """The query's users: one for LaMP, the authors in byline order for PSW (the first leads)."""
    histories: list[list[Item]]
    """Per user, the history items visible to this query (the retrieval pool; LaMP calls it the query's
    ``profile``, a word this code keeps for the step-back profile)."""
    gold: str | None = None

    @property
    def user_id(self) -> str:
        return self.user_ids[0]

    @property
    def history(self) -> list[Item]:
        """The lead user's visible history."""
        return self.histories[0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UserHistory:
    """One user for the profile pass: the union of the histories their queries show, first-seen order."""

    user_id: str
    history: list[Item] = field(default_factory=list)


def lead_groups(queries: list[Query], limit: int | None = None) -> list[list[Query]]:
    """Queries grouped by lead user in first-appearance order, keeping the first ``limit`` lead users."""
    groups: dict[str, list[Query]] = {}
    for q in queries:
        g = groups.get(q.user_id)
        if g is None:
            if limit is not None and len(groups) >= limit:
                continue
            g = groups[q.user_id] = []
        g.append(q)
    return list(groups.values())


def collect_users(queries: list[Query]) -> list[UserHistory]:
    """Every distinct user of ``queries`` once, with the union of their visible histories (deduped by item id)."""
    users: dict[str, UserHistory] = {}
    seen: dict[str, set[str]] = {}
    for q in queries:
        for uid, items in zip(q.user_ids, q.histories):
            u = users.get(uid)
            if u is None:
                u = users[uid] = UserHistory(uid)
                seen[uid] = set()
            for it in items:
                if it["id"] not in seen[uid]:
                    seen[uid].add(it["id"])
                    u.history.append(it)
    return list(users.values())


def user_hash(user_id: str) -> int:
    """A stable 64-bit hash of a user id (the same in every process, run and night): what places a user in a shard
    (:func:`shard_of`), and what draws a plan's sample of users (those with the smallest hashes)."""
    return int.from_bytes(hashlib.sha1(user_id.encode()).digest()[:8], "big")


def shard_of(user_id: str, num_shards: int) -> int:
    """A user's shard: a stable hash of the id (the same in every process, run and night)."""
    return user_hash(user_id) % num_shards


def smallest_hashes(user_ids: Iterable[str], n: int) -> list[str]:
    """The ``n`` distinct ids of ``user_ids`` with the smallest :func:`user_hash`, in hash order: a sample of users
    that depends on who they are, never on the input's order, files or shard count, and of which a smaller sample
    is a part."""
    return [u for _, u in heapq.nsmallest(n, ((user_hash(u), u) for u in set(user_ids)))]


def donors(user_ids: list[str], seed: int = 0, leads: Iterable[str] | None = None) -> dict[str, str]:
    """A fixed derangement: every user borrows another user's profile (the random-profile control).

    Users are ordered by a hash of (seed, id) and each borrows from the next one, so no user gets their own and
    the pairing does not depend on input order. With fewer than two users there is no one to borrow from.
    ``leads`` (a job that profiles lead authors only): where there are two or more of them, a lead borrows from
    another lead, whose profile exists; every other user (whose history alone a prompt shows) keeps the pairing
    over all users."""
    if leads is not None:
        return donors(user_ids, seed) | donors(sorted(set(leads) & set(user_ids)), seed)
    if len(user_ids) < 2:
        return {}
    order = sorted(set(user_ids), key=lambda u: hashlib.sha256(f"{seed}:{u}".encode()).hexdigest())
    return {u: order[(i + 1) % len(order)] for i, u in enumerate(order)}


def chunk_id(shard: int) -> str:
    return f"{shard:05d}"


def profile_chunks(users: list[UserHistory], num_shards: int) -> list[dict[str, Any]]:
    """Rows for the profile pass: the users of each non-empty shard, in input order within the shard."""
    by_shard: dict[int, list[UserHistory]] = {}
    for u in users:
        by_shard.setdefault(shard_of(u.user_id, num_shards), []).append(u)
    return [  # (each user as asdict() would give it, without its deep copy of every history item)
        {"chunk_id": chunk_id(k), "payload": json.dumps([{"user_id": u.user_id, "history": u.history} for u in part])}
        for k, part in sorted(by_shard.items())
    ]


def generation_chunks(
    groups: list[list[Query]],
    num_shards: int,
    profiled: str | None,
    with_histories: bool = False,
    histories: dict[str, list[Item]] | None = None,
) -> list[dict[str, Any]]:
    """Rows for the generation pass: the queries of each shard (by lead user), with the profile shards that
    hold their ``profiled`` users' profiles (``lead``: the lead authors', ``all``: every author's, None: none) and,
    for the random-profile control, the histories of the chunk's users (each borrows from another user of the
    same chunk)."""
    by_shard: dict[int, list[Query]] = {}
    for g in groups:
        by_shard.setdefault(shard_of(g[0].user_id, num_shards), []).extend(g)
    rows = []
    for k, queries in sorted(by_shard.items()):
        users = sorted({u for q in queries for u in q.user_ids})
        chunk_histories = {u: histories[u] for u in users} if with_histories and histories is not None else {}
        read = {q.user_id for q in queries} if profiled == "lead" else users
        rows.append(
            {
                "chunk_id": chunk_id(k),
                "payload": json.dumps({"queries": [q.to_dict() for q in queries], "histories": chunk_histories}),
                "profile_chunks": sorted({chunk_id(shard_of(u, num_shards)) for u in read}) if profiled else [],
            }
        )
    return rows


def decode_users(payload: str) -> list[UserHistory]:
    return [UserHistory(**d) for d in json.loads(payload)]


def decode_queries(payload: str) -> tuple[list[Query], dict[str, list[Item]]]:
    data = json.loads(payload)
    return [Query(**q) for q in data["queries"]], data["histories"]


def _date_key(item: dict[str, str]) -> float:
    raw = (item.get("date") or "").strip()
    for n, fmt in ((10, "%Y-%m-%d"), (7, "%Y-%m"), (4, "%Y")):
        try:
            return dt.datetime.strptime(raw[:n], fmt).timestamp()
        except ValueError:
            continue
    return float("-inf")


def most_recent_first(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """Items by date, newest first; undated items keep their order after the dated ones."""
    indexed = list(enumerate(items))
    indexed.sort(key=lambda p: (-_date_key(p[1]), p[0]))
    return [it for _, it in indexed]
