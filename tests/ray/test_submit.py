"""`stepback submit` against a real local Ray head (`ray start --head` on 127.0.0.1, ports and temp dir of its
own) as a fresh cluster is: token authentication on, and stepback-ray NOT installed where the head's jobs run
(`python` on its PATH has stepback-ray's dependencies but not stepback-ray; no PYTHONPATH; cwd outside the
repository). The job imports the package `submit` ships with it."""

from __future__ import annotations

import json
import os
import re
import signal
import site
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from tests.support import REPO, free_port

HEAD_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
)
"""Every port of its own: another local Ray (the test session's, another user's) may hold Ray's defaults, and a
head whose job agent cannot bind answers every submission with "No available agent"."""


def python_without_stepback(root: Path) -> Path:
    """A Python environment with everything this one has installed except stepback-ray: a venv whose site
    packages point at this environment's (a .pth path line; the editable install's finder, itself a .pth hook
    there, is not run from such a path)."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    (own,) = Path(root, "lib").glob("python3*/site-packages")
    (own / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    python = root / "bin" / "python"
    check = "import importlib.util as u, ray, pydantic, pyarrow; print(u.find_spec('stepback_ray'))"
    probe = subprocess.run(
        [str(python), "-c", check], cwd=root, capture_output=True, text=True, env=_head_env(root), timeout=120
    )
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr  # the dependencies, not stepback-ray
    return python


def _head_env(venv: Path, token: str | None = None) -> dict[str, str]:
    """The head's environment: its own venv first on PATH, no PYTHONPATH, token authentication on."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS"} and not k.startswith("RAY_AUTH")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    if token:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Stop exactly the head this module started: SIGTERM to its `ray start --block` (which stops its node's
    processes), then SIGKILL to whatever of its process tree, or of processes naming its temp dir, is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if temp in " ".join(p.info["cmdline"] or []):
                left.append(p)
        except psutil.Error:
            pass
    try:
        left += psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        pass
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=30)


@pytest.fixture(scope="module")
def token_head():
    """A fresh Ray head with token authentication and without stepback-ray; yields (address, token)."""
    token = uuid.uuid4().hex + uuid.uuid4().hex
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 characters
    venv = Path(temp) / "py"
    python = python_without_stepback(venv)
    dash = free_port()
    proc = subprocess.Popen(
        [
            str(python),
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=2",
            f"--temp-dir={temp}/ray",
            *(f"--{name}={free_port()}" for name in HEAD_PORTS),
        ],
        cwd=temp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=_head_env(venv, token),
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 300
        while not _answers(address, token):
            if time.time() > deadline or proc.poll() is not None:
                pytest.fail("the local Ray head did not start")
            time.sleep(1)
        yield address, token
    finally:
        _stop_head(proc, temp)
        subprocess.run(["rm", "-rf", temp], check=False)


def _answers(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stepback(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """The command as a user runs it from the repository (the checkout under test first on PYTHONPATH)."""
    return subprocess.run(
        [sys.executable, "-m", "stepback_ray", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "PYTHONPATH": str(REPO)},
    )


def _client_env(tmp_path: Path, token: str | None) -> dict[str, str]:
    """The user's environment: the token in RAY_AUTH_TOKEN (or none at all: no ~/.ray/auth_token either)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    if token is None:
        env["HOME"] = str(tmp_path)
    else:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.mark.slow  # starts a Ray head, makes a venv and runs a job through Ray Jobs (about a minute)
def test_submit_to_a_token_head_without_stepback_then_status_and_logs(token_head, tmp_path):
    address, token = token_head
    env = _client_env(tmp_path, token)
    out = tmp_path / "submitted"
    cache = os.environ.get("STEPBACK_CACHE", os.path.expanduser("~/.cache/stepback-ray"))
    sets = ["limit=3", f"output={out}", "engine.kind=dry-run", "ray.progress_bars=false"]
    proc = stepback(
        "submit",
        "jobs/demo.yaml",
        "--address",
        address,
        *(a for s in sets for a in ("--set", s)),
        "--env",
        f"STEPBACK_CACHE={cache}",
        "--no-wait",
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = proc.stdout.strip()
    assert job_id.startswith("raysubmit_"), proc.stdout
    assert f"stepback submit --status {job_id} --address {address}" in proc.stderr
    assert f"stepback submit --logs {job_id} --address {address}" in proc.stderr
    deadline = time.time() + 400
    while True:
        status = stepback("submit", "--status", job_id, "--address", address, env=env)
        assert status.returncode == 0, status.stderr
        if any(f"status: {s}" in status.stdout for s in ("SUCCEEDED", "FAILED", "STOPPED")) or time.time() > deadline:
            break
        time.sleep(3)
    logs = stepback("submit", "--logs", job_id, "--address", address, env=env)
    assert "status: SUCCEEDED" in status.stdout, status.stdout + logs.stdout[-3000:]
    assert "job spec: jobs/demo.yaml" in status.stdout
    assert logs.returncode == 0 and "profile+rag" in logs.stdout  # the job's own metrics table
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["generation_rows"] == 6
    # without --no-wait: the logs followed live (through the token) to the job's end, its status the exit status
    quick = ["limit=1", f"output={tmp_path / 'followed'}", "engine.kind=dry-run", "executor=in-process"]
    followed = stepback(
        "submit", "jobs/demo.yaml", "--address", address, *(a for s in quick for a in ("--set", s)), env=env
    )
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "profile+rag" in followed.stdout and re.search(r"job raysubmit_\w+: SUCCEEDED", followed.stderr)


@pytest.mark.slow  # shares the head above
def test_a_token_head_refuses_a_client_without_its_token_in_one_line(token_head, tmp_path):
    address, token = token_head
    for env, expected in (
        (_client_env(tmp_path, None), f"error: the cluster at {address} requires Ray token authentication: set"),
        (_client_env(tmp_path, "not-" + token), "refused the Ray token from RAY_AUTH_TOKEN"),
        (_client_env(tmp_path, token), f"error: no job 'raysubmit_nope' on the Ray cluster at {address}"),
    ):
        proc = stepback("submit", "--status", "raysubmit_nope", "--address", address, env=env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], proc.stderr
    no_token = _client_env(tmp_path, None)
    refused = stepback("submit", "jobs/demo.yaml", "--address", address, "--set", "engine.kind=dry-run", env=no_token)
    assert refused.returncode == 2 and "requires Ray token authentication" in refused.stderr, refused.stderr
