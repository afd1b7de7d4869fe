"""Filesystems for every URI a run touches, their errors as one line, and the one retry policy.

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

from __future__ import annotations

from typing import Any

import fsspec
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from stepback_ray.config import StorageConfig
from stepback_ray.errors import ConfigError, InputError, StorageError


def _s3_kwargs(storage: StorageConfig) -> dict[str, Any]:
    # every S3 request's retry policy (module docstring): botocore's standard mode; its count includes the first
    kw: dict[str, Any] = {"config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": storage.retries + 1}}}
    if storage.endpoint_url:
        kw["endpoint_url"] = storage.endpoint_url
    if storage.region:
        kw["client_kwargs"] = {"region_name": storage.region}
    if storage.aws_profile:
        kw["profile"] = storage.aws_profile
    if storage.key is not None:
        kw["key"] = storage.key.get_secret_value()
    if storage.secret is not None:
        kw["secret"] = storage.secret.get_secret_value()
    if storage.anon:
        kw["anon"] = True
    return kw


SUPPORTED_SCHEMES = "a local path, file:// or s3:// (s3a://)"
"""What a location may be, as error messages name it: every URI is opened by :func:`filesystem_for`."""


def check_scheme(uri: str) -> str:
    """The protocol of ``uri``; a scheme no filesystem knows (``s4://``), or one whose package is not installed
    (``gs://`` without gcsfs), is one line (exit 2) instead of fsspec's ``ValueError: Protocol not known``."""
    protocol = fsspec.utils.get_protocol(uri)
    if protocol not in fsspec.available_protocols():
        raise ConfigError(
            f"{uri}: unknown URI scheme '{protocol}://'; use {SUPPORTED_SCHEMES} (another fsspec filesystem, "
            "e.g. gs://, works once its package is installed)"
        )
    if protocol not in ("file", "local", "s3", "s3a"):
        try:
            fsspec.get_filesystem_class(protocol)
        except ImportError as e:
            raise ConfigError(
                f"{uri}: the URI scheme '{protocol}://' needs a package that is not installed ({e}); or use "
                f"{SUPPORTED_SCHEMES}"
            ) from None
    return protocol


def filesystem_for(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    storage = storage or StorageConfig()
    protocol = check_scheme(uri)
    if protocol in ("s3", "s3a"):
        import s3fs  # imported lazily: local runs do not pay for botocore

        # one client per settings, thread and process (fsspec's instance cache): a new S3FileSystem costs a
        # session, credentials and a connection before its first answer, and a run opens its store hundreds of times.
        # Shared, it must never answer from an old listing: other processes write the same run.
        fs = s3fs.S3FileSystem(use_listings_cache=False, **_s3_kwargs(storage))
        fs.retries = 1  # s3fs's own loop: one attempt (botocore has retried each request already)
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_local_uri(uri: str) -> bool:
    return fsspec.utils.get_protocol(uri) in ("file", "local")


def is_storage_error(exc: BaseException) -> bool:
    """A failure of the storage itself (an OS error, or one of object storage's client libraries: no credentials,
    an expired token, a refused request), as opposed to a bug: told to the user as one line."""
    module = type(exc).__module__ or ""
    return isinstance(exc, OSError) or module.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "gcsfs", "adlfs")


def describe_storage_error(uri: str, exc: BaseException) -> str:
    """One line saying what went wrong talking to storage, without credentials. A local path's failure is told
    as the operating system's (permission denied, a file where a folder should be), not as object storage's."""
    if is_local_uri(uri) and isinstance(exc, OSError):
        if isinstance(exc, PermissionError):
            return f"{uri}: permission denied (not writable or not readable by this user)"
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            return f"{uri}: a file is in the way, where a folder is needed ({exc.filename})"
        return f"{uri}: {exc.strerror or exc}"
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "could not connect" in low or "connect timeout" in low or "endpointconnectionerror" in low:
        return f"{uri}: storage endpoint unreachable ({exc})"
    if "unable to locate credentials" in low or "nocredentialserror" in low:
        return f"{uri}: no credentials for object storage (set AWS_ACCESS_KEY_ID / AWS_PROFILE or the node's role)"
    if "nosuchbucket" in low or "bucket does not exist" in low:
        return f"{uri}: bucket does not exist"
    if isinstance(exc, PermissionError) or any(s in low for s in _DENIED):
        return f"{uri}: access denied (check the credentials / AWS profile)"
    return f"{uri}: {text.splitlines()[0]}"


_DENIED = ("invalidaccesskeyid", "signaturedoesnotmatch", "accessdenied", "access denied", "forbidden", "403")
_DENIED += ("access key id", "security token")


def read_bytes(uri: str, storage: StorageConfig | None = None) -> bytes:
    """Read a whole input file (retried as a run store's calls are), turning storage failures into one-line
    errors."""
    storage = storage or StorageConfig()

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    try:
        fs, path = filesystem_for(uri, storage)
        return retried_call(fs, storage, read)
    except FileNotFoundError:
        raise InputError(uri, "file not found") from None
    except IsADirectoryError:
        raise InputError(uri, "is a directory, expected a file") from None
    except Exception as e:
        if not is_storage_error(e):
            raise
        raise StorageError(describe_storage_error(uri, e)) from None


def is_transient(exc: BaseException) -> bool:
    """Worth retrying on a local or shared filesystem: timeouts, a dropped connection (NFS). Not: missing files,
    denied access, anything else."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("timeout", "timed out", "connection", "temporarily"))


#: what breaks off a response body part-way: botocore retries requests, not the reading of an answer that arrived
_CUT_BODY = ("IncompleteRead", "ClientPayloadError", "ResponseStreamingError", "ContentLengthError")
_CUT_BODY += ("Connection broken", "ResponseParserError")


def is_cut_body(exc: BaseException) -> bool:
    """An S3 response whose body was cut off (or garbled) while it was read: the one S3 failure retried above
    botocore (see the module docstring)."""
    text = f"{type(exc).__name__} {exc}"
    return any(s.lower() in text.lower() for s in _CUT_BODY)


def retried_call(fs: fsspec.AbstractFileSystem, storage: StorageConfig, fn, *args, **kwargs):
    """One storage call on ``fs``. Retried here, ``storage.retries`` times with jittered exponential backoff, only
    for what no layer below retries: on S3 a response body cut off mid-read, locally a transient OS error."""
    retryable = is_transient if is_local(fs) else is_cut_body
    retrying = Retrying(
        stop=stop_after_attempt(storage.retries + 1),
        reraise=True,
        wait=wait_random_exponential(multiplier=0.1, max=5.0),
        retry=retry_if_exception(retryable),
    )
    return retrying(fn, *args, **kwargs)
