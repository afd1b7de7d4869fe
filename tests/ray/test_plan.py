"""`stepback plan` of a cluster job (a dataset input, staged on a local Ray)."""

from __future__ import annotations

import pytest


@pytest.mark.slow  # a dry-run profile pass: `make test-slow`
def test_the_nightly_cluster_job_plans_on_one_machine(ray_local, tmp_path):
    """jobs/nightly_profile.yaml asks for a cluster (address auto, one GPU per engine actor, 1024 shards): its plan
    runs here, on a local Ray with no GPU requests. The input points at a local dataset and the model at the
    packaged one (no hub here); every cluster setting stays as the job has it."""
    from stepback_ray.config import load_job
    from stepback_ray.pipeline.estimate import estimate_job
    from tests.support import REPO, lamp5_users, write_items_parquet

    write_items_parquet(tmp_path / "hist" / "part-0.parquet", lamp5_users(3))
    job = load_job(
        REPO / "jobs" / "nightly_profile.yaml",
        [
            f"input.path={tmp_path / 'hist'}",
            "engine.model=packaged:smollm2-135m-instruct",
            "run_id=plan",
            "ray.num_shards=4",
        ],
    )
    assert job.ray.address == "auto" and job.ray.engine_actor_gpus == 1 and job.output.startswith("s3://")
    plan = estimate_job(job, 9000.0, profile_only=True)  # output and store stay untouched (s3://, unreachable here)
    assert plan["users"] == 3 and plan["passes"]["profile"]["users"] == 3 and plan["gpu_hours"] > 0


@pytest.mark.slow  # a dry-run profile pass on a local Ray, then the same users in process
def test_a_sample_of_every_user_plans_what_the_staged_plan_does(ray_local, tmp_path):
    """`--sample N` reads a dataset without staging it and plans in this process: with N at least the input's users
    it plans exactly what the staged plan on Ray does (users, LLM calls, prompt and output tokens of the profile
    pass), so a smaller sample differs from the whole only by whom it drew."""
    from stepback_ray.config import load_job
    from stepback_ray.pipeline.estimate import estimate_job
    from tests.support import REPO, lamp5_users, write_items_parquet

    users = lamp5_users(12)
    write_items_parquet(tmp_path / "hist" / "part-0.parquet", users[:7])
    write_items_parquet(tmp_path / "hist" / "part-1.parquet", users[7:])
    job = load_job(
        REPO / "jobs" / "nightly_profile.yaml",
        [
            f"input.path={tmp_path / 'hist'}",
            "engine.model=Qwen/Qwen2.5-1.5B-Instruct",
            "engine.tokenizer=packaged:smollm2-135m-instruct",  # the hub id is never looked up
            "run_id=plan",
            "ray.num_shards=4",
        ],
    )
    staged = estimate_job(job, 9000.0, profile_only=True, changed=0.5)
    sampled = estimate_job(job, 9000.0, profile_only=True, sample=100, changed=0.5)
    assert sampled["sample"]["users"] == 12 and sampled["input"]["users"] == 12 and staged["users"] == 12
    for key in ("users", "llm_calls", "prompt_tokens", "output_tokens"):
        assert sampled["passes"]["profile"][key] == staged["passes"]["profile"][key], key
    assert sampled["incremental_night"] == staged["incremental_night"]
    assert sampled["plus_minus"]["tokens"] == 0 and sampled["tokenizer"] == "packaged:smollm2-135m-instruct"
