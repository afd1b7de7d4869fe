"""The generic pass runner: a pass is declared as data (:class:`PassSpec`, a list of :class:`Stage`) in its own
module, and one runner executes any pass, on Ray Data or in this process.

**On Ray** (``executor: ray``): the chunks become one Ray Data block each; a CPU stage is an actor pool (it holds
a tokenizer, a retriever or an encoder), the engine stage runs in the run's engine actors, started once and kept
across its passes (:mod:`.engine_host`; with ``ray.keep_engines: false`` each pass's own actor pool), which
restart after a fatal engine failure (:mod:`stepback_ray.engines.guard`), and a commit stage is Ray tasks.
Every stage maps a whole block (``batch_size=None``) to a whole block, so each chunk reaches its commit whole.
**In process** (``executor: in-process``): the same stages, built once per pass with the same arguments, applied
to one chunk after another; the engines are built once per run and closed at its end (a dataset input is still
staged by Ray Data first). Small jobs, debugging and the fast tests run this way; the outputs are the same rows.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from stepback_ray.config import EngineConfig, JobSpec, StageResources
from stepback_ray.errors import RunFailed
from stepback_ray.pipeline.resources import WORKER_ENV, connect_cluster, engine_resources

if TYPE_CHECKING:
    from stepback_ray.pipeline.engine_host import EngineHosts


@dataclass(frozen=True)
class Stage:
    """One step of a pass. ``udf`` is built (a class) or called (a function) with ``job`` and, where ``takes_at``,
    the profiles' location ``at``; an engine stage's class is built with ``job`` alone (and, in process, the
    run's engine)."""

    name: str
    """Its key under ``ray.stages`` (CPU and commit stages)."""
    udf: Any
    kind: Literal["cpu", "engine", "commit"]
    takes_at: bool = True


@dataclass(frozen=True)
class PassSpec:
    """A pass: its stages in order, the last one a commit (which returns one summary row per chunk)."""

    name: str
    stages: tuple[Stage, ...]

    def __post_init__(self):
        if not self.stages or self.stages[-1].kind != "commit":
            raise ValueError(f"pass {self.name!r} must end with a commit stage")


def process_usage(children: bool = False) -> tuple[float, int]:
    """This process's CPU seconds (user and system, every thread) and involuntary context switches: the times the
    OS took a core from one of its threads to run something else. An engine whose threads fill every core loses
    more than the taken slice each time (its other threads wait for the preempted one at the next barrier), so
    switches per CPU second say whether it shared its cores: on the 2-core development VM an engine alone in its
    process had ~20 per CPU second, one in a local Ray's actor ~600, each of Ray's ~15 processes waking ~150 times
    a second (docs/benchmarks.md).

    ``children``: add the live child processes' counts. An engine actor's children are its engine's (vLLM runs its
    engine core in one, where the work is); a driver's would be Ray's own, so only an actor asks."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu, switches = ru.ru_utime + ru.ru_stime, ru.ru_nivcsw
    if children:
        import psutil

        for child in psutil.Process().children(recursive=True):
            try:
                times, ctx = child.cpu_times(), child.num_ctx_switches()
            except psutil.Error:  # ended in between
                continue
            cpu, switches = cpu + times.user + times.system, switches + ctx.involuntary
    return cpu, switches


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
        import threading

        from stepback_ray.engines import build_engine
        from stepback_ray.engines.coalesce import GATHER_S, CoalescedCalls
        from stepback_ray.engines.guard import EngineCalls
        from stepback_ray.engines.prefix import PrefixOrdered

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


def stage_resources(job: JobSpec, stage: Stage) -> StageResources:
    return getattr(job.ray.stages, stage.name)


def _kwargs(job: JobSpec, stage: Stage, at: Any) -> dict[str, Any]:
    return {"job": job, "at": at} if stage.takes_at else {"job": job}


# ------------------------------------------------------------------------------------------------ on Ray
def run_on_ray(
    job: JobSpec, spec: PassSpec, chunks: list[dict[str, Any]], at: Any, hosts: EngineHosts | None = None
) -> list[dict]:
    """Run ``spec`` over ``chunks`` as one Ray Data pass; returns the commit summaries. ``hosts``: the run's engine
    actors kept across passes (:mod:`.engine_host`), which serve the engine stage; None: the pass starts its own
    engine actor pool."""
    import uuid

    import ray
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    for stage in spec.stages:
        if stage.kind == "engine" and hosts is not None:
            from stepback_ray.pipeline.engine_host import first_blocks, serve_on_host

            actors = hosts.for_job(job)
            served_by = {
                "hosts": actors,
                "pass_key": uuid.uuid4().hex,
                "stage_cls": stage.udf,
                "job": job,
                "first_blocks": first_blocks(job, len(chunks), len(actors)),
            }
            # a task per block that waits on a host: no CPU of its own, as many in flight as the hosts take
            in_flight = TaskPoolStrategy(size=min(len(chunks), len(actors) * job.ray.engine_tasks_in_flight))
            ds = ds.map_batches(serve_on_host, fn_kwargs=served_by, num_cpus=0, compute=in_flight, **common)
        elif stage.kind == "engine":
            res = engine_resources(job, ray.cluster_resources())
            # a fatal engine failure ends the actor (engines/guard.py): Ray restarts it, boundedly, and retries
            # the block
            ds = ds.map_batches(
                stage.udf,
                fn_constructor_kwargs={"job": job},
                compute=engine_compute(job, res.actors),
                max_restarts=job.engine.max_restarts,
                max_task_retries=-1,
                **res.remote_args(),
                **common,
            )
        elif stage.kind == "cpu":
            r = stage_resources(job, stage)
            ds = ds.map_batches(
                stage.udf,
                fn_constructor_kwargs=_kwargs(job, stage, at),
                compute=ActorPoolStrategy(size=r.concurrency or job.ray.cpu_stage_actors),
                num_cpus=r.num_cpus,
                **common,
            )
        else:
            r = stage_resources(job, stage)
            ds = ds.map_batches(
                stage.udf,
                fn_kwargs=_kwargs(job, stage, at),
                num_cpus=r.num_cpus,
                **({"concurrency": r.concurrency} if r.concurrency else {}),
                **common,
            )
    return _take_all(ds, job, spec.name, hosts)


def engine_compute(job: JobSpec, actors: int):
    """The engine stage's actor pool: ``actors`` actors, each sent ``ray.engine_tasks_in_flight`` blocks at once;
    with ``ray.engine_coalesce`` an actor serves those blocks side by side in threads (their engine calls merged
    by :class:`~stepback_ray.engines.coalesce.CoalescedCalls`), else one after another."""
    from ray.data import ActorPoolStrategy

    in_flight = job.ray.engine_tasks_in_flight
    side_by_side = (
        dict(max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True)
        if serves_side_by_side(job)
        else {}
    )
    return ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight, **side_by_side)


def serves_side_by_side(job: JobSpec) -> bool:
    """Whether an engine actor serves its blocks in flight side by side (``ray.engine_coalesce`` and more than one
    block in flight)."""
    return job.ray.engine_coalesce and job.ray.engine_tasks_in_flight > 1


def _take_all(ds, job: JobSpec, name: str, hosts: EngineHosts | None = None) -> list[dict]:
    """Run the pass; an engine actor that died past its restarts fails the run (exit 3) in one line. A pass's own
    engine actor's death reaches here as the exception; a host's reaches the task that waited on it, whose error
    arrives as text, so on a failure the hosts are asked whether they are still there."""
    import ray.exceptions

    try:
        return ds.take_all()
    except Exception as e:
        seen, cause, dead = set(), e, False
        while cause is not None and id(cause) not in seen and not dead:
            seen.add(id(cause))
            dead = isinstance(cause, ray.exceptions.RayActorError)
            cause = cause.__cause__ or cause.__context__
        if dead or (hosts is not None and hosts.any_dead()):
            raise RunFailed(
                f"the {name} pass's engine actor died {job.engine.max_restarts + 1} times "
                f"(engine.max_restarts = {job.engine.max_restarts}; the reasons are the 'stepback: "
                "fatal engine failure' lines in the log); committed chunks are kept: fix the engine "
                "and rerun the same run id"
            ) from e
        raise


def init_local_ray(object_store_gib: float | None = None, **kwargs: Any) -> None:
    """Start a local Ray (no cluster) sized for the pipeline.

    A pass runs two actor pools and a task stage at once, and two passes follow each other. Ray starts at most
    ``num_workers_soft_limit`` worker processes without delay (by default one per CPU); on a small machine the
    third process of a pass then waits seconds for a slot. Raising the limit costs nothing (logical CPUs, and so
    scheduling, stay as they are) and takes seconds off every pass. The workers get :data:`WORKER_ENV`."""
    import ray

    limit = max(8, 2 * (kwargs.get("num_cpus") or os.cpu_count() or 1))
    if object_store_gib:
        kwargs["object_store_memory"] = int(object_store_gib * 2**30)
    ray.init(
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": dict(WORKER_ENV)},
        _system_config={"num_workers_soft_limit": limit},
        **kwargs,
    )


@contextlib.contextmanager
def ray_session(job: JobSpec) -> Iterator[None]:
    """Connect to the job's Ray cluster, or start a local one and shut it down afterwards."""
    import ray

    started = False
    if not ray.is_initialized():
        if job.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster (Ray Jobs set RAY_ADDRESS)
            connect_cluster(job.ray.address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        else:
            init_local_ray(job.ray.object_store_gib)
        started = True
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = job.ray.progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ in process
class InProcess:
    """The in-process executor of one run: each pass's stages built once, applied chunk by chunk; one engine per
    engine config for the whole run (the profile and generation passes share it), closed by :meth:`close`."""

    def __init__(self, job: JobSpec, engine: Any = None):
        """``engine``: one the caller built for ``job.engine`` and keeps (reused across jobs, never closed here)."""
        self.job = job
        self._engines: dict[str, Any] = {}
        self._borrowed: set[str] = set()
        if engine is not None:
            key = job.engine.model_dump_json()
            self._engines[key] = engine
            self._borrowed.add(key)

    def engine(self, config: EngineConfig) -> tuple[Any, tuple[float, float] | None]:
        """The run's engine for ``config`` and when its build started and ended (None for one already built: a
        later pass reuses it and starts nothing)."""
        from stepback_ray.engines import build_engine

        key = config.model_dump_json()
        if key in self._engines:
            return self._engines[key], None
        started = time.time()
        self._engines[key] = build_engine(config)
        return self._engines[key], (started, time.time())

    def run(self, spec: PassSpec, chunks: list[dict[str, Any]], at: Any, job: JobSpec | None = None) -> list[dict]:
        job = job or self.job
        built = []
        for stage in spec.stages:
            if stage.kind == "engine":
                engine, times = self.engine(job.engine)
                built.append(stage.udf(job=job, engine=engine, engine_times=times))
            elif stage.kind == "cpu":
                built.append(stage.udf(**_kwargs(job, stage, at)))
            else:
                kwargs = _kwargs(job, stage, at)
                built.append(lambda batch, _fn=stage.udf, _kw=kwargs: _fn(batch, **_kw))
        from stepback_ray.engines.guard import FatalEngineError

        summaries: list[dict] = []
        for chunk in chunks:
            block = pa.Table.from_pylist([chunk])
            try:
                for fn in built:
                    block = fn(block)
            except FatalEngineError as e:  # no actor to restart here: the run stops, its committed chunks kept
                raise RunFailed(
                    f"the {spec.name} pass's engine failed ({e}); {len(summaries)} of {len(chunks)} "
                    "chunks of this pass were committed and are kept: fix the engine and rerun the "
                    "same run id"
                ) from None
            summaries += block.to_pylist()
        return summaries

    def close(self) -> None:
        for key, engine in self._engines.items():
            if key not in self._borrowed:
                engine.close()
        self._engines.clear()


@contextlib.contextmanager
def executor(job: JobSpec, engine: Any = None) -> Iterator[Executor]:
    """What runs the job's passes: a Ray session, or the in-process executor (no Ray for LaMP JSON; a dataset
    input is staged by Ray Data, so a local Ray is started for the staging, and its passes run here), with
    ``engine`` if given (see :class:`InProcess`)."""
    if job.executor == "in-process":
        local = InProcess(job, engine)
        try:
            with ray_session(job) if job.input.format != "lamp" else contextlib.nullcontext():
                yield Executor(job, local)
        finally:
            local.close()
    else:
        with ray_session(job):
            hosts = None
            if job.ray.keep_engines:
                from stepback_ray.pipeline.engine_host import EngineHosts

                hosts = EngineHosts()
            try:
                yield Executor(job, None, hosts)
            finally:
                if hosts is not None:
                    hosts.close()


@dataclass
class Executor:
    job: JobSpec
    local: InProcess | None
    hosts: EngineHosts | None = None
    """On Ray with ``ray.keep_engines``: the run's engine actors, kept across its passes."""

    @property
    def on_ray(self) -> bool:
        return self.local is None

    def run(self, spec: PassSpec, chunks: list[dict[str, Any]], at: Any, job: JobSpec | None = None) -> list[dict]:
        """Run one pass over ``chunks`` (nothing to do: no summaries); ``job``: a variant of the run's job (the
        quality gate's sample writes elsewhere, with its own modes)."""
        if not chunks:
            return []
        if self.local is not None:
            return self.local.run(spec, chunks, at, job)
        return run_on_ray(job or self.job, spec, chunks, at, self.hosts)
