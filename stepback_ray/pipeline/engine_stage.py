"""The base of the passes' engine stages (:class:`EngineStage`): the engine, the guarded and merged calls, and
the stamps (engine start times, process usage) that the commit summaries carry to the job's timings. The same
stage runs in a pass's own engine actors, in the run's engine hosts (:mod:`.engine_host`) and in process.
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from typing import Any

import psutil
import pyarrow as pa

from stepback_ray.config import JobSpec
from stepback_ray.engines import build_engine
from stepback_ray.engines.coalesce import GATHER_S, CoalescedCalls
from stepback_ray.engines.guard import EngineCalls
from stepback_ray.engines.prefix import PrefixOrdered


def process_usage(children: bool = False) -> tuple[float, int]:
    """This process's CPU seconds (user and system, every thread) and involuntary context switches: the times the
    OS took a core from one of its threads to run something else. An engine whose threads fill every core loses
    more than the taken slice each time (its other threads wait for the preempted one at the next barrier), so
    switches per CPU second say whether it shared its cores: an engine alone in its process is rarely switched
    out, while one in a local Ray's actor on a node its threads fill is switched out far more often, every Ray
    process waking many times a second.

    ``children``: add the live child processes' counts. An engine actor's children are its engine's (vLLM runs its
    engine core in one, where the work is); a driver's would be Ray's own, so only an actor asks."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu, switches = ru.ru_utime + ru.ru_stime, ru.ru_nivcsw
    if children:
        for child in psutil.Process().children(recursive=True):
            try:
                times, ctx = child.cpu_times(), child.num_ctx_switches()
            except psutil.Error:  # ended in between
                continue
            cpu, switches = cpu + times.user + times.system, switches + ctx.involuntary
    return cpu, switches


def serves_side_by_side(job: JobSpec) -> bool:
    """Whether an engine actor serves its blocks in flight side by side (``ray.engine_coalesce`` and more than one
    block in flight)."""
    return job.ray.engine_coalesce and job.ray.engine_tasks_in_flight > 1


class EngineStage:
    """Base of the engine stages: the engine, built here from the job spec (in an actor), or given (the
    in-process executor's, closed by its owner); the guarded call (:class:`~stepback_ray.engines.guard.EngineCalls`);
    and the engine released when the stage goes (Ray Data drops the UDF when its actor exits gracefully).

    A subclass implements :meth:`serve` (one block). On Ray with ``ray.engine_coalesce`` the actor serves its
    blocks in flight side by side in threads, and their engine calls are merged
    (:class:`~stepback_ray.engines.coalesce.CoalescedCalls`): ``serve`` must keep its state in locals."""

    def __init__(
        self,
        job: JobSpec,
        engine: Any = None,
        engine_times: tuple[float, float] | None = None,
        in_actor: bool | None = None,
    ):
        """``in_actor``: this process is an engine actor's, so a fatal engine failure ends it (Ray restarts it) and
        the blocks it serves side by side share engine calls; by default, when the stage builds its engine (a Ray
        Data engine actor). An engine host (:mod:`.engine_host`) gives its engine and says True."""
        self.job = job
        self.owns_engine = engine is None
        started = time.time()
        self.engine = engine or build_engine(job.engine)
        self.in_actor = self.owns_engine if in_actor is None else in_actor
        #: when this stage's engine started to build and was ready (epoch seconds), reported once, on the first
        #: block; for an engine it was given, the times its giver passes (the in-process executor's, for the pass
        #: that built it; none for a later pass that reuses it)
        self.engine_times: tuple[float, float] | None = (started, time.time()) if self.owns_engine else engine_times
        #: this process and its usage when the stage's engine was ready: each block reports the usage since
        self._process = f"{socket.gethostname()}:{os.getpid()}"
        self._usage_at_ready = process_usage(children=self.in_actor)
        self._stamp_lock = threading.Lock()
        generate = EngineCalls(self.engine, job.engine.call_timeout_s, in_actor=self.in_actor)
        if job.engine.prefix_order:  # prompts that share a prefix sent side by side (the prefix cache reuses it)
            generate = PrefixOrdered(generate)
        # an actor serving blocks side by side (engine_compute) gathers their calls; in process they come one by one
        gather = self.in_actor and serves_side_by_side(job)
        self.generate = self.calls = CoalescedCalls(generate, gather_s=GATHER_S if gather else 0.0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.calls.serving():
            return self.serve(batch)

    def serve(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def stamp(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Mark the first block this stage serves with its engine's start times (``engine_started_at``,
        ``engine_ready_at``), and every block with its engine's process (``engine_process``, host:pid) and that
        process's usage since the engine was ready, in an actor with its children's (:func:`process_usage`:
        ``engine_cpu_s``, ``engine_preemptions``, cumulative); the commit summaries carry them to the job's
        timings."""
        with self._stamp_lock:
            times, self.engine_times = self.engine_times, None
        cpu, switches = process_usage(children=self.in_actor)
        usage = {
            "engine_process": self._process,
            "engine_cpu_s": round(cpu - self._usage_at_ready[0], 3),
            "engine_preemptions": switches - self._usage_at_ready[1],
        }
        for r in rows:
            r.update(usage)
            if times is not None:
                r["engine_started_at"], r["engine_ready_at"] = times
        return rows

    def close(self) -> None:
        """Release the engine this stage built (model memory, vLLM's workers), once."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and getattr(self, "owns_engine", False):
            engine.close()

    def __del__(self):
        self.close()
