"""What a pass is, as data: a :class:`PassSpec` is the one list of its :class:`Stage` declarations, with what it
runs over, where it commits and when a job needs it. The driver (:mod:`.job`) iterates the declared passes
(:data:`stepback_ray.pipeline.passes.PASSES`) and an executor (:mod:`.executors`) runs each one; neither names a
stage. A stage's Ray resources default to its declaration and are overridden by name under ``ray.stages``, so a
new stage is one declaration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from stepback_ray.config import JobSpec
from stepback_ray.pipeline.chunks import ProfilesAt

Command = Literal["run", "profile"]
"""``stepback run`` (every pass a job's modes need) or ``stepback profile`` (the nightly per-user passes)."""


OnCommit = Callable[[dict[str, Any]], None]
"""Called by an executor in the driver with each chunk's commit summary as it arrives."""


@dataclass(frozen=True)
class Stage:
    """One step of a pass. ``udf`` is built (a class: a CPU or engine stage) or called (a function: a commit stage)
    with ``job`` and, where ``takes_at``, the profiles' location ``at``; an engine stage's class is built with
    ``job`` alone (and, in process, the run's engine), and its resources are the ``ray.engine_*`` keys."""

    name: str
    """Its key under ``ray.stages`` (CPU and commit stages)."""
    udf: Any
    kind: Literal["cpu", "engine", "commit"]
    takes_at: bool = True
    num_cpus: float = 0.25
    """CPUs per actor (a CPU stage) or per task (a commit stage) unless ``ray.stages.<name>.num_cpus`` says
    otherwise. The light stages ask a quarter CPU so they never starve the engine actors of slots on small nodes."""
    concurrency: int | None = None
    """Actors of a CPU stage (None: ``ray.cpu_stage_actors``) or tasks at once of a commit stage (None: no limit),
    unless ``ray.stages.<name>.concurrency`` says otherwise."""


@dataclass(frozen=True)
class StageResources:
    """What one CPU or commit stage asks Ray for in a job: its declaration, overridden by ``ray.stages.<name>``."""

    num_cpus: float
    concurrency: int | None


@dataclass(frozen=True)
class PassSpec:
    """A pass: its stages in order, the last one a commit (which returns one summary row per chunk).

    ``over``: the work's chunks it maps, the users' (per-user passes, committed into the profiles' location, a
    store version when there is a store) or the queries'. ``commits_to``: the (root, folder) its commit stage
    writes chunk files to, so the driver knows what a rerun still has to do. ``needed``: whether a job run by a
    command needs the pass."""

    name: str
    stages: tuple[Stage, ...]
    over: Literal["users", "queries"]
    commits_to: Callable[[JobSpec, ProfilesAt], tuple[str, str]]
    needed: Callable[[JobSpec, Command], bool]

    def __post_init__(self):
        if not self.stages or self.stages[-1].kind != "commit":
            raise ValueError(f"pass {self.name!r} must end with a commit stage")

    @property
    def engine_stage(self) -> Stage | None:
        return next((s for s in self.stages if s.kind == "engine"), None)


def stage_resources(job: JobSpec, stage: Stage) -> StageResources:
    """The stage's resources in ``job``: its declaration with the job's ``ray.stages.<name>`` keys over it."""
    override = job.ray.stages.get(stage.name)
    return StageResources(
        num_cpus=override.num_cpus if override and override.num_cpus is not None else stage.num_cpus,
        concurrency=override.concurrency if override and override.concurrency is not None else stage.concurrency,
    )


def stage_kwargs(job: JobSpec, stage: Stage, at: Any) -> dict[str, Any]:
    """What a CPU stage is built with, or a commit stage called with."""
    return {"job": job, "at": at} if stage.takes_at else {"job": job}
