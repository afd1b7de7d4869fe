"""Where runs read and write: local paths and object storage behind one small interface.

Every URI goes through fsspec (``s3://`` through s3fs); filesystems are built from the job's
:class:`~stepback_ray.config.StorageConfig` *inside* the process that uses them (the driver or a Ray worker), never
pickled across. Writes of result files are atomic: a reader sees the whole file or none of it (local files are
written to a temporary name and renamed; an object-store PUT is atomic by itself).

**One retry policy**, ``storage.retries``, applied by exactly one layer for each kind of failure, so a throttled
call is never retried more often than the config says:

- on S3, every request (reads, writes, listings, multipart parts, and Ray Data's reads and writes through the same
  filesystem) is retried by botocore's ``standard`` retry mode, ``storage.retries`` times: throttling
  (``SlowDown``), 5xx, timeouts and connection failures, with jittered exponential backoff (up to 20 s a wait;
  its retry quota also stops retrying a client whose retries far outnumber its successes, so sustained throttling
  fails loud instead of queueing). s3fs's own retry loop is switched off (it would retry each of those calls
  again, 5 times);
- a response body cut off mid-read (which botocore cannot retry: the response had arrived) is retried by
  :func:`retried_call` (every run-store call and whole-file input read), the same number of times (Ray Data's
  streaming reads of a dataset input do not go through it);
- on a local or shared (NFS) filesystem, :func:`retried_call` retries transient OS errors (timeouts).

A missing file, a missing bucket or denied access are not transient and fail at once.
"""

from stepback_ray.storage.filesystems import (
    SUPPORTED_SCHEMES,
    check_scheme,
    describe_storage_error,
    filesystem_for,
    is_cut_body,
    is_local,
    is_local_uri,
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
    "filesystem_for",
    "is_cut_body",
    "is_local",
    "is_local_uri",
    "is_transient",
    "read_bytes",
    "retried_call",
]
