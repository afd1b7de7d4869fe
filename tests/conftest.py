"""Fixtures of every tier: a local S3 (moto), the embedded model's prompt tools and engines, and the one local Ray
of a session (the ``ray`` and ``drills`` tiers). Helpers that tests import are in ``tests/support.py``.

The tiers are folders: ``unit/`` (no Ray), ``ray/`` (a local Ray), ``drills/`` (slow fault drills), ``gpu/`` (needs
CUDA). ``pytest`` runs them all but deselects ``slow`` (pyproject's ``-m 'not slow'``); a run of the drills folder
alone (``pytest tests/drills``) runs its drills instead of deselecting every one of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import free_port

DRILLS = Path(__file__).parent / "drills"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every collected test a drill (``pytest tests/drills``, ``pytest tests/drills/test_fault_drills.py``): the
    default ``-m 'not slow'`` would deselect all of them and pytest would exit 5, so the drills run. A ``-m`` given
    on the command line (``pytest tests/drills -m 'not slow'``) is obeyed as written."""
    explicit = any(a == "-m" or (a.startswith("-m") and not a.startswith("--")) for a in config.invocation_params.args)
    if explicit or config.option.markexpr != "not slow":
        return
    if items and all(DRILLS in Path(i.path).parents for i in items):
        config.option.markexpr = ""


DESELECTED = []


def pytest_deselected(items):
    DESELECTED.extend(items)


def pytest_sessionfinish(session, exitstatus):
    """A selection that deselects every test it collected (``pytest tests/drills -m 'not slow'``) ran what was
    asked, nothing: exit 0, not pytest's 5 ("no tests collected"), which is kept for a path that holds no test."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and DESELECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (jobs see it initialized and leave it running)."""
    import ray

    from stepback_ray.pipeline.on_ray import init_local_ray

    init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 speaking the real S3 protocol; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields (endpoint, bucket, storage settings for a job spec)."""
    import uuid

    import s3fs

    creds = {"key": "testing", "secret": "testing"}
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True, **creds)
    fs.mkdir(bucket)
    yield s3_server, bucket, {"endpoint_url": s3_server, **creds}


@pytest.fixture(scope="session")
def formatter():
    """Prompt tools (tokenizer + chat template) of the embedded default model."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines.formatting import PromptFormatter

    return PromptFormatter(EngineConfig())


@pytest.fixture(scope="session")
def engine():
    """The embedded default model in the transformers engine (loaded once per session)."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import build_engine

    return build_engine(EngineConfig(batch_size=4))


@pytest.fixture(scope="session")
def dry_engine():
    """The dry-run engine with the embedded model's tokenizer: everything but the LLM (well-formed profiles of
    the expected length), for tests of what is built around the engine's calls."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import build_engine

    return build_engine(EngineConfig(kind="dry-run"))
