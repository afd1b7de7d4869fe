"""What a run records about itself: the spec it started with (and the check that a rerun matches it), the
per-mode metrics and counts read back from the committed rows, the error budget, and the manifest's common head.
The manifest is written last, so a run without ``manifest.json`` (or with ``status: failed``) did not finish.
"""

from __future__ import annotations

import platform
import time
from typing import Any

from stepback_ray import __version__
from stepback_ray.config import JobSpec, speed_only_keys, without_keys
from stepback_ray.errors import ErrorBudgetExceeded, RunFailed, StepbackError
from stepback_ray.pipeline.stages import Command
from stepback_ray.storage import RunStore


def check_resume(store: RunStore, job: JobSpec) -> bool:
    """Record the run's spec at the start; on a rerun into the same output, insist that every key that changes
    results is the same (:func:`~stepback_ray.config.speed_only_keys` may differ: a smaller batch after an
    out-of-memory crash, the fault switched off)."""
    spec = job.results_dict()
    if store.exists("_run_spec.json"):
        previous = without_keys(store.read_json("_run_spec.json"), speed_only_keys())
        # a key the recorded spec lacks was added to stepback-ray since; at its default it changes nothing
        changed = sorted(
            k
            for k in _changed_keys(previous, spec)
            if not _new_key_at_default(previous, spec, k) and not _removed_key(previous, spec, k)
        )
        if changed:
            raise StepbackError(
                f"{job.output_uri} holds a run with a different job spec (changed: "
                f"{', '.join(changed)}); choose another output or run_id"
            )
        return True
    store.write_json("_run_spec.json", spec)
    return False


_MISSING = object()


def _get(data: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return _MISSING
        data = data[part]
    return data


def _removed_key(previous: dict[str, Any], spec: dict[str, Any], key: str) -> bool:
    """``key`` is in the recorded spec but no longer a key of stepback-ray's job spec (a setting that was removed,
    such as ``engine.decode_loop``): the run it recorded resumes without it."""
    if _get(spec, key) is not _MISSING or _get(previous, key) is _MISSING:
        return False
    model: Any = JobSpec
    for part in key.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return False  # inside a free-form value (a dict), not a removed field
        if part not in fields:
            return True
        model = fields[part].annotation
    return False


def _new_key_at_default(previous: dict[str, Any], spec: dict[str, Any], key: str) -> bool:
    """``key`` is absent from the recorded spec (a run recorded by an older version) and holds its default now."""
    if _get(previous, key) is not _MISSING:
        return False
    from pydantic import BaseModel

    model: Any = JobSpec
    default: Any = _MISSING
    for part in key.split("."):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        default = fields[part].get_default(call_default_factory=True)
        model = fields[part].annotation
    if isinstance(default, BaseModel):
        default = default.model_dump(mode="json")
    return default is not _MISSING and _get(spec, key) == default


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two spec dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix.rstrip(".")] if a != b else []
    return [k for key in set(a) | set(b) for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "stepback-ray": __version__}
    for pkg in ("ray", "torch", "transformers", "pyarrow", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_error_budget(job: JobSpec, what: str, errors: int, total: int, counts: dict[str, Any]) -> None:
    """Fail the pass when its engine-error rows exceed ``max_error_fraction`` of its rows; ``counts`` go into
    the failed run's manifest."""
    if errors and errors > job.max_error_fraction * total:
        raise ErrorBudgetExceeded(what, errors, total, job.max_error_fraction, counts)


def manifest_head(job: JobSpec, command: Command, t_start: float, resumed: bool, status: str) -> dict[str, Any]:
    """The fields every manifest starts with (a finished run's, a profile job's, a failed run's); ``command``:
    which command ran (``stepback report`` builds a profile run's report from it)."""
    return {
        "run_id": job.run_id,
        "name": job.name,
        "command": command,
        "output": job.output_uri,
        "resumed": resumed,
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": job.public_dict(),
        "versions": versions(),
    }


def failed_manifest(
    job: JobSpec, command: Command, store: RunStore, t_start: float, resumed: bool, error: RunFailed
) -> None:
    """What a failed run leaves for whoever looks: ``status: failed``, why, and the counts it reached."""
    store.write_json(
        "manifest.json",
        {
            **manifest_head(job, command, t_start, resumed, "failed"),
            "error": str(error),
            "counts": getattr(error, "counts", {}),
        },
    )
