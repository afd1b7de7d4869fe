"""What the engine actors ask Ray for (plain data: checked here without a GPU, and without Ray), and how the
cluster address is checked before Ray starts. On a local Ray: tests/ray/test_resources.py."""

from __future__ import annotations

import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline.resources import engine_resources

BASE = {"name": "t", "task": "LaMP_5", "input": {"questions": "q.json"}}


def _job(**sections):
    return load_job(None, data={**BASE, **sections})


def test_cpu_default_is_one_actor_without_gpus():
    r = engine_resources(_job(), {"CPU": 2})
    assert (r.actors, r.num_cpus, r.num_gpus, r.bundles) == (1, 1.0, 0.0, [])
    assert r.remote_args() == {"num_cpus": 1.0}


def test_one_actor_per_gpu_pinned_to_an_accelerator_type():
    job = _job(
        engine={"kind": "vllm"}, ray={"engine_actors": "auto", "engine_actor_gpus": 1, "accelerator_type": "H100"}
    )
    r = engine_resources(job, {"CPU": 64, "GPU": 8})
    assert r.actors == 8 and r.num_gpus == 1 and r.bundles == []
    args = r.remote_args()
    # the GPU is asked for by each actor (Ray Data refuses num_gpus with whole-block batches): see resources.py
    assert args.pop("ray_remote_args_fn")() == {"num_gpus": 1.0} and "num_gpus" not in args
    assert args == {"num_cpus": 1.0, "accelerator_type": "H100"}
    assert engine_resources(job, {"CPU": 8}).actors == 1  # no GPU yet (autoscaling): start with one
    # the same resources for a plain actor: the run's engine host kept across passes (pipeline/engine_host.py)
    assert r.actor_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "accelerator_type": "H100"}
    assert engine_resources(_job(), {"CPU": 2}).actor_options() == {"num_cpus": 1.0}


def test_tensor_parallel_engines_get_a_placement_group_of_one_gpu_bundles(monkeypatch):
    job = _job(
        engine={"kind": "vllm", "vllm": {"tensor_parallel_size": 4}},
        ray={"engine_actors": "auto", "engine_actor_gpus": 1, "engine_actor_cpus": 2},
    )
    r = engine_resources(job, {"CPU": 64, "GPU": 8})
    assert r.actors == 2  # 8 GPUs / 4 per engine
    assert r.num_gpus == 0  # the actor holds no GPU itself: vLLM's workers use the bundles
    assert r.bundles == [
        {"GPU": 1.0, "CPU": 2.0},
        {"GPU": 1.0, "CPU": 1.0},
        {"GPU": 1.0, "CPU": 1.0},
        {"GPU": 1.0, "CPU": 1.0},
    ]
    args = r.remote_args()
    assert args["num_cpus"] == 2 and "num_gpus" not in args and callable(args["ray_remote_args_fn"])
    made = []
    monkeypatch.setattr(
        "stepback_ray.pipeline.resources.placement_group_args",
        lambda bundles: lambda: made.append(bundles) or {"scheduling_strategy": "pg"},
    )
    assert r.actor_options() == {"num_cpus": 2, "scheduling_strategy": "pg"} and made == [r.bundles]


def test_auto_pool_size_follows_the_gpus_each_actor_holds():
    for share, actors in ((2, 4), (0.5, 16)):
        r = engine_resources(_job(ray={"engine_actors": "auto", "engine_actor_gpus": share}), {"GPU": 8})
        assert (r.actors, r.num_gpus) == (actors, share)


def test_fixed_pool_size_wins_over_the_cluster():
    job = _job(ray={"engine_actors": 3, "engine_actor_gpus": 0.5})
    r = engine_resources(job, {"GPU": 8})
    assert r.actors == 3 and r.num_gpus == 0.5


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_fails_in_seconds_without_starting_ray(monkeypatch):
    """Ray retries such an address for minutes ("Failed to connect to GCS"); the check answers at once."""
    import time

    import ray

    from stepback_ray.errors import ClusterError
    from stepback_ray.pipeline.resources import address_host_port, connect_cluster

    assert address_host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert address_host_port("ray://head:10001") == ("head", 10001)
    assert address_host_port("[::1]:6379") == ("::1", 6379)
    assert address_host_port("auto") is None and address_host_port("local") is None
    called = []
    monkeypatch.setattr(ray, "init", lambda **kw: called.append(kw))
    port = _closed_port()
    t0 = time.time()
    with pytest.raises(
        ClusterError,
        match=rf"ray.address '127.0.0.1:{port}': no Ray cluster reachable at "
        rf"127.0.0.1:{port} \(Connection refused\)",
    ):
        connect_cluster(f"127.0.0.1:{port}")
    assert time.time() - t0 < 5 and not called
    monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{port}")  # Ray Jobs' address is checked the same way
    with pytest.raises(ClusterError, match="no Ray cluster reachable"):
        connect_cluster(None)
    assert not called


def test_a_connection_ray_refuses_is_one_line(monkeypatch):
    """A cluster that needs an auth token makes ray.init raise ConnectionError: one line, not a traceback."""
    import socket

    import ray

    from stepback_ray.errors import ClusterError
    from stepback_ray.pipeline.resources import connect_cluster

    def refuse(**kw):
        raise ConnectionError("Authentication required: the cluster expects a token\nmore detail")

    monkeypatch.setattr(ray, "init", refuse)
    with socket.socket() as listener:  # something accepts TCP there, as a real head would
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(ClusterError) as e:
            connect_cluster(address)
    assert str(e.value) == (
        f"ray.address {address!r}: cannot connect to the Ray cluster: Authentication required: "
        "the cluster expects a token"
    )


def test_the_pipelines_ray_session_checks_the_address(monkeypatch):
    import ray

    from stepback_ray.errors import ClusterError
    from stepback_ray.pipeline.on_ray import ray_session

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever this process holds
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init reached"))
    port = _closed_port()
    with pytest.raises(ClusterError, match="no Ray cluster reachable"):
        with ray_session(_job(ray={"address": f"127.0.0.1:{port}"}, storage={"shared_filesystem": True})):
            pytest.fail("session started")
