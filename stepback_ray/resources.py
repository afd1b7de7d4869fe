"""What the engine actors ask Ray for: GPUs per actor, placement groups for tensor parallelism, pool size.

Plain data, computed from the job spec and the cluster's resources, so it can be checked without a GPU:

- one engine actor per GPU by default (``engine_actor_gpus: 1``), optionally pinned to an accelerator type;
- a tensor-parallel engine (``engine.vllm.tensor_parallel_size: N``) lives in a placement group of N bundles of
  one GPU each; the actor itself asks for no GPU and vLLM's workers are placed in the group's bundles;
- ``engine_actors: auto`` sizes the pool to the cluster: every GPU in use (GPUs // GPUs per engine), or one
  actor on a CPU-only cluster;
- every worker gets :data:`WORKER_ENV` (local runs and submitted jobs alike).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .config import JobSpec

# Arrow's default allocator (jemalloc/mimalloc) keeps what a task freed for reuse inside the worker, so the
# worker that read and staged a large input file holds that peak for the rest of the job; the system allocator
# hands it back. Measured staging 100,000 users here: largest worker 2.9 -> 1.6 GiB, every process 4.6 -> 2.9 GiB
# (proportional set size), same speed.
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
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    return make
