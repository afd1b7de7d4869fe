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
