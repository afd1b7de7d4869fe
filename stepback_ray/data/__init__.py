"""Input readers: every supported input format becomes :class:`~stepback_ray.data.rows.Query` rows."""

from .lamp import read_lamp, read_lamp_table
from .rows import Query, UserWork, chunk_users, decode_chunk, group_by_user, queries_to_arrow

__all__ = ["Query", "UserWork", "chunk_users", "decode_chunk", "group_by_user", "queries_to_arrow",
           "read_lamp", "read_lamp_table"]
