"""What a run records about itself: the spec it started with (and the check that a rerun matches it), the
per-mode metrics and counts read back from the committed rows, the error budget, and the manifest's common head.
The manifest is written last, so a run without ``manifest.json`` (or with ``status: failed``) did not finish.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from typing import Any

from stepback_ray import __version__
from stepback_ray.config import JobSpec
from stepback_ray.data.rows import status_kind
from stepback_ray.errors import ErrorBudgetExceeded, RunFailed, StepbackError
from stepback_ray.evaluation import metrics
from stepback_ray.storage import RunStore
from stepback_ray.tasks import get_task


def check_resume(store: RunStore, job: JobSpec) -> bool:
    """Record the run's spec at the start; on a rerun into the same output, insist that every key that changes
    results is the same (:func:`~stepback_ray.config.speed_only_keys` may differ: a smaller batch after an
    out-of-memory crash, the fault switched off)."""
    from stepback_ray.config import speed_only_keys, without_keys

    spec = job.results_dict()
    if store.exists("_run_spec.json"):
        previous = without_keys(store.read_json("_run_spec.json"), speed_only_keys())
        # a key the recorded spec lacks was added to stepback-ray since; at its default it changes nothing
        changed = sorted(k for k in _changed_keys(previous, spec) if not _new_key_at_default(previous, spec, k))
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


def summarize(job: JobSpec, store: RunStore) -> tuple[dict[str, Any], dict[str, int]]:
    """Per-mode official metrics, token counts and statuses, streamed over the committed generation files (one
    file in memory at a time); the official-format predictions are written per mode on the way."""
    task = get_task(job.task)
    acc = {m: metrics.MetricAccumulator(task) for m in job.modes}
    tot = {
        m: {
            "queries": 0,
            "scored": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "completion_tokens": 0,
            "engine_seconds": 0.0,
            "users": set(),
            "statuses": {},
        }
        for m in job.modes
    }
    cols = [
        "query_id",
        "mode",
        "user_id",
        "gold",
        "output",
        "rouge1",
        "rougeL",
        "abs_error",
        "prompt_tokens",
        "cached_prompt_tokens",
        "completion_tokens",
        "engine_seconds",
        "status",
    ]
    with contextlib.ExitStack() as stack:
        out = {m: stack.enter_context(store.writer(f"predictions/{m}.json")) for m in job.modes}
        first = {m: True for m in job.modes}
        for m in job.modes:  # the official outputs format, ready for `stepback score` or a LaMP submission
            out[m].write(json.dumps({"task": task.file_task})[:-1].encode() + b', "golds": [')
        for r in store.scan("generations", cols, optional=("cached_prompt_tokens",)):
            m = r["mode"]
            t = tot[m]
            t["queries"] += 1
            t["users"].add(r["user_id"])
            t["prompt_tokens"] += r["prompt_tokens"]
            t["cached_prompt_tokens"] += r.get("cached_prompt_tokens") or 0
            t["completion_tokens"] += r["completion_tokens"]
            t["engine_seconds"] += r["engine_seconds"]
            key = status_kind(r["status"])
            t["statuses"][key] = t["statuses"].get(key, 0) + 1
            if r["gold"] is not None:  # failed rows too (an empty answer): the metric predictions/ reproduces
                t["scored"] += 1
                acc[m].add(r["output"], r["gold"], r["rouge1"], r["rougeL"], r["abs_error"])
            sep = b"" if first[m] else b", "
            first[m] = False
            out[m].write(sep + json.dumps({"id": r["query_id"], "output": r["output"] or ""}).encode())
        for m in job.modes:
            out[m].write(b"]}\n")
    modes: dict[str, Any] = {}
    for m in job.modes:
        t = tot[m]
        secs = t["engine_seconds"]
        modes[m] = {
            "users": len(t["users"]),
            "queries": t["queries"],
            "scored": t["scored"],
            **acc[m].result(),
            "prompt_tokens": t["prompt_tokens"],
            "cached_prompt_tokens": t["cached_prompt_tokens"],
            "completion_tokens": t["completion_tokens"],
            "engine_seconds": round(secs, 3),
            "tokens_per_s": round((t["prompt_tokens"] + t["completion_tokens"]) / secs, 1) if secs else None,
            "statuses": t["statuses"],
        }
    statuses: dict[str, int] = {}
    for m in job.modes:
        for k, v in tot[m]["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    counts = {
        "generation_rows": sum(t["queries"] for t in tot.values()),
        "generation_rows_by_status": statuses,
        "queries_generated": max((t["queries"] for t in tot.values()), default=0),
    }
    return {
        "task": job.task,
        "metric": task.metric,
        "keys": list(metrics.OFFICIAL_KEYS[task.metric]),
        "modes": modes,
    }, counts


def check_error_budget(job: JobSpec, what: str, errors: int, total: int, counts: dict[str, Any]) -> None:
    """Fail the pass when its engine-error rows exceed ``max_error_fraction`` of its rows; ``counts`` go into
    the failed run's manifest."""
    if errors and errors > job.max_error_fraction * total:
        raise ErrorBudgetExceeded(what, errors, total, job.max_error_fraction, counts)


def manifest_head(job: JobSpec, t_start: float, resumed: bool, status: str) -> dict[str, Any]:
    """The fields every manifest starts with (a finished run's, a profile job's, a failed run's)."""
    return {
        "run_id": job.run_id,
        "name": job.name,
        "output": job.output_uri,
        "resumed": resumed,
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": job.public_dict(),
        "versions": versions(),
    }


def failed_manifest(job: JobSpec, store: RunStore, t_start: float, resumed: bool, error: RunFailed) -> None:
    """What a failed run leaves for whoever looks: ``status: failed``, why, and the counts it reached."""
    store.write_json(
        "manifest.json",
        {**manifest_head(job, t_start, resumed, "failed"), "error": str(error), "counts": getattr(error, "counts", {})},
    )
