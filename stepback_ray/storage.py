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

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from stepback_ray.config import StorageConfig
from stepback_ray.errors import ConfigError, DamagedFile, InputError, StorageError, StorageFull


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

        # one client per settings, thread and process (fsspec's instance cache): a new S3FileSystem costs ~200 ms
        # (session, credentials, connection) before its first answer, and a run opens its store hundreds of times.
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
    except (PermissionError, OSError) as e:
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


class PointerMoved(Exception):
    """A compare-and-swap write found the file changed since it was read (another writer won)."""


@dataclass
class RunStore:
    """The output location of one run: a root URI under which result files are written atomically."""

    uri: str
    storage: StorageConfig

    def __post_init__(self) -> None:
        self.fs, self.root = filesystem_for(self.uri, self.storage)

    def _call(self, fn, *args, **kwargs):
        """One storage call on this store's filesystem (:func:`retried_call`)."""
        return retried_call(self.fs, self.storage, fn, *args, **kwargs)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def uri_of(self, rel: str) -> str:
        return self.uri.rstrip("/") + "/" + rel

    def ensure_writable(self, run_marker: str | None = None) -> None:
        """Fail early (before any model loads) if the output cannot be written. With ``run_marker`` (the file a
        run writes first, ``_run_spec.json``) an output that already holds files must hold that file too: a
        folder of unrelated files would get the run's files mixed in, and a stale run's ``generations/`` would be
        found only at the end, on the row count. Locally nothing is left behind: folders made for the probe are
        removed again, so a run that then stops on bad input leaves no empty output folder."""
        if is_local(self.fs):
            self._ensure_local_writable(run_marker)
            return
        probe = self.path(f"_probe-{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm(probe)
        except Exception as e:  # noqa: BLE001 - translated to one line
            raise StorageError(describe_storage_error(self.uri, e).split(" (Could not connect")[0]) from None
        if run_marker:  # after the probe: the store is known to answer
            self._refuse_foreign_files(run_marker)

    def _ensure_local_writable(self, run_marker: str | None) -> None:
        made: list[str] = []  # the folders the probe creates, deepest first
        parent = os.path.abspath(self.root)
        while not os.path.lexists(parent):
            made.append(parent)
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            where = "the output" if parent == os.path.abspath(self.root) else parent
            raise StorageError(f"{self.uri}: {where} is a file, not a folder")
        if run_marker and not made:
            self._refuse_foreign_files(run_marker)
        probe = os.path.join(self.root, f"_probe-{uuid.uuid4().hex}")
        try:
            os.makedirs(self.root, exist_ok=True)
            with open(probe, "wb"):
                pass
            os.remove(probe)
        except PermissionError:
            raise StorageError(f"{self.uri}: not writable (permission denied)") from None
        except OSError as e:
            raise StorageFull.of(self.uri, e) or StorageError(f"{self.uri}: not writable ({e.strerror or e})") from None
        finally:
            for d in made:
                with contextlib.suppress(OSError):
                    os.rmdir(d)

    def entries(self) -> list[str]:
        """Names directly under the root (files and folders), without temporary files and write probes."""
        if not self._call(self.fs.exists, self.root):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self._call(self.fs.ls, self.root, detail=False)]
        return sorted(n for n in names if n and ".tmp-" not in n and not n.startswith("_probe-"))

    def _refuse_foreign_files(self, run_marker: str) -> None:
        names = self.entries()
        if names and run_marker not in names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise StorageError(
                f"{self.uri}: the output holds files but no run ({len(names)} entries, e.g. {shown}; "
                f"no {run_marker}); choose a new or empty output"
            )

    def _write(self, path: str, data: bytes) -> None:
        if is_local(self.fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:
                raise StorageFull.of(path, e) or e from None  # named: a full disk's OSError holds no path
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            self.fs.pipe_file(path, data)

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            self._call(self._write, self.path(rel), data)
        except Exception as e:  # noqa: BLE001 - translated to one line
            uri = self.uri_of(rel)
            raise StorageFull.of(uri, e) or StorageError(describe_storage_error(uri, e)) from None

    def read_bytes(self, rel: str) -> bytes:
        return self._call(self.fs.cat_file, self.path(rel))

    @contextlib.contextmanager
    def writer(self, rel: str):
        """A binary file to stream a large output into; it appears whole when the block ends (local: temporary
        name, then rename; object store: the upload completes on close), or not at all on error."""
        path = self.path(rel)
        if is_local(self.fs):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield StorageFull.naming(f, self.uri_of(rel))
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            f = self.fs.open(path, "wb")
            try:
                yield f
            except BaseException:
                # fsspec's file commits on close even when the block failed: throw the upload away instead
                # (s3fs aborts its multipart upload; a small file was never sent)
                f.discard()
                f.closed = True
                raise
            f.close()

    def scan(self, rel_dir: str, columns: list[str], optional: tuple[str, ...] = ()):
        """The rows of every Parquet file under ``rel_dir``, one file in memory at a time. ``optional``: columns
        that files written by an older version may lack (None in their rows); any other missing column is an
        error."""
        for rel in self.list(rel_dir, ".parquet"):
            data = self.read_bytes(rel)
            names = self._parquet(rel, data, lambda f: pq.ParquetFile(f).schema_arrow.names) if optional else columns
            wanted = [c for c in columns if c not in optional or c in names]
            missing = [c for c in optional if c not in names]
            table = self._parquet(rel, data, lambda f, wanted=wanted: pq.read_table(f, columns=wanted))
            for row in table.to_pylist():
                yield {**row, **dict.fromkeys(missing)} if missing else row

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())

    def read_json(self, rel: str) -> Any:
        return self._json(rel, self.read_bytes(rel))

    def _json(self, rel: str, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DamagedFile(self.uri_of(rel), f"not valid JSON ({'empty' if not data else e}; truncated?)") from None

    # -------------------------------------------------------------------- compare-and-swap (a store's pointer)
    def read_versioned(self, rel: str, parse=None) -> tuple[Any, str | None]:
        """A JSON file (``parse``: what to make of its bytes instead) and the token :meth:`swap_json` checks it
        against (None: the file does not exist). On S3 the token is the object's ETag, locally a hash of its bytes."""
        if not self.exists(rel):
            return None, None
        parse = parse or (lambda data: self._json(rel, data))
        if is_local(self.fs):
            data = self.read_bytes(rel)
            return parse(data), hashlib.sha256(data).hexdigest()
        info = self._call(self.fs.info, self.path(rel))
        return parse(self.read_bytes(rel)), info.get("ETag") or info.get("etag")

    def swap_json(self, rel: str, obj: Any, expected: str | None) -> None:
        """Write ``obj`` only if the file is still what :meth:`read_versioned` returned as ``expected`` (None: only
        if it does not exist); otherwise raise :class:`PointerMoved`. On S3 a conditional PUT (``If-Match`` on the
        ETag, ``If-None-Match: *`` for a new file), so of two writers that read the same state exactly one wins;
        locally an exclusive lock around the check and the atomic rename."""
        data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        path = self.path(rel)
        if is_local(self.fs):
            import fcntl

            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(f"{path}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process dies: no stale lock
                now = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.exists(path) else None
                if now != expected:
                    raise PointerMoved(self.uri_of(rel))
                self._write(path, data)
            return
        cond = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": expected}
        try:
            self._call(self.fs.pipe_file, path, data, **cond)
        except Exception as e:  # noqa: BLE001 - a failed precondition is the answer, anything else a storage error
            text = f"{type(e).__name__} {e}"
            failed = ("PreconditionFailed", "pre-condition", "412", "ConditionalRequestConflict", "409")
            if isinstance(e, FileExistsError) or any(s in text for s in failed):  # s3fs maps 412 to FileExistsError
                raise PointerMoved(self.uri_of(rel)) from None
            raise StorageError(describe_storage_error(self.uri_of(rel), e)) from None

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return self._parquet(rel, self.read_bytes(rel), lambda f: pq.read_table(f, columns=columns))

    def _parquet(self, rel: str, data: bytes, read):
        try:
            return read(io.BytesIO(data))
        except (pa.ArrowException, OSError) as e:  # the bytes are here: what fails is their content
            raise DamagedFile(self.uri_of(rel), f"not a readable Parquet file ({str(e).splitlines()[0]})") from None

    def exists(self, rel: str) -> bool:
        return self._call(self.fs.exists, self.path(rel))

    def remove(self, rel: str) -> None:
        """Delete a file or a folder with everything under it (nothing if it does not exist)."""
        if self.exists(rel):
            self._call(self.fs.rm, self.path(rel), recursive=True)

    def list(self, rel_dir: str, suffix: str = "") -> list[str]:
        """Relative paths of the files directly under ``rel_dir`` (sorted), ignoring temporary files."""
        base = self.path(rel_dir)
        if not self.exists(rel_dir):
            return []
        if hasattr(self.fs, "invalidate_cache"):
            self.fs.invalidate_cache(base)  # a listing must see files other processes just wrote
        out = []
        for p in self._call(self.fs.ls, base, detail=False):
            name = posixpath.basename(p.rstrip("/"))
            if ".tmp-" in name or not name.endswith(suffix):
                continue
            out.append(posixpath.join(rel_dir, name))
        return sorted(out)
