"""The run's engine actors kept across passes (``ray.keep_engines``, pipeline/engine_host.py), without Ray: a host
serves each pass through that pass's own engine stage around one engine and reports the engine's start once; blocks
spread over the hosts. The driver keeping and ending its hosts on a local Ray: tests/ray/test_engine_host.py."""

from __future__ import annotations

import pyarrow as pa

from stepback_ray.config import load_job
from stepback_ray.engines.base import SamplingParams
from stepback_ray.pipeline.engine_host import EngineHost, first_blocks, host_key, pick_host
from stepback_ray.pipeline.engine_stage import EngineStage
from tests.support import REPO


def _job(tmp_path, *extra):
    return load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "engine.kind=dry-run",
            "limit=6",
            "ray.users_per_chunk=2",
            "ray.progress_bars=false",
            f"output={tmp_path / 'run'}",
            *extra,
        ],
    )


class EchoStage(EngineStage):
    """A minimal engine stage: one completion per row's prompt, stamped as the pipeline's stages are."""

    def serve(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        done = self.generate([r["prompt"] for r in rows], SamplingParams(max_new_tokens=4))
        return pa.Table.from_pylist(self.stamp([{**r, "output": c.text} for r, c in zip(rows, done)]))


BLOCK = pa.Table.from_pylist(
    [{"chunk_id": "c0", "prompt": "Title: a study of caches"}, {"chunk_id": "c0", "prompt": "Title: batch inference"}]
)


def test_a_host_serves_each_pass_through_its_own_stage_around_one_engine(tmp_path):
    job = _job(tmp_path)
    host = EngineHost(job)
    engine = host.engine
    first, again = (host.serve("pass-1", EchoStage, job, BLOCK).to_pylist() for _ in range(2))
    assert all(r["output"] for r in first) and len(first) == 2
    # the engine's start is reported once, by the first block of the pass that started it
    assert all(r["engine_started_at"] <= r["engine_ready_at"] for r in first)
    assert not any(r.get("engine_ready_at") for r in again)
    stage_1 = host._stage[1]
    # the stage acts as an engine actor's: blocks side by side share calls, a fatal failure would end the process
    assert stage_1.engine is engine and not stage_1.owns_engine and stage_1.in_actor and stage_1.calls.gather_s > 0
    later = host.serve("pass-2", EchoStage, job, BLOCK).to_pylist()
    assert host._stage[1] is not stage_1 and host._stage[1].engine is engine  # a new stage, the same engine
    assert not any(r.get("engine_ready_at") for r in later)  # the second pass started no engine
    assert [r["output"] for r in later] == [r["output"] for r in first]
    assert later[0]["engine_process"] == first[0]["engine_process"]
    host.close()
    assert host.engine is None


def test_blocks_spread_over_the_hosts_by_a_stable_hash_of_their_chunk():
    picks = [pick_host(pa.Table.from_pylist([{"chunk_id": f"{i:05d}"}]), 3) for i in range(60)]
    assert set(picks) == {0, 1, 2} and min(picks.count(h) for h in range(3)) >= 10
    assert picks == [pick_host(pa.Table.from_pylist([{"chunk_id": f"{i:05d}"}]), 3) for i in range(60)]
    assert pick_host(pa.Table.from_pylist([{"chunk_id": "x"}]), 1) == 0
    assert pick_host(pa.Table.from_pylist([{"other": 1}]), 3) == 0


def test_a_pass_expects_at_its_start_as_many_blocks_per_host_as_it_keeps_in_flight(tmp_path):
    job = _job(tmp_path)  # 2 blocks in flight per engine actor
    assert [first_blocks(job, chunks, 1) for chunks in (1, 2, 10)] == [1, 2, 2]
    assert [first_blocks(job, chunks, 4) for chunks in (1, 4, 5, 100)] == [1, 1, 2, 2]


def test_hosts_are_the_same_for_passes_with_the_same_engine_and_resources(tmp_path):
    job = _job(tmp_path)
    assert host_key(job) == host_key(_job(tmp_path, "modes=[none]", "limit=3"))  # a variant job's other settings
    assert host_key(job) != host_key(_job(tmp_path, "engine.dry_run_tokens_per_s=50"))
    assert host_key(job) != host_key(_job(tmp_path, "ray.engine_actor_gpus=1"))
