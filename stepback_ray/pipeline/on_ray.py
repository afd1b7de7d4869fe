"""Running a pass on Ray Data (``executor: ray``), and the run's Ray session.

The chunks become one Ray Data block each; a CPU stage is an actor pool (it holds a tokenizer, a retriever or an
encoder), the engine stage runs in the run's engine actors, started once and kept across its passes
(:mod:`.engine_host`; with ``ray.keep_engines: false`` each pass's own actor pool), which restart after a fatal
engine failure (:mod:`stepback_ray.engines.guard`), and a commit stage is Ray tasks. Every stage maps a whole block
(``batch_size=None``) to a whole block, so each chunk reaches its commit whole.

This module imports Ray; the executor imports it only for a run that uses Ray.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import ray
import ray.data
import ray.exceptions
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from stepback_ray.config import JobSpec
from stepback_ray.errors import RunFailed
from stepback_ray.pipeline.console import LOG_FILE, ray_output_to_log
from stepback_ray.pipeline.engine_host import EngineHosts, first_blocks, serve_on_host
from stepback_ray.pipeline.engine_stage import serves_side_by_side
from stepback_ray.pipeline.resources import WORKER_ENV, connect_cluster, engine_resources
from stepback_ray.pipeline.stages import OnCommit, PassSpec, stage_kwargs, stage_resources


def run_on_ray(
    job: JobSpec,
    spec: PassSpec,
    chunks: list[dict[str, Any]],
    at: Any,
    hosts: EngineHosts | None = None,
    on_commit: OnCommit | None = None,
) -> list[dict]:
    """Run ``spec`` over ``chunks`` as one Ray Data pass; returns the commit summaries (each handed to
    ``on_commit`` as it arrives). ``hosts``: the run's engine actors kept across passes (:mod:`.engine_host`),
    which serve the engine stage; None: the pass starts its own engine actor pool."""
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    for stage in spec.stages:
        if stage.kind == "engine" and hosts is not None:
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
                fn_constructor_kwargs=stage_kwargs(job, stage, at),
                compute=ActorPoolStrategy(size=r.concurrency or job.ray.cpu_stage_actors),
                num_cpus=r.num_cpus,
                **common,
            )
        else:
            r = stage_resources(job, stage)
            ds = ds.map_batches(
                stage.udf,
                fn_kwargs=stage_kwargs(job, stage, at),
                num_cpus=r.num_cpus,
                **({"concurrency": r.concurrency} if r.concurrency else {}),
                **common,
            )
    return take_all(ds, job, spec.name, hosts, on_commit)


def engine_compute(job: JobSpec, actors: int):
    """The engine stage's actor pool: ``actors`` actors, each sent ``ray.engine_tasks_in_flight`` blocks at once;
    with ``ray.engine_coalesce`` an actor serves those blocks side by side in threads (their engine calls merged
    by :class:`~stepback_ray.engines.coalesce.CoalescedCalls`), else one after another."""
    in_flight = job.ray.engine_tasks_in_flight
    side_by_side = (
        dict(max_concurrent_calls_per_actor=in_flight, enable_true_multi_threading=True)
        if serves_side_by_side(job)
        else {}
    )
    return ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=in_flight, **side_by_side)


def take_all(
    ds, job: JobSpec, name: str, hosts: EngineHosts | None = None, on_commit: OnCommit | None = None
) -> list[dict]:
    """Run the pass, each commit summary handed to ``on_commit`` as it arrives; an engine actor that died past its
    restarts fails the run (exit 3) in one line. A pass's own engine actor's death reaches here as the exception; a
    host's reaches the task that waited on it, whose error arrives as text, so on a failure the hosts are asked
    whether they are still there."""
    try:
        rows = []
        for row in ds.iter_rows():
            rows.append(row)
            if on_commit is not None:
                on_commit(row)
        return rows
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
                f"fatal engine failure' lines in the run's {LOG_FILE}, or on the console with --verbose); "
                "committed chunks are kept: fix the engine and rerun the same run id"
            ) from e
        raise


def init_local_ray(object_store_gib: float | None = None, **kwargs: Any) -> None:
    """Start a local Ray (no cluster) sized for the pipeline.

    A pass runs two actor pools and a task stage at once, and two passes follow each other. Ray starts at most
    ``num_workers_soft_limit`` worker processes without delay (by default one per CPU); on a small machine the
    third process of a pass then waits seconds for a slot. Raising the limit costs nothing (logical CPUs, and so
    scheduling, stay as they are) and takes seconds off every pass. The workers get :data:`WORKER_ENV`."""
    limit = max(8, 2 * (kwargs.get("num_cpus") or os.cpu_count() or 1))
    if object_store_gib:
        kwargs["object_store_memory"] = int(object_store_gib * 2**30)
    ray.init(
        address="local",  # a new local Ray, never a cluster someone started on this machine (`ray start --head`)
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"env_vars": dict(WORKER_ENV)},
        _system_config={"num_workers_soft_limit": limit},
        **kwargs,
    )


@contextlib.contextmanager
def ray_session(job: JobSpec, quiet: bool = False) -> Iterator[None]:
    """Connect to the job's Ray cluster, or start a local one and shut it down afterwards. A session this opens
    sends Ray's output to the run's log file when ``quiet`` (:func:`~.console.ray_output_to_log`); one already open
    (a test's, a benchmark's) is used as it is."""
    with contextlib.ExitStack() as output:
        if quiet and not ray.is_initialized():
            output.enter_context(ray_output_to_log(job))
        with _session(job):
            yield


@contextlib.contextmanager
def _session(job: JobSpec) -> Iterator[None]:
    started = False
    if not ray.is_initialized():
        on_sigterm = signal.getsignal(signal.SIGTERM)
        if job.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster (Ray Jobs set RAY_ADDRESS)
            connect_cluster(job.ray.address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        else:
            init_local_ray(job.ray.object_store_gib)
        started = True
        # ray.init sets its own SIGTERM handler (sys.exit(15) wherever the driver is, and a stack dump); the one
        # the command set (cli: SIGTERM ends a run as Ctrl-C does, one line, resumable) is put back
        if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    DataContext.get_current().enable_progress_bars = job.ray.progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()
