"""On a local Ray: placement groups made from the engine actors' arguments, and what every worker gets."""

from __future__ import annotations


def test_placement_group_args_create_a_group_with_those_bundles(ray_local):
    from ray.util.placement_group import placement_group_table, remove_placement_group

    from stepback_ray.pipeline.resources import placement_group_args

    args = placement_group_args([{"CPU": 0.01}, {"CPU": 0.01}])()
    strategy = args["scheduling_strategy"]
    pg = strategy.placement_group
    assert strategy.placement_group_capture_child_tasks is True
    assert pg.wait(30)
    table = placement_group_table(pg)
    assert table["strategy"] == "PACK" and list(table["bundles"].values()) == [{"CPU": 0.01}, {"CPU": 0.01}]
    remove_placement_group(pg)


def test_local_ray_workers_use_the_system_allocator_for_arrow(ray_local):
    """A worker that staged a big input must give the memory back (WORKER_ENV), not keep it in Arrow's pool."""
    ray = ray_local

    @ray.remote
    def backend() -> str:
        import pyarrow as pa

        return pa.default_memory_pool().backend_name

    assert ray.get(backend.remote()) == "system"
