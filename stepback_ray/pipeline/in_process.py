"""Running a pass in this process (``executor: in-process``): the same stages as on Ray, built once per pass with
the same arguments, applied to one chunk after another; the engines are built once per run and closed at its end.
Small jobs, debugging and the fast tests run this way; the outputs are the same rows.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from stepback_ray.config import EngineConfig, JobSpec
from stepback_ray.engines import build_engine
from stepback_ray.engines.guard import FatalEngineError
from stepback_ray.errors import RunFailed
from stepback_ray.pipeline.stages import OnCommit, PassSpec, stage_kwargs


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
        key = config.model_dump_json()
        if key in self._engines:
            return self._engines[key], None
        started = time.time()
        self._engines[key] = build_engine(config)
        return self._engines[key], (started, time.time())

    def run(
        self,
        spec: PassSpec,
        chunks: list[dict[str, Any]],
        at: Any,
        job: JobSpec | None = None,
        on_commit: OnCommit | None = None,
    ) -> list[dict]:
        job = job or self.job
        built = []
        for stage in spec.stages:
            if stage.kind == "engine":
                engine, times = self.engine(job.engine)
                built.append(stage.udf(job=job, engine=engine, engine_times=times))
            elif stage.kind == "cpu":
                built.append(stage.udf(**stage_kwargs(job, stage, at)))
            else:
                kwargs = stage_kwargs(job, stage, at)
                built.append(lambda batch, _fn=stage.udf, _kw=kwargs: _fn(batch, **_kw))
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
            for summary in block.to_pylist():
                summaries.append(summary)
                if on_commit is not None:
                    on_commit(summary)
        return summaries

    def close(self) -> None:
        for key, engine in self._engines.items():
            if key not in self._borrowed:
                engine.close()
        self._engines.clear()
