"""`stepback submit` against a real local Ray head (`ray start --head` on 127.0.0.1), through Ray Jobs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from benchmarks import fault_drills
from tests.support import REPO, free_port


@pytest.fixture
def ray_head(tmp_path, monkeypatch):
    """A real Ray head with its job server on 127.0.0.1 and token authentication (Ray's default), stopped (by
    PID) afterwards. Clients authenticate with the token from their environment, as on a real cluster."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex + uuid.uuid4().hex)
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    # as on a cluster node, the environment with stepback-ray installed is the head's `python` (job entrypoints
    # run `python -m stepback_ray`)
    head_env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    gcs, dash = free_port(), free_port()
    # every port of its own: the test session's local Ray already holds Ray's default agent ports, and a head
    # whose job agent cannot bind answers every submission with "No available agent"
    ports = [
        f"--{name}={free_port()}"
        for name in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
            "ray-client-server-port",
        )
    ]
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--temp-dir={temp}",
            *ports,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=head_env,
    )
    address = f"http://127.0.0.1:{dash}"
    # Ready once a fresh client process can list jobs: a fresh process, because Ray caches the auth token it
    # first loaded for the life of a process, and this one may have loaded another before the env was set.
    probe = [
        sys.executable,
        "-c",
        "import sys; from ray.job_submission import JobSubmissionClient as C; C(sys.argv[1]).list_jobs()",
        address,
    ]
    deadline = time.time() + 300
    while subprocess.run(probe, capture_output=True, env=dict(os.environ)).returncode != 0:
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, 9)
            pytest.fail("the local Ray head did not start")
        time.sleep(1)
    yield address
    fault_drills.kill_tree(proc)
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow  # starts a Ray head and submits a job (~60 s)
def test_submit_demo_job_to_a_local_head(ray_head, tmp_path):
    out = tmp_path / "submitted"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stepback_ray",
            "submit",
            "jobs/demo.yaml",
            "--address",
            ray_head,
            "--set",
            "limit=3",
            "--set",
            f"output={out}",
            "--set",
            "engine.kind=dry-run",
            "--set",
            "ray.progress_bars=false",
            "--env",
            "STEPBACK_CACHE=" + os.environ.get("STEPBACK_CACHE", os.path.expanduser("~/.cache/stepback-ray")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr
    assert "mode" in proc.stdout and "profile+rag" in proc.stdout  # the job's own table, followed live
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["generation_rows"] == 6
