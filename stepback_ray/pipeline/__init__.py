"""The batch job as Ray Data passes, joined by user through the run's profile files.

The files follow the passes:

- :mod:`.schemas`: the rows the stages hand each other and commit;
- :mod:`.chunks`: what a chunk holds (users or queries of one shard) and where its profiles live;
- :mod:`.profile_pass`, :mod:`.embed_pass`, :mod:`.generation_pass`: each pass's stages, and the pass declared
  as data (a :class:`~.runner.PassSpec`: stage classes, CPU pool / engine pool / commit);
- :mod:`.runner`: the one runner that executes any pass, on Ray Data or in this process;
- :mod:`.commit`: whole chunks written atomically, exactly once per row, and what a rerun still has to do;
- :mod:`.manifest` and :mod:`.job`: the driver (``run_job``, ``run_profile_job``), metrics and the manifest.

A *chunk* (the users of one shard, see :mod:`stepback_ray.data.rows`) is one Ray Data block from start to end:
every stage maps a whole block to a whole block, so the commit stage writes each chunk as one file, atomically,
and checks that no row is missing. A rerun with the same ``run_id`` skips committed chunks. Engines are built
inside their actors from the job spec; CPU stages load only the tokenizer (and the retriever or encoder).
"""

from stepback_ray.pipeline.chunks import ProfilesAt
from stepback_ray.pipeline.job import PASSES, RunResult, prepare_work, run_job, run_profile_job, run_user_passes
from stepback_ray.pipeline.manifest import check_resume, summarize
from stepback_ray.pipeline.runner import Executor, PassSpec, Stage, executor, init_local_ray, ray_session
from stepback_ray.pipeline.schemas import row_key

__all__ = [
    "PASSES",
    "Executor",
    "PassSpec",
    "ProfilesAt",
    "RunResult",
    "Stage",
    "check_resume",
    "executor",
    "init_local_ray",
    "prepare_work",
    "ray_session",
    "row_key",
    "run_job",
    "run_profile_job",
    "run_user_passes",
    "summarize",
]
