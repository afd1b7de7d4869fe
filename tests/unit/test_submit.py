"""`stepback submit`: what it hands Ray Jobs (runtime environment without secrets, the entrypoint). Against a real
local Ray head: tests/ray/test_submit.py."""

from __future__ import annotations

import pytest

from stepback_ray.errors import ConfigError
from stepback_ray.pipeline.submit import entrypoint, runtime_env


def test_runtime_env_keeps_secrets_out():
    env = runtime_env("/w", ["stepback-ray[vllm]"], ["STEPBACK_CACHE=/c", "HF_HUB_OFFLINE=1"])
    assert env["env_vars"] == {
        "STEPBACK_CACHE": "/c",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "ARROW_DEFAULT_MEMORY_POOL": "system",
    }
    assert (
        runtime_env("/w", [], ["ARROW_DEFAULT_MEMORY_POOL=mimalloc"])["env_vars"]["ARROW_DEFAULT_MEMORY_POOL"]
        == "mimalloc"
    )  # the user's choice wins
    assert env["pip"] == ["stepback-ray[vllm]"] and ".venv" in env["excludes"] and env["working_dir"] == "/w"
    for secret in ("AWS_SECRET_ACCESS_KEY=x", "AWS_ACCESS_KEY_ID=x", "HF_TOKEN=x", "DB_PASSWORD=x", "API_KEY=x"):
        with pytest.raises(ConfigError, match="looks like a secret"):
            runtime_env("/w", [], [secret])
    assert (
        entrypoint("jobs/demo.yaml", ["limit=2", "output=runs/a b"])
        == "python -m stepback_ray run jobs/demo.yaml --set limit=2 --set 'output=runs/a b'"
    )
