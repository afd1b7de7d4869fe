"""Input readers: every supported input format becomes :class:`~stepback_ray.data.rows.Query` rows."""

from stepback_ray.data.lamp import read_lamp
from stepback_ray.data.rows import (
    Query,
    UserHistory,
    collect_users,
    decode_queries,
    decode_users,
    donors,
    generation_chunks,
    lead_groups,
    profile_chunks,
    shard_of,
)

__all__ = [
    "Query",
    "UserHistory",
    "collect_users",
    "decode_queries",
    "decode_users",
    "donors",
    "generation_chunks",
    "lead_groups",
    "profile_chunks",
    "read_lamp",
    "shard_of",
]
