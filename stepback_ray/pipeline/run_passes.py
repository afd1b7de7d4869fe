"""Running declared passes one after another on an executor, with what each cost: its wall time
(``<pass>_pass_s``), and for a pass with an engine stage its engines' start costs and process usage, read from the
commit summaries' stamps."""

from __future__ import annotations

import time
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.pipeline.chunks import ProfilesAt
from stepback_ray.pipeline.commit import pending
from stepback_ray.pipeline.console import say
from stepback_ray.pipeline.executors import Executor
from stepback_ray.pipeline.progress import PassProgress
from stepback_ray.pipeline.stages import PassSpec


def run_passes(
    ex: Executor,
    job: JobSpec,
    passes: list[PassSpec],
    chunks: list[dict[str, Any]],
    at: ProfilesAt,
    walls: dict[str, float],
    details: dict[str, float | int],
) -> dict[str, list[dict[str, Any]]]:
    """Run ``passes`` in order over what each still has to do of ``chunks`` (a rerun skips committed chunks), each
    with its progress line on the console (:mod:`.progress`); returns each pass's commit summaries by name, and
    records each one's wall time in ``walls`` and its engines' costs in ``details``."""
    summaries: dict[str, list[dict[str, Any]]] = {}
    for spec in passes:
        t0 = time.time()
        todo = pending(*spec.commits_to(job, at), job, chunks)
        if todo:
            progress = PassProgress(spec.name, len(todo), "users" if spec.over == "users" else "rows")
            try:
                done = ex.run(spec, todo, at, on_commit=lambda summary, p=progress: p.chunk_done(summary["rows"]))
            finally:
                progress.finish()
        else:
            done = []
            if chunks:
                say(f"{spec.name} pass: all {len(chunks)} chunks already committed")
        walls[f"{spec.name}_pass_s"] = round(time.time() - t0, 3)
        if spec.engine_stage is not None:
            details.update(engine_start_times(spec.name, done, t0), **engine_usage(spec.name, done))
        summaries[spec.name] = done
    return summaries


def engine_start_times(name: str, summaries: list[dict[str, Any]], t0: float) -> dict[str, float | int]:
    """A pass's fixed engine costs from its commit summaries' stamps (:meth:`~.engine_stage.EngineStage.stamp`):
    how many engines started, the seconds from the pass's start until the first was ready (scheduling, actor start,
    model load), and the longest model load. Nothing when the pass started no engine (nothing to do, or the
    in-process executor's engine reused from the profile pass)."""
    stamps = [(s["engine_started_at"], s["engine_ready_at"]) for s in summaries if s.get("engine_ready_at") is not None]
    if not stamps:
        return {}
    return {
        f"{name}_engines_started": len(stamps),
        f"{name}_first_engine_ready_s": round(min(r for _, r in stamps) - t0, 3),
        f"{name}_model_load_s": round(max(r - s for s, r in stamps), 3),
    }


def engine_usage(name: str, summaries: list[dict[str, Any]]) -> dict[str, float | int]:
    """What a pass's engine processes used from their engines' start on (:func:`~.engine_stage.process_usage`), from
    its commit summaries: CPU seconds and involuntary context switches, each process's latest (largest) count, summed
    over the processes. Many switches per CPU second mean the engine shared its cores (on a small node, with a
    local Ray's own processes): its engine time is then not the engine's alone."""
    latest: dict[str, tuple[float, int]] = {}
    for s in summaries:
        if s.get("engine_process") is None:
            continue
        cpu, switches = latest.get(s["engine_process"], (0.0, 0))
        latest[s["engine_process"]] = (max(cpu, s["engine_cpu_s"]), max(switches, s["engine_preemptions"]))
    if not latest:
        return {}
    return {
        f"{name}_engine_cpu_s": round(sum(c for c, _ in latest.values()), 3),
        f"{name}_engine_preemptions": sum(n for _, n in latest.values()),
    }
