"""Engine actors kept for a whole run (``ray.keep_engines``, the default on Ray).

Ray Data starts an actor pool per dataset, so a run whose profile and generation passes each had their own engine
stage started every engine twice: a new process, the ML imports and the model load again for the second pass
(for vLLM also its compilation and KV-cache allocation, the longest part of its start), after the first
pass's engine had gone. Here the driver starts the run's engine actors (:class:`EngineHost`) once, with the
resources the engine stage asks for, and each pass's engine stage is a light Ray Data task that hands its block to
one of them (:func:`serve_on_host`) and waits.

Inside the host the pass's engine stage (:class:`~.engine_stage.EngineStage`) is built once per pass around the host's
engine, so what an engine stage does holds as in a pass's own actor: the blocks in flight are served side by side
in threads and their engine calls merged (``ray.engine_coalesce``), a bad prompt becomes one error row, and a fatal
failure or a call hung past ``engine.call_timeout_s`` ends the host's process. Ray then restarts the host (a new
engine) and retries the blocks it held (``max_task_retries``); ``engine.max_restarts`` counts for the run, not per
pass. Past it the block's task fails with the actor's death and the pass fails as before (exit 3, committed chunks
kept).

A pass whose engine config or engine resources differ from the hosts' (a variant job) gets new hosts; the old ones
are ended first, so a run never holds two sets of engines (and GPUs).
"""

from __future__ import annotations

import threading
import time
import zlib
from typing import Any

import pyarrow as pa
import ray
import ray.exceptions

from stepback_ray.config import JobSpec
from stepback_ray.engines import build_engine
from stepback_ray.pipeline.engine_stage import EngineStage, serves_side_by_side
from stepback_ray.pipeline.resources import engine_resources

CLOSE_TIMEOUT_S = 60.0
"""How long the driver waits for a host to release its engine at the end of the run before it kills it."""


class EngineHost:
    """A Ray actor holding one engine for the run; serves the engine stage of every pass that uses its config."""

    def __init__(self, job: JobSpec):
        started = time.time()
        self.engine = build_engine(job.engine)
        #: when the engine started to build and was ready, handed to the first pass's stage (its first block
        #: reports them; a later pass reports none: it started no engine)
        self._times: tuple[float, float] | None = (started, time.time())
        self._stage: tuple[str, EngineStage] | None = None
        self._lock = threading.Lock()

    def serve(
        self, pass_key: str, stage_cls: type[EngineStage], job: JobSpec, batch: pa.Table, first_blocks: int = 1
    ) -> pa.Table:
        """One block of the pass ``pass_key``, through that pass's engine stage (built on its first block).
        ``first_blocks``: how many blocks the pass sends this host at its start; its first engine call waits
        briefly for them (:meth:`~stepback_ray.engines.coalesce.CoalescedCalls.expect`), so they share a batch."""
        with self._lock:
            if self._stage is None or self._stage[0] != pass_key:
                times, self._times = self._times, None
                stage = stage_cls(job, engine=self.engine, engine_times=times, in_actor=True)
                stage.calls.expect(first_blocks)
                self._stage = (pass_key, stage)
            stage = self._stage[1]
        return stage(batch)

    def alive(self) -> bool:
        """Answers while the host lives (in its own thread: not queued behind blocks being served)."""
        return True

    def close(self) -> None:
        """Release the engine (model memory, vLLM's workers) before the actor is killed."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()


def host_key(job: JobSpec) -> str:
    """What makes two passes' engines the same: the engine config and the engine actors' resources."""
    r = job.ray
    return job.engine.model_dump_json() + repr(
        (
            r.engine_actors,
            r.engine_actor_cpus,
            r.engine_actor_gpus,
            r.accelerator_type,
            r.engine_tasks_in_flight,
            r.engine_coalesce,
        )
    )


class EngineHosts:
    """The driver's handle on the run's engine hosts: started for the first pass that needs an engine, kept while
    the passes' engines are the same (:func:`host_key`), ended by :meth:`close` with the run."""

    def __init__(self) -> None:
        self.actors: list[Any] = []
        self._key: str | None = None

    def for_job(self, job: JobSpec) -> list[Any]:
        key = host_key(job)
        if key != self._key:
            self.close()
            res = engine_resources(job, ray.cluster_resources())
            options = {
                **res.actor_options(),
                "max_restarts": job.engine.max_restarts,
                "max_task_retries": -1,
                "max_concurrency": job.ray.engine_tasks_in_flight if serves_side_by_side(job) else 1,
            }
            host = ray.remote(concurrency_groups={"control": 1})(EngineHost)
            self.actors = [host.options(**options).remote(job) for _ in range(res.actors)]
            self._key = key
        return self.actors

    def any_dead(self, timeout_s: float = 30.0) -> bool:
        """Whether a host died for good (past its restarts): a failed pass asks, to tell an engine that is gone
        from any other failure."""
        for a in self.actors:
            try:
                ray.get(a.alive.options(concurrency_group="control").remote(), timeout=timeout_s)
            except ray.exceptions.RayActorError:
                return True
            except ray.exceptions.GetTimeoutError:
                continue  # restarting, or busy: not dead for good
        return False

    def close(self) -> None:
        """Let each host release its engine (bounded wait; a dead one is skipped), then end it."""
        actors, self.actors, self._key = self.actors, [], None
        if not actors:
            return
        try:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=CLOSE_TIMEOUT_S)
        finally:
            for a in actors:
                ray.kill(a)


def pick_host(batch: pa.Table, hosts: int) -> int:
    """The host of a block: a stable hash of its chunk id, so blocks spread over the hosts without a coordinator."""
    if hosts == 1 or "chunk_id" not in batch.column_names or batch.num_rows == 0:
        return 0
    return zlib.crc32(str(batch.column("chunk_id")[0].as_py()).encode()) % hosts


def first_blocks(job: JobSpec, chunks: int, hosts: int) -> int:
    """How many blocks a pass of ``chunks`` sends each of ``hosts`` at its start: as many as it keeps in flight."""
    return min(job.ray.engine_tasks_in_flight, -(-chunks // hosts))


def serve_on_host(
    batch: pa.Table, hosts: list[Any], pass_key: str, stage_cls: type[EngineStage], job: JobSpec, first_blocks: int = 1
) -> pa.Table:
    """The engine stage of a pass as a Ray Data task: the block served by one of the run's hosts. A host that dies
    is restarted and the call retried by Ray; one dead past its restarts raises its death here (the pass fails)."""
    host = hosts[pick_host(batch, len(hosts))]
    return ray.get(host.serve.remote(pass_key, stage_cls, job, batch, first_blocks))
