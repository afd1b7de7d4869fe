"""The batch job as Ray Data passes, joined by user through the run's profile files. Orchestration only: what a
stage computes lives in the method packages (profiling, generation, pplug, evaluation) and the store.

The files follow the passes:

- :mod:`.stages`: a pass declared as data (:class:`~.stages.PassSpec`, its :class:`~.stages.Stage` list, what it
  runs over, where it commits, when a job needs it); :mod:`.passes` lists the declared passes in order;
- :mod:`.profile_pass`, :mod:`.embed_pass`, :mod:`.generation_pass`: each pass's stages and its declaration;
  :mod:`.engine_stage` the base of their engine stages;
- :mod:`.executors`: what runs a pass, on Ray Data (:mod:`.on_ray`, the run's kept engine actors in
  :mod:`.engine_host`, their resources in :mod:`.resources`) or in this process (:mod:`.in_process`);
- :mod:`.schemas`, :mod:`.chunks`, :mod:`.commit`: the rows the stages hand each other, what a chunk holds, and
  whole chunks written atomically, exactly once per row, with what a rerun still has to do;
- :mod:`.work`, :mod:`.run_passes`, :mod:`.user_passes`, :mod:`.profile_stats`, :mod:`.gate_sample`,
  :mod:`.manifest` and :mod:`.job`: the driver (``run_job``, ``run_profile_job``), metrics and the manifest;
- :mod:`.estimate` (``stepback plan``) and :mod:`.submit` (``stepback submit``; a cluster's Jobs server in
  :mod:`.ray_jobs`).

A *chunk* (the users of one shard, see :mod:`stepback_ray.data.rows`) is one Ray Data block from start to end:
every stage maps a whole block to a whole block, so the commit stage writes each chunk as one file, atomically,
and checks that no row is missing. A rerun with the same ``run_id`` skips committed chunks. Engines are built
inside their actors from the job spec; CPU stages load only the tokenizer (and the retriever or encoder).
"""

from stepback_ray.pipeline.chunks import ProfilesAt
from stepback_ray.pipeline.executors import Executor, executor
from stepback_ray.pipeline.job import RunResult, run_job, run_profile_job
from stepback_ray.pipeline.manifest import check_resume
from stepback_ray.pipeline.passes import PASSES, pass_named
from stepback_ray.pipeline.schemas import row_key
from stepback_ray.pipeline.stages import PassSpec, Stage
from stepback_ray.pipeline.user_passes import run_user_passes
from stepback_ray.pipeline.work import prepare_work

__all__ = [
    "PASSES",
    "Executor",
    "PassSpec",
    "ProfilesAt",
    "RunResult",
    "Stage",
    "check_resume",
    "executor",
    "pass_named",
    "prepare_work",
    "row_key",
    "run_job",
    "run_profile_job",
    "run_user_passes",
]
