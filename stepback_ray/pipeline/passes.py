"""The passes a job is made of, in the order they run: each declared in its own module as a
:class:`~stepback_ray.pipeline.stages.PassSpec`. A new pass is a new entry here, not a branch in the driver."""

from __future__ import annotations

from stepback_ray.config import JobSpec
from stepback_ray.errors import ConfigError
from stepback_ray.pipeline.embed_pass import EMBEDDING_PASS
from stepback_ray.pipeline.generation_pass import GENERATION_PASS
from stepback_ray.pipeline.profile_pass import PROFILE_PASS
from stepback_ray.pipeline.stages import Command, PassSpec

PASSES: tuple[PassSpec, ...] = (PROFILE_PASS, EMBEDDING_PASS, GENERATION_PASS)
"""Every pass, per-user passes first (they commit the profiles the per-query passes read)."""


def passes_for(job: JobSpec, command: Command, over: str) -> list[PassSpec]:
    """The declared passes over ``over`` (``users`` or ``queries``) that ``command`` needs for ``job``, in order."""
    return [p for p in PASSES if p.over == over and p.needed(job, command)]


def pass_named(name: str) -> PassSpec:
    return next(p for p in PASSES if p.name == name)


def check_stage_settings(job: JobSpec) -> None:
    """Every ``ray.stages.<name>`` of the job names a declared CPU or commit stage (a typo is one line, before the
    run creates anything)."""
    names = [s.name for p in PASSES for s in p.stages if s.kind != "engine"]
    for name in job.ray.stages:
        if name not in names:
            raise ConfigError(
                f"ray.stages.{name}: no such stage (the CPU and commit stages are: {', '.join(names)}; "
                "the engine stages use the ray.engine_* keys)"
            )
