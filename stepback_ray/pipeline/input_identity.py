"""What a run's input was when the run first read it: every input file with its size and its modification time
(its ETag on object storage), and for a local file up to :data:`DIGEST_MAX_BYTES` the SHA-256 of its bytes,
recorded in ``_input.json`` beside ``_run_spec.json``. A rerun of the same run id (same output) resumes from what
the first one committed and staged, so it must read the same input: a file that changed, appeared or went away
since is one line naming it (exit 2), not a run that silently mixes the old staging with the new files. A local
file copied again with the same bytes (a new modification time: a re-synced data folder) is the same input."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.errors import StepbackError
from stepback_ray.storage import RunStore, filesystem_for, is_local

RECORD = "_input.json"
DIGEST_MAX_BYTES = 256 << 20
"""Local files up to this size are hashed when a run first reads them (LaMP JSON, a small dataset: a fraction of
a second); a larger one is known by its modification time alone, so a first start never reads gigabytes."""


def _uri(fs: Any, name: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    return name if is_local(fs) else f"{protocol}://{name}"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_identity(job: JobSpec, digests: bool = True) -> dict[str, dict[str, Any]]:
    """Every file of the job's input (a dataset's folder or glob expanded) -> its size and version (modification
    time, or ETag on object storage) and, with ``digests``, a local file's SHA-256."""
    paths = [job.input.path] if job.input.format != "lamp" else [job.input.questions, job.input.outputs]
    out: dict[str, dict[str, Any]] = {}
    for uri in filter(None, paths):
        fs, path = filesystem_for(uri, job.storage)
        if any(c in path for c in "*?["):
            found = fs.glob(path, detail=True)
        elif fs.isdir(path):
            found = fs.find(path, detail=True)
        elif fs.exists(path):
            found = {path: fs.info(path)}
        else:
            found = {}
        for name, info in found.items():
            if info.get("type", "file") == "file":
                version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
                out[_uri(fs, name)] = {"size": info.get("size"), "version": str(version)}
                if digests and is_local(fs) and (info.get("size") or 0) <= DIGEST_MAX_BYTES:
                    out[_uri(fs, name)]["sha256"] = _sha256(name)
    return out


def _change(before: dict[str, dict[str, Any]], now: dict[str, dict[str, Any]]) -> str | None:
    """The first difference, in words (None: the same files, sizes and versions)."""
    changes = []
    for name in sorted(set(before) | set(now)):
        a, b = before.get(name), now.get(name)
        if a == b or (a and b and (a["size"], a["version"]) == (b["size"], b["version"])):
            continue
        if a and b and a["size"] == b["size"] and a.get("sha256") and a["sha256"] == _sha256(name):
            continue  # the same bytes, written again
        if a is None:
            changes.append(f"{name} (new file)")
        elif b is None:
            changes.append(f"{name} (gone)")
        elif a["size"] != b["size"]:
            changes.append(f"{name} (size {a['size']} -> {b['size']})")
        else:
            changes.append(f"{name} (modified: {_when(a['version'])} -> {_when(b['version'])})")
    if not changes:
        return None
    return changes[0] + (f" and {len(changes) - 1} more" if len(changes) > 1 else "")


def _when(version: str) -> str:
    try:  # a local modification time
        return dt.datetime.fromtimestamp(float(version), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        return version


def check_input(store: RunStore, job: JobSpec, resumed: bool) -> None:
    """Record the input's identity on a run's first start; on a rerun, refuse an input that changed since."""
    if resumed and store.exists(RECORD):
        change = _change(store.read_json(RECORD), input_identity(job, digests=False))
        if change:
            raise StepbackError(
                f"{job.output_uri}: input changed since this run staged it: {change}; use a new run_id or output"
            )
        return
    store.write_json(RECORD, input_identity(job))
