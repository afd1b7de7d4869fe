"""A run's results read back from its committed generation rows: per-mode official metrics, token counts and
statuses, and the official-format predictions (``predictions/<mode>.json``) written on the way. A run and a forget
that removed rows from it both summarize the same way."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from stepback_ray.data.rows import status_kind
from stepback_ray.evaluation import metrics
from stepback_ray.storage import RunStore
from stepback_ray.tasks import get_task


def summarize(store: RunStore, task_name: str, modes: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """Per-mode official metrics, token counts and statuses, streamed over the committed generation files (one
    file in memory at a time); the official-format predictions are written per mode on the way. Returns the
    metrics (``metrics.json``) and the generation counts (the manifest's)."""
    task = get_task(task_name)
    acc = {m: metrics.MetricAccumulator(task) for m in modes}
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
            "at_length_cap": 0,
        }
        for m in modes
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
        "finish_reason",
    ]
    with contextlib.ExitStack() as stack:
        out = {m: stack.enter_context(store.writer(f"predictions/{m}.json")) for m in modes}
        first = {m: True for m in modes}
        for m in modes:  # the official outputs format, ready for `stepback score` or a LaMP submission
            out[m].write(json.dumps({"task": task.file_task})[:-1].encode() + b', "golds": [')
        for r in store.scan("generations", cols, optional=("cached_prompt_tokens", "finish_reason")):
            m = r["mode"]
            t = tot[m]
            t["queries"] += 1
            t["users"].add(r["user_id"])
            t["prompt_tokens"] += r["prompt_tokens"]
            t["cached_prompt_tokens"] += r.get("cached_prompt_tokens") or 0
            t["completion_tokens"] += r["completion_tokens"]
            t["engine_seconds"] += r["engine_seconds"]
            t["at_length_cap"] += r.get("finish_reason") == "length"
            key = status_kind(r["status"])
            t["statuses"][key] = t["statuses"].get(key, 0) + 1
            if r["gold"] is not None:  # failed rows too (an empty answer): the metric predictions/ reproduces
                t["scored"] += 1
                acc[m].add(r["output"], r["gold"], r["rouge1"], r["rougeL"], r["abs_error"])
            sep = b"" if first[m] else b", "
            first[m] = False
            out[m].write(sep + json.dumps({"id": r["query_id"], "output": r["output"] or ""}).encode())
        for m in modes:
            out[m].write(b"]}\n")
    by_mode: dict[str, Any] = {}
    for m in modes:
        t = tot[m]
        secs = t["engine_seconds"]
        by_mode[m] = {
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
            "at_length_cap": t["at_length_cap"],
        }
    statuses: dict[str, int] = {}
    for m in modes:
        for k, v in tot[m]["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    counts = {
        "generation_rows": sum(t["queries"] for t in tot.values()),
        "generation_rows_by_status": statuses,
        "queries_generated": max((t["queries"] for t in tot.values()), default=0),
    }
    scores = {
        "task": task_name,
        "metric": task.metric,
        "keys": list(metrics.OFFICIAL_KEYS[task.metric]),
        "modes": by_mode,
    }
    reason = metrics.unscored_reason(by_mode)
    if reason:
        scores["not_scored"] = reason
    return scores, counts
