"""A run's (or a store's) files under one root: atomic writes, Parquet and JSON reads that name the file when it is
damaged, listings, and the compare-and-swap of a pointer file (``CURRENT.json``)."""

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

import pyarrow as pa
import pyarrow.parquet as pq

from stepback_ray.config import StorageConfig
from stepback_ray.errors import DamagedFile, StorageError, StorageFull
from stepback_ray.storage.filesystems import (
    describe_storage_error,
    filesystem_for,
    is_local,
    retried_call,
)


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
