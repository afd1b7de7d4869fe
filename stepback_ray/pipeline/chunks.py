"""What a chunk holds and where its profiles live, read the same way by every stage.

A chunk is the users (profile pass) or queries (generation pass) of one shard (:mod:`stepback_ray.data.rows`):
carried inline (``payload``, LaMP JSON read by the driver) or staged beforehand (``source``, a dataset staged by
:mod:`stepback_ray.data.datasets`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.data import decode_queries, decode_users
from stepback_ray.data.datasets import load_staged
from stepback_ray.data.rows import Query, UserHistory


@dataclass(frozen=True)
class ProfilesAt:
    """Where a run's profiles are written and read: its own output, or a version of the profile store."""

    uri: str
    folder: str
    previous: str | None = None
    """Folder (same root) of the store version to carry unchanged users over from."""
    full: bool = True
    """Recompute every user whose fingerprint changed from scratch (no incremental update)."""
    version: str | None = None
    """The profile store version these profiles are (its folder, ``versions/date=.../run=...``); None: the run's
    own output. Generation rows record it (lineage)."""

    @property
    def embeddings(self) -> str:
        """Persona-Plug item embeddings, stored beside the profiles (same shards)."""
        return self.folder.rsplit("/", 1)[0] + "/embeddings" if "/" in self.folder else "embeddings"

    @property
    def previous_embeddings(self) -> str | None:
        return (self.previous.rsplit("/", 1)[0] + "/embeddings") if self.previous else None


def chunk_users(job: JobSpec, chunk: dict[str, Any]) -> list[UserHistory]:
    """The chunk's users with their histories."""
    if chunk.get("source"):
        return load_staged(job, chunk["source"])[0]
    return decode_users(chunk["payload"])


def chunk_queries(job: JobSpec, chunk: dict[str, Any]) -> tuple[list[Query], dict[str, list]]:
    """The chunk's queries and the histories of their users (for the random-profile donors)."""
    if chunk.get("source"):
        users, queries = load_staged(job, chunk["source"])
        return queries, {u.user_id: u.history for u in users}
    return decode_queries(chunk["payload"])
