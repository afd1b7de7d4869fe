"""The run's engine actors kept across passes (``ray.keep_engines``, pipeline/engine_host.py) on a local Ray: the
driver keeps the hosts while the passes' engines are the same, ends them after, and fails a pass in one line when a
host dies past its restarts. A host's own serving: tests/unit/test_engine_host.py."""

from __future__ import annotations

import pytest

from stepback_ray.pipeline import run_job
from stepback_ray.pipeline.engine_host import EngineHosts
from tests.unit.test_engine_host import BLOCK, EchoStage, _job


def test_the_driver_keeps_its_hosts_until_the_engine_changes_then_ends_them(ray_local, tmp_path):
    import ray

    job = _job(tmp_path, "ray.engine_actors=2")
    hosts = EngineHosts()
    try:
        first = hosts.for_job(job)
        assert len(first) == 2 and hosts.for_job(job) == first
        served = ray.get(first[1].serve.remote("p", EchoStage, job, BLOCK)).to_pylist()
        assert [r["prompt"] for r in served] == BLOCK.column("prompt").to_pylist()
        other = hosts.for_job(_job(tmp_path, "ray.engine_actors=2", "engine.dry_run_tokens_per_s=50"))
        assert len(other) == 2 and not set(other) & set(first)
        with pytest.raises(ray.exceptions.RayActorError):  # the old hosts were ended: no two engine sets at once
            ray.get(first[0].serve.remote("p", EchoStage, job, BLOCK), timeout=60)
    finally:
        hosts.close()
    assert hosts.actors == []
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(other[0].serve.remote("p", EchoStage, job, BLOCK), timeout=60)


def test_without_kept_engines_each_pass_starts_its_own_engine_actor(ray_local, tmp_path):
    result = run_job(_job(tmp_path, "ray.keep_engines=false", "run_id=per-pass"))
    t, counts = result.manifest["timings"], result.manifest["counts"]
    assert counts["generation_rows"] == counts["expected_generation_rows"] == 12
    assert t["profile_engines_started"] == 1 and t["generation_engines_started"] == 1, t


def test_a_host_dead_past_its_restarts_fails_the_pass_in_one_line(ray_local, tmp_path):
    from stepback_ray.errors import RunFailed

    job = _job(
        tmp_path,
        "engine.dry_run_fatal_after=0",
        "engine.max_restarts=1",
        "modes=[none]",  # no profiles
        "limit=2",
        "run_id=dead",
    )
    with pytest.raises(RunFailed, match=r"the generation pass's engine actor died 2 times \(engine.max_restarts = 1"):
        run_job(job)
