"""The unit tier starts no Ray: a test here that would (``ray.init``, or Ray Data starting one on first use, or the
session's ``ray_local``) fails at once, naming the tier it belongs to."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_ray(request, monkeypatch):
    if "ray_local" in request.fixturenames:
        pytest.fail("a unit test asked for ray_local: Ray tests go in tests/ray/")
    import ray

    def refused(*args, **kwargs):
        raise AssertionError("a unit test started Ray (ray.init): move it to tests/ray/")

    monkeypatch.setattr(ray, "init", refused)


@pytest.fixture
def no_network(monkeypatch):
    """No name resolves and no connection opens (the hub-offline tests: nothing may reach the network)."""
    import socket

    from stepback_ray.engines import hub

    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    hub.hub_unreachable.cache_clear()  # a check made before this test does not count
    yield
    hub.hub_unreachable.cache_clear()  # nor does this test's for the next
