"""Where runs read and write: local paths and object storage behind one small interface.

:mod:`.filesystems` builds a filesystem for every URI (inside the process that uses it, never pickled across),
turns its errors into one line and holds the one retry policy (``storage.retries``); :mod:`.run_store` is a run's
or a store's files under one root (atomic writes, damaged files named, the pointer's compare-and-swap).
"""

from stepback_ray.storage.filesystems import (
    SUPPORTED_SCHEMES,
    check_scheme,
    describe_storage_error,
    filesystem_for,
    is_cut_body,
    is_local,
    is_local_uri,
    is_storage_error,
    is_transient,
    read_bytes,
    retried_call,
)
from stepback_ray.storage.run_store import PointerMoved, RunStore

__all__ = [
    "SUPPORTED_SCHEMES",
    "PointerMoved",
    "RunStore",
    "check_scheme",
    "describe_storage_error",
    "is_storage_error",
    "filesystem_for",
    "is_cut_body",
    "is_local",
    "is_local_uri",
    "is_transient",
    "read_bytes",
    "retried_call",
]
