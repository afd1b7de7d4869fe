"""Concurrent engine calls of one engine actor merged into one engine call (engines/coalesce.py), through Ray Data
with the engine stage's own actor pool; the gathering itself: tests/unit/test_coalesce.py."""

from __future__ import annotations

from stepback_ray.engines import SamplingParams


class _CountingStage:
    """An engine stage as the pipeline declares one (built with ``job`` in the actor): each block's prompts in one
    engine call; each output row says how many blocks that engine call served."""

    def __init__(self, job):
        from stepback_ray.pipeline.engine_stage import EngineStage

        class Stage(EngineStage):
            def __init__(self, job):
                super().__init__(job)
                self.sizes: list[int] = []  # prompts per engine call, as the engine got them
                engine_call = self.calls.call

                def recorded(prompts, params):
                    self.sizes.append(len(prompts))
                    return engine_call(prompts, params)

                self.calls.call = recorded

            def serve(self, batch):
                import pyarrow as pa

                prompts = batch.column("prompt").to_pylist()
                self.generate(prompts, SamplingParams(max_new_tokens=4))
                return pa.table({"block": batch.column("block"), "largest_call": [max(self.sizes)] * len(prompts)})

        self.stage = Stage(job)

    def __call__(self, batch):
        return self.stage(batch)


def test_on_ray_an_engine_actor_serves_its_blocks_in_flight_in_one_engine_call(ray_local):
    """Through Ray Data with the engine stage's own actor pool (engine_compute): 6 blocks, 3 in flight at the one
    actor, served by fewer engine calls than blocks; with coalescing off, one call per block."""
    import ray.data

    from stepback_ray.config import JobSpec
    from stepback_ray.pipeline.on_ray import engine_compute

    served = {}
    for coalesce in (True, False):
        job = JobSpec.model_validate(
            {
                "name": "t",
                "task": "LaMP_5",
                "input": {"format": "lamp", "questions": "q.json"},
                "modes": ["none"],
                "engine": {"kind": "dry-run", "dry_run_tokens_per_s": 2000},
                "ray": {"engine_tasks_in_flight": 3, "engine_coalesce": coalesce},
            }
        )
        items = [{"block": b, "prompt": f"block {b} prompt {i} " * 20} for b in range(6) for i in range(4)]
        ds = ray.data.from_items(items, override_num_blocks=6).map_batches(
            _CountingStage,
            fn_constructor_kwargs={"job": job},
            compute=engine_compute(job, 1),
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0.5,
        )
        rows = ds.take_all()
        assert sorted({r["block"] for r in rows}) == list(range(6)) and len(rows) == 24
        served[coalesce] = max(r["largest_call"] for r in rows)
    assert served[True] > 4  # an engine call got the prompts of several blocks (4 each)
    assert served[False] == 4
