"""What runs a job's passes (:func:`executor`): a Ray session, or the in-process executor, behind one
:class:`Executor` whose :meth:`~Executor.run` takes a declared pass and its chunks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from stepback_ray.config import JobSpec
from stepback_ray.pipeline.in_process import InProcess
from stepback_ray.pipeline.stages import OnCommit, PassSpec

if TYPE_CHECKING:
    from stepback_ray.pipeline.engine_host import EngineHosts


def ray_backend() -> ModuleType:
    """:mod:`.on_ray`, imported on first use: it imports Ray (slow to import), which a LaMP JSON run in process
    never needs."""
    from stepback_ray.pipeline import on_ray as module  # deferred: imports ray

    return module


@contextlib.contextmanager
def executor(job: JobSpec, engine: Any = None, quiet: bool = False, staging: bool = True) -> Iterator[Executor]:
    """What runs the job's passes: a Ray session, or the in-process executor (no Ray for LaMP JSON; a dataset
    input is staged by Ray Data, so a local Ray is started for the staging, and its passes run here), with
    ``engine`` if given (see :class:`InProcess`). ``quiet``: Ray's own output goes to the run's log file, not the
    console (:mod:`.console`). ``staging`` False: the work is in memory already (a plan's sample), so the
    in-process executor starts no Ray for a dataset either."""
    if job.executor == "in-process":
        local = InProcess(job, engine)
        try:
            staged = job.input.format != "lamp" and staging
            with ray_backend().ray_session(job, quiet) if staged else contextlib.nullcontext():
                yield Executor(job, local)
        finally:
            local.close()
    else:
        ray_run = ray_backend()
        with ray_run.ray_session(job, quiet):
            hosts = ray_run.EngineHosts() if job.ray.keep_engines else None
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

    def run(
        self,
        spec: PassSpec,
        chunks: list[dict[str, Any]],
        at: Any,
        job: JobSpec | None = None,
        on_commit: OnCommit | None = None,
    ) -> list[dict]:
        """Run one pass over ``chunks`` (nothing to do: no summaries); ``job``: a variant of the run's job (the
        quality gate's sample writes elsewhere, with its own modes); ``on_commit``: called in this process with
        each chunk's commit summary as it arrives (the pass's progress line)."""
        if not chunks:
            return []
        if self.local is not None:
            return self.local.run(spec, chunks, at, job, on_commit)
        return ray_backend().run_on_ray(job or self.job, spec, chunks, at, self.hosts, on_commit)
