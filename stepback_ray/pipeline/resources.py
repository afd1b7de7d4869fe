"""What the engine actors ask Ray for: GPUs per actor, placement groups for tensor parallelism, pool size.

Plain data, computed from the job spec and the cluster's resources, so it can be checked without a GPU:

- one engine actor per GPU by default (``engine_actor_gpus: 1``), optionally pinned to an accelerator type;
- a tensor-parallel engine (``engine.vllm.tensor_parallel_size: N``) lives in a placement group of N bundles of
  one GPU each; the actor itself asks for no GPU and vLLM's workers are placed in the group's bundles;
- ``engine_actors: auto`` sizes the pool to the cluster: every GPU in use (GPUs // GPUs per engine), or one
  actor on a CPU-only cluster;
- every worker gets :data:`WORKER_ENV` (local runs and submitted jobs alike).

Connecting to a cluster (:func:`connect_cluster`) checks an explicit ``host:port`` first: Ray itself retries an
address where nothing listens for minutes ("Failed to connect to GCS") before it gives up.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.errors import ClusterError

# Arrow's default allocator (jemalloc/mimalloc) keeps what a task freed for reuse inside the worker, so the
# worker that read and staged a large input file holds that peak for the rest of the job; the system allocator
# hands it back: after staging a large input the workers are much smaller, at the same speed.
WORKER_ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


@dataclass
class EngineResources:
    actors: int
    num_cpus: float
    num_gpus: float
    accelerator_type: str | None = None
    bundles: list[dict[str, float]] = field(default_factory=list)
    """Placement-group bundles per actor (empty: no placement group)."""

    def remote_args(self) -> dict[str, Any]:
        """Keyword arguments for ``map_batches`` (besides ``compute``)."""
        args: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus and not self.bundles:
            # Ray Data refuses num_gpus without a batch_size, and the pipeline's batches are whole blocks
            # (batch_size None: one chunk, never split across two commits), so each actor asks for its GPU itself
            args["ray_remote_args_fn"] = gpu_args(self.num_gpus)
        if self.accelerator_type:
            args["accelerator_type"] = self.accelerator_type
        if self.bundles:
            args["ray_remote_args_fn"] = placement_group_args(self.bundles)
        return args

    def actor_options(self) -> dict[str, Any]:
        """The same resources as options of a plain actor (``ray.remote(cls).options(...)``): an engine host. What
        ``map_batches`` asks each new actor for through ``ray_remote_args_fn`` is asked for here once."""
        opts = self.remote_args()
        per_actor = opts.pop("ray_remote_args_fn", None)
        return {**opts, **(per_actor() if per_actor else {})}


def gpus_per_engine(job: JobSpec) -> float:
    """GPUs one engine holds: its tensor-parallel bundles, else the actor's own share (0.5: two per GPU)."""
    tp = job.engine.vllm.tensor_parallel_size if job.engine.kind == "vllm" else 1
    return float(tp) if tp > 1 else job.ray.engine_actor_gpus


def engine_resources(job: JobSpec, cluster: dict[str, float] | None = None) -> EngineResources:
    """The engine actor pool for ``job`` on a cluster with resources ``cluster`` (``ray.cluster_resources()``)."""
    tp = job.engine.vllm.tensor_parallel_size if job.engine.kind == "vllm" else 1
    per_engine = gpus_per_engine(job)
    if job.ray.engine_actors == "auto":
        gpus = (cluster or {}).get("GPU", 0)
        actors = max(1, int(gpus // per_engine)) if per_engine else 1
    else:
        actors = int(job.ray.engine_actors)
    if tp > 1:
        bundles = []
        for i in range(tp):
            b: dict[str, float] = {"GPU": 1.0, "CPU": max(1.0, job.ray.engine_actor_cpus) if i == 0 else 1.0}
            if job.ray.accelerator_type:
                b[f"accelerator_type:{job.ray.accelerator_type}"] = 0.001
            bundles.append(b)
        return EngineResources(actors, job.ray.engine_actor_cpus, 0.0, None, bundles)
    return EngineResources(actors, job.ray.engine_actor_cpus, job.ray.engine_actor_gpus, job.ray.accelerator_type)


def gpu_args(num_gpus: float) -> Callable[[], dict[str, Any]]:
    """A ``ray_remote_args_fn``: each new engine actor asks for ``num_gpus`` GPUs."""

    def make() -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    return make


def placement_group_args(bundles: list[dict[str, float]]) -> Callable[[], dict[str, Any]]:
    """A ``ray_remote_args_fn``: each new engine actor gets its own placement group (PACK: one node if possible),
    and the tasks and actors it starts (vLLM's tensor-parallel workers) are placed inside it."""

    def make() -> dict[str, Any]:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group(bundles, strategy="PACK")
        return {
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True
            )
        }

    return make


CONNECT_TIMEOUT_S = 3.0
"""How long the address check waits for a TCP connection (a reachable head answers in milliseconds)."""


def address_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) of an explicit cluster address (``host:port``, ``ray://host:port``); None for the addresses
    Ray resolves itself (``auto``, ``local``) or one it would not take (it then says why)."""
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme not in ("", "ray"):
        return None
    host, sep, port = rest.split("/", 1)[0].rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, with one line, when nothing accepts a TCP connection at an explicit ``host:port``."""
    target = address_host_port(address)
    if target is None:
        return
    try:
        socket.create_connection(target, timeout=timeout).close()
    except OSError as e:
        raise ClusterError(
            f"ray.address {address!r}: no Ray cluster reachable at {target[0]}:{target[1]} "
            f"({e.strerror or type(e).__name__}); check the address, or start the cluster "
            "(`ray start --head`)"
        ) from None


def connect_cluster(address: str | None, **init_kwargs: Any) -> None:
    """``ray.init`` on the cluster at ``address`` (None: Ray Jobs' ``RAY_ADDRESS``), after :func:`check_reachable`;
    a connection Ray refuses (a cluster that needs a token, a version mismatch it reports as such) is one line."""
    import ray

    effective = address or os.environ.get("RAY_ADDRESS")
    if effective:
        check_reachable(effective)
    try:
        ray.init(address=address, **init_kwargs)
    except ConnectionError as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ClusterError(f"ray.address {effective!r}: cannot connect to the Ray cluster: {detail}") from None
