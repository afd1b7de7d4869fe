"""The rows the passes hand each other and commit, as Arrow schemas.

Every block is one chunk from start to end; the planned rows carry ``chunk_rows`` (how many rows the chunk has)
so that the commit can refuse a chunk with a row missing. A generation row is known by its
:func:`row_key` (query and mode), a profile or embedding row by its user.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
_LS = pa.list_(pa.string())
_VECTORS = pa.list_(pa.list_(pa.float32()))

PROFILE_SCHEMA = pa.schema(
    [
        ("chunk_id", _S),
        ("user_id", _S),
        ("task", _S),
        ("status", _S),
        ("profile_json", _S),
        ("profile_text", _S),
        ("items_total", _I),
        ("items_used", _I),
        ("items_dropped", _I),
        ("parts", _I),
        ("item_ids", _LS),
        ("partials_json", _S),
        ("style_notes_json", _S),
        ("prompt", _S),
        ("raw_output", _S),
        ("llm_calls", _I),
        ("prompt_tokens", _I),
        ("completion_tokens", _I),
        ("engine_seconds", _F),
        ("fingerprint", _S),
        ("model", _S),
        ("prompt_version", _S),
        ("notes", _LS),
        ("origin", _S),
        ("history_ids", _LS),
        ("run_id", _S),
        ("exact", _B),
        ("recent_items", _LS),
        ("committed_at", _F),
        ("cached_prompt_tokens", _I),
    ]
)
"""A committed profile (``profiles/chunk-<id>.parquet``, or a profile store version)."""

EMBEDDING_SCHEMA = pa.schema(
    [("chunk_id", _S), ("user_id", _S), ("item_ids", _LS), ("vectors", _VECTORS), ("encoder", _S), ("reused", _I)]
)
"""A user's Persona-Plug item embeddings (``embeddings/chunk-<id>.parquet``, beside the profiles)."""

GENERATION_SCHEMA = pa.schema(
    [
        ("chunk_id", _S),
        ("query_id", _S),
        ("mode", _S),
        ("user_id", _S),
        ("user_ids", _LS),
        ("task", _S),
        ("input", _S),
        ("gold", _S),
        ("profile_text", _S),
        ("profile_status", _S),
        ("retrieved_ids", _LS),
        ("prompt", _S),
        ("proposals", _LS),
        ("raw_output", _S),
        ("output", _S),
        ("score", _F),
        ("rouge1", _F),
        ("rougeL", _F),
        ("abs_error", _F),
        ("prompt_tokens", _I),
        ("completion_tokens", _I),
        ("engine_seconds", _F),
        ("llm_calls", _I),
        ("finish_reason", _S),
        ("truncated", _B),
        ("status", _S),
        ("notes", _LS),
        ("history_items", _I),
        ("candidates", _LS),
        ("committed_at", _F),
        ("profile_version", _S),
        ("profile_fingerprint", _S),
        ("context_user_ids", _LS),
        ("cached_prompt_tokens", _I),
    ]
)
"""A committed generation row (``generations/chunk-<id>.parquet``): one per query and mode. Lineage:
``profile_version`` is the profile store version the row's profile came from (null: the profiles are in the run's
own output, or the mode shows no profile), ``profile_fingerprint`` the ``fingerprint`` of the profile row the
prompt used: the lead author's (a co-author's profile, where the strategy shows one, comes from the same version,
found by ``user_ids``), under
``random-profile`` the donor's; null when the prompt holds no profile. ``context_user_ids``: whose profile and
history the prompt used (the authors, or the donor under a control), so that forgetting a person also finds the
rows that borrowed from them."""

PLANNED_PROFILE_SCHEMA = pa.schema(
    [
        ("chunk_id", _S),
        ("chunk_rows", _I),
        ("user_id", _S),
        ("plan_json", _S),
        ("fingerprint", _S),
        ("notes", _LS),
        ("origin", _S),
        ("history_ids", _LS),
        ("carried_json", _S),
        ("recent_items", _LS),
        ("retained", _B),
    ]
)
"""A user planned for the profile engine stage (or carried over, with its old row in ``carried_json``)."""

PLANNED_GENERATION_SCHEMA = pa.schema(
    [
        ("chunk_id", _S),
        ("chunk_rows", _I),
        ("query_id", _S),
        ("mode", _S),
        ("user_id", _S),
        ("user_ids", _LS),
        ("input", _S),
        ("gold", _S),
        ("profile_text", _S),
        ("profile_status", _S),
        ("retrieved_ids", _LS),
        ("prompts", _LS),
        ("merge_json", _S),
        ("truncated", _B),
        ("notes", _LS),
        ("history_items", _I),
        ("soft_tokens", _VECTORS),
        ("select_refs", pa.list_(_LS)),
        ("profile_version", _S),
        ("profile_fingerprint", _S),
        ("context_user_ids", _LS),
    ]
)
"""A (query, mode) row with its rendered prompts, for the generation engine stage."""


def table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """``rows`` as a table of ``schema`` (missing fields null, extra keys dropped)."""
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


ENGINE_STAMPS = (
    ("engine_started_at", _F),
    ("engine_ready_at", _F),
    ("engine_process", _S),
    ("engine_cpu_s", _F),
    ("engine_preemptions", _I),
)
"""What an engine stage stamps on its blocks (:meth:`~stepback_ray.pipeline.engine_stage.EngineStage.stamp`) for
the commit summaries: travelling columns, never committed."""


def with_chunk_rows(schema: pa.Schema) -> pa.Schema:
    """A committed schema as it travels to the commit stage: with the chunk's row count and the engine's stamps
    (:data:`ENGINE_STAMPS`)."""
    for name, kind in (("chunk_rows", _I), *ENGINE_STAMPS):
        schema = schema.append(pa.field(name, kind))
    return schema


def row_key(query_id: str, mode: str) -> str:
    """A generation row's identity in a chunk (what a rerun retries)."""
    return f"{query_id}\t{mode}"


def key_of(r: dict[str, Any]) -> str:
    """A committed row's identity: :func:`row_key` for generation rows, the user for profile and embedding rows."""
    return row_key(r["query_id"], r["mode"]) if "mode" in r else r["user_id"]
