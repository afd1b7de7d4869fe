"""Reading a profile store's current profiles, as an application serves them (``stepback_ray.read_profiles``).

The reader follows ``CURRENT.json`` to the version it names and reads that version's profile files only: a nightly
job building the next version, or a version the quality gate refused, is never seen, and a reader never sees half a
version (``CURRENT.json`` moves only once a version is whole). A user's profile is in the chunk file of the user's
shard (:func:`~stepback_ray.data.rows.shard_of` over the store's ``num_shards``, the function the pipeline assigns
users to chunks with), so a read for a few users opens only the files of their shards. Every file read is checked
against the checksum its version's manifest records (:mod:`~stepback_ray.store.integrity`): a damaged file is one
line naming it, never a wrong profile served.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from stepback_ray.config import StorageConfig
from stepback_ray.data.rows import chunk_id, shard_of
from stepback_ray.errors import ConfigError, DamagedFile, NotAProfileStore, StepbackError, StorageError, UnknownColumn
from stepback_ray.storage import RunStore, describe_storage_error
from stepback_ray.store.integrity import MISSING, VersionFiles, parse
from stepback_ray.store.layout import POINTER, read_pointer

VERSION_COLUMN = "version"
"""Added by the reader: the store version each row was read from (``versions/date=.../run=...``)."""

SERVING_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("profile_text", pa.string()),
        ("profile_json", pa.string()),
        ("model", pa.string()),
        ("run_id", pa.string()),
        ("committed_at", pa.float64()),
        (VERSION_COLUMN, pa.string()),
    ]
)
"""The columns :func:`read_profiles` returns by default: what an application serves. The others (the prompt, the raw
model output, the partial profiles, token counts, fingerprints, ...) are for debugging and are read only when asked
for by name."""

SERVING_COLUMNS = tuple(SERVING_SCHEMA.names)


def storage_of(storage: StorageConfig | Mapping[str, Any] | None) -> StorageConfig:
    """Storage settings given as a :class:`StorageConfig`, as a mapping of its keys (``{"endpoint_url": ...}``),
    or not at all (the standard AWS environment and profile); a bad key or value is one line."""
    if storage is None:
        return StorageConfig()
    if isinstance(storage, StorageConfig):
        return storage
    try:
        return StorageConfig.model_validate(dict(storage))
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"storage.{key}: {first['msg']}") from None


def open_store(uri: str, storage: StorageConfig) -> RunStore:
    """The store at ``uri``; one line when storage does not answer or the URI holds no profile store."""
    root = RunStore(uri, storage)
    try:
        present = root.exists(POINTER) or root.exists("versions")
    except StepbackError:
        raise
    except Exception as e:  # noqa: BLE001 - an unreachable endpoint, a missing bucket, denied access: one line
        raise StorageError(describe_storage_error(uri, e)) from None
    if not present:
        raise NotAProfileStore(f"{uri}: not a profile store (no CURRENT.json and no versions/)")
    return root


def current_version(root: RunStore) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``CURRENT.json``, the manifest of the version it names); one line when there is none yet, or when the
    pointer or the manifest is damaged."""
    pointer = read_pointer(root)[0]
    if pointer is None:
        raise NotAProfileStore(
            f"{root.uri}: the store has no current version yet (no CURRENT.json): a `stepback profile` run commits "
            f"one, `stepback promote --store {root.uri} --version V` points it at a finished one"
        )
    rel = f"{pointer['version']}/manifest.json"
    if not root.exists(rel):
        raise DamagedFile(root.uri_of(rel), f"{MISSING}; CURRENT.json points at {pointer['version']}")
    return pointer, root.read_json(rel)


def profile_files(root: RunStore, version: str, manifest: dict[str, Any]) -> list[str]:
    """The version's profile files as its manifest names them (a listing for a manifest from before it did)."""
    files = manifest.get("files")
    return sorted(files) if files is not None else root.list(f"{version}/profiles", ".parquet")


def _names(values: str | Iterable[str], what: str) -> list[str]:
    """Ids or column names, each once, in the order given; one string is one name."""
    values = [values] if isinstance(values, str) else list(values)
    bad = next((v for v in values if not isinstance(v, str)), None)
    if bad is not None:
        raise StepbackError(f"{what}: expected strings, got {bad!r} ({type(bad).__name__})")
    return list(dict.fromkeys(values))


def _wanted_columns(columns: str | Iterable[str] | None) -> list[str]:
    return list(SERVING_COLUMNS) if columns is None else _names(columns, "columns")


def _check_columns(asked: list[str], have: list[str], where: str) -> None:
    unknown = [c for c in asked if c not in have and c != VERSION_COLUMN]
    if unknown:
        listed = ", ".join(have + [VERSION_COLUMN])
        raise UnknownColumn(f"{where}: no column {', '.join(map(repr, unknown))} in the profiles (they have: {listed})")


def read_profiles(
    store_uri: str,
    user_ids: str | Iterable[str] | None = None,
    columns: str | Iterable[str] | None = None,
    storage: StorageConfig | Mapping[str, Any] | None = None,
) -> pa.Table:
    """The current profiles of a profile store, as a ``pyarrow.Table`` (one row per user).

    ``store_uri``: the store (``profile_store.uri`` of the job that writes it: a local path or ``s3://...``).
    ``user_ids``: the users to read (one id as a string, or any iterable of ids); None reads every user. Only the
    chunk files of those users' shards are opened. An id the current version does not hold (never profiled,
    forgotten, or not in tonight's input) is simply not in the table: compare the ``user_id`` column with what you
    asked for. Rows come in store order (by shard), not in the order asked.
    ``columns``: the columns to return, in that order; None returns :data:`SERVING_COLUMNS`: ``user_id``, ``task``,
    ``status``, ``profile_text`` (the profile as generation prompts show it), ``profile_json`` (its fields as a JSON
    object, including the habits measured from the history), ``model``, ``run_id`` (the run that made this profile:
    a profile carried over unchanged keeps the run that distilled it), ``committed_at`` (when the row was written
    into this version, seconds since the epoch, UTC) and ``version`` (the store version read). Any other column of
    the profile rows can be asked for by name (``prompt``, ``raw_output``, ``partials_json``, ``fingerprint``,
    ``origin``, ``history_ids``, token counts, ...); an unknown one is :class:`~stepback_ray.errors.UnknownColumn`.
    ``storage``: object-storage settings (:class:`~stepback_ray.config.StorageConfig`, or a mapping of its keys,
    e.g. ``{"endpoint_url": "http://minio:9000"}``); unset, the standard AWS environment and profile.

    Which rows to serve, by ``status`` (text after a colon is detail):

    - ``ok``: every field of the profile filled. Serve it.
    - ``partial``: the model's answer parsed, some fields are empty (``profile_text`` leaves them out). Serve it.
    - ``fallback``: no JSON could be read from the model's answer; the fields hold quoted phrases picked out of it.
      Serve it only if a rough profile beats none for your application.
    - ``error: ...``: the engine failed on this user; there is no profile (``profile_text`` is empty) and the next
      run retries it. Do not serve; fall back to what you do without a profile.
    - ``skipped: empty history``: nothing to profile; no profile. Do not serve.

    A store that is not there, one without a current version yet, and a damaged file are one-line
    :class:`~stepback_ray.errors.StepbackError` s, never a partial answer.
    """
    root = open_store(store_uri, storage_of(storage))
    pointer, manifest = current_version(root)
    version = pointer["version"]
    asked_columns = _wanted_columns(columns)
    files = profile_files(root, version, manifest)
    if user_ids is None:
        wanted, chosen = None, files
    else:
        wanted = _names(user_ids, "user_ids")
        shards = sorted({shard_of(u, pointer["num_shards"]) for u in wanted})
        held = set(files)
        chosen = [rel for rel in (f"{version}/profiles/chunk-{chunk_id(s)}.parquet" for s in shards) if rel in held]
    checked = VersionFiles(root, version)
    tables = [_read_chunk(root, checked, rel, asked_columns, wanted) for rel in chosen]
    if not tables:
        return _empty(root, files, asked_columns)
    out = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    if VERSION_COLUMN in asked_columns:
        out = out.append_column(VERSION_COLUMN, pa.array([version] * out.num_rows, pa.string()))
    return out.select(asked_columns)


def _read_chunk(
    root: RunStore, checked: VersionFiles, rel: str, asked: list[str], wanted: list[str] | None
) -> pa.Table:
    """One chunk file of the current version: checked against its checksum, its asked columns, and the rows of
    ``wanted`` (None: all)."""
    data = _bytes(root, rel)
    problem = checked.problem(rel, data)
    if problem:
        raise DamagedFile(root.uri_of(rel), problem)
    _check_columns(asked, _schema(root, rel, data).names, root.uri)
    read = [c for c in asked if c != VERSION_COLUMN]
    table = parse(root, rel, data, list(dict.fromkeys([*read, "user_id"])))
    if wanted is not None:
        table = table.filter(pc.is_in(table.column("user_id"), value_set=pa.array(wanted, pa.string())))
    return table.select(read)


def _bytes(root: RunStore, rel: str) -> bytes:
    try:
        return root.read_bytes(rel)
    except FileNotFoundError:
        raise DamagedFile(root.uri_of(rel), MISSING) from None


def _schema(root: RunStore, rel: str, data: bytes) -> pa.Schema:
    """The columns of a Parquet file, from its footer (:class:`DamagedFile` when it does not parse)."""
    try:
        return pq.ParquetFile(io.BytesIO(data)).schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise DamagedFile(root.uri_of(rel), f"not a readable Parquet file ({str(e).splitlines()[0]})") from None


def _empty(root: RunStore, files: list[str], asked: list[str]) -> pa.Table:
    """No file holds the asked users: an empty table of the asked columns (their types from the serving schema, or
    for other columns from one file's schema)."""
    if all(c in SERVING_COLUMNS for c in asked):
        return SERVING_SCHEMA.empty_table().select(asked)
    if not files:  # a version without profiles: nothing to learn the other columns from
        _check_columns(asked, [c for c in SERVING_COLUMNS if c != VERSION_COLUMN], root.uri)
    schema = _schema(root, files[0], _bytes(root, files[0]))
    _check_columns(asked, schema.names, root.uri)
    return pa.schema([SERVING_SCHEMA.field(c) if c == VERSION_COLUMN else schema.field(c) for c in asked]).empty_table()
