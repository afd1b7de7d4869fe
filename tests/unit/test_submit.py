"""`stepback submit`: what it hands Ray Jobs (runtime environment without secrets, the package shipped with the
job, the entrypoint), the Ray token it sends, and the Jobs server's refusals as one line. Against a real local Ray
head with token authentication and without stepback-ray: tests/ray/test_submit.py."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stepback_ray.cli import main
from stepback_ray.errors import ConfigError
from stepback_ray.pipeline.ray_jobs import describe, follow_up_commands, ray_auth_token, token_may_travel
from stepback_ray.pipeline.submit import EXCLUDES, PACKAGE_DIR, entrypoint, runtime_env


def test_runtime_env_ships_the_package_and_keeps_secrets_out():
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
    assert env["pip"] == ["stepback-ray[vllm]"] and env["working_dir"] == "/w"
    # the package this command runs is the one the job imports; a checkout's copy stays out of the upload
    assert env["py_modules"] == [str(PACKAGE_DIR)] and (PACKAGE_DIR / "__main__.py").is_file()
    assert {".venv", "runs", "bench-runs", ".git", "/stepback_ray"} <= set(env["excludes"])
    for secret in ("AWS_SECRET_ACCESS_KEY=x", "AWS_ACCESS_KEY_ID=x", "HF_TOKEN=x", "DB_PASSWORD=x", "API_KEY=x"):
        with pytest.raises(ConfigError, match="looks like a secret"):
            runtime_env("/w", [], [secret])
    assert (
        entrypoint("jobs/demo.yaml", ["limit=2", "output=runs/a b"])
        == "python -m stepback_ray run jobs/demo.yaml --set limit=2 --set 'output=runs/a b'"
    )


def test_excludes_leave_out_what_a_job_never_needs():
    from ray._private.thirdparty.pathspec import PathSpec  # the matcher Ray applies to the excludes

    spec = PathSpec.from_lines("gitwildmatch", EXCLUDES)
    for left_out in (".venv/bin/python", ".venv-vllm/x", "runs/a/b.parquet", "bench-runs/x", ".git/HEAD"):
        assert spec.match_file(left_out), left_out
    assert spec.match_file("stepback_ray/cli/jobs.py")  # shipped as py_modules instead
    for kept in ("jobs/demo.yaml", "data/samples/x.json", "tests/stepback_ray_notes.md", "docs/runs.md"):
        assert not spec.match_file(kept), kept


def test_ray_token_is_found_where_ray_looks_in_rays_order(tmp_path):
    home = tmp_path / "home"
    assert ray_auth_token({}, home) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-file\n")
    assert ray_auth_token({}, home).value == "from-file"
    path = tmp_path / "token"
    path.write_text("from-path")
    found = ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home)
    assert (found.value, found.source) == ("from-path", f"RAY_AUTH_TOKEN_PATH ({path})")
    found = ray_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}, home)
    assert (found.value, found.source) == ("from-env", "RAY_AUTH_TOKEN")
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.*missing: cannot read the Ray token file"):
        ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    path.write_text("\n")
    with pytest.raises(ConfigError, match="the Ray token file is empty"):
        ray_auth_token({"RAY_AUTH_TOKEN_PATH": str(path)}, home)


TOKEN = "0123456789abcdef"


class _TokenJobsServer(BaseHTTPRequestHandler):
    """The answers of a Ray Jobs server with token authentication, as Ray's middleware gives them
    (ray/_private/authentication/http_token_authentication.py): 401 without a token, 403 with a wrong one."""

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        if not auth:
            self._answer(401, "Unauthorized: Missing authentication token")
        elif auth != f"Bearer {TOKEN}":
            self._answer(403, "Forbidden: Invalid authentication token")
        elif self.path == "/api/version":
            self._answer(200, json.dumps({"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}))
        else:
            self._answer(404, f"Job {self.path.rsplit('/', 1)[-1]} does not exist")

    def do_PUT(self):  # a package upload over the server's request size limit
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(413, "Request Entity Too Large")

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def token_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _TokenJobsServer)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "token, expected",
    [
        (None, "requires Ray token authentication: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH"),
        ("wrong", "refused the Ray token from RAY_AUTH_TOKEN: it is not this cluster's token"),
        (TOKEN, "no job 'raysubmit_nope' on the Ray cluster at"),
    ],
)
def test_the_jobs_servers_refusals_are_one_line(token_server, monkeypatch, tmp_path, capsys, token, expected):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token of the machine's user
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    if token is None:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    assert main(["submit", "--status", "raysubmit_nope", "--address", token_server]) == 2
    line = _error_line(capsys)
    assert expected in line and token_server in line, line
    assert TOKEN not in line and "wrong" not in line  # the token itself is never printed


def test_a_token_travels_only_where_it_cannot_be_read_on_the_way():
    assert token_may_travel("https://head.example:8265", {})
    assert token_may_travel("http://127.0.0.1:8265", {}) and token_may_travel("localhost:8265", {})
    assert token_may_travel("http://[::1]:8265", {})
    assert not token_may_travel("http://head.example:8265", {}) and not token_may_travel("10.0.0.7:8265", {})
    assert token_may_travel("http://head.example:8265", {"RAY_AUTH_MODE": "token"})


def test_a_token_withheld_from_a_plain_http_remote_is_one_line_saying_why(token_server, monkeypatch, tmp_path, capsys):
    """Over plain HTTP to another host the token stays home (the fake server is local, so the rule is told that
    it is not); the cluster's 401 then says why and what to do, not "set a token"."""
    from stepback_ray.pipeline import ray_jobs

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    monkeypatch.setattr(ray_jobs, "token_may_travel", lambda address, environ=None: False)
    assert main(["submit", "--status", "raysubmit_nope", "--address", token_server]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "is not sent over plain HTTP to another host" in line, line
    assert "from RAY_AUTH_TOKEN" in line and "RAY_AUTH_MODE=token" in line and TOKEN not in line


def test_an_unreachable_cluster_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    from tests.support import free_port

    address = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "--logs", "raysubmit_x", "--address", address]) == 2
    assert f"cannot reach the Ray cluster at {address}" in _error_line(capsys)


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "give a job spec (YAML) to submit, or --status/--logs JOB_ID"),
        (["jobs/demo.yaml", "--status", "raysubmit_x"], "asks about a submitted job; give no job spec"),
        (["--status", "raysubmit_x", "--logs", "raysubmit_x"], "give one of them"),
    ],
)
def test_submit_needs_a_job_spec_or_one_job_id(capsys, args, expected):
    assert main(["submit", *args, "--address", "http://127.0.0.1:9"]) == 2
    assert expected in _error_line(capsys)


def test_version(capsys):
    from stepback_ray import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"stepback-ray {__version__}"
    assert __version__ == next(
        line.split('"')[1]
        for line in (Path(__file__).parents[2] / "pyproject.toml").read_text().splitlines()
        if line.startswith("version")
    )


def test_status_lines_and_the_commands_that_follow_a_job():
    from ray.job_submission import JobDetails, JobStatus, JobType

    details = JobDetails(
        type=JobType.SUBMISSION,
        entrypoint="python -m stepback_ray run jobs/demo.yaml",
        submission_id="raysubmit_a",
        status=JobStatus.SUCCEEDED,
        message="Job finished successfully.",
        start_time=0,
        end_time=61_000,
        metadata={"stepback_job": "jobs/demo.yaml"},
    )
    assert describe("raysubmit_a", details).splitlines() == [
        "job: raysubmit_a",
        "status: SUCCEEDED",
        "message: Job finished successfully.",
        "job spec: jobs/demo.yaml",
        "entrypoint: python -m stepback_ray run jobs/demo.yaml",
        "ended: 1970-01-01 00:01:01 UTC",
    ]
    assert follow_up_commands("raysubmit_a", "http://h:8265") == [
        "stepback submit --status raysubmit_a --address http://h:8265",
        "stepback submit --logs raysubmit_a --address http://h:8265",
    ]


def test_a_working_directory_too_large_to_upload_is_one_line_naming_its_largest_files(
    token_server, monkeypatch, tmp_path
):
    from stepback_ray.pipeline.submit import submit_job

    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)
    (tmp_path / "job.yaml").write_text("name: x\n")
    (tmp_path / "big.parquet").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "bigger.parquet").write_bytes(b"\0" * 4 * 2**20)  # left out of the upload
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as refused:
        submit_job("job.yaml", [], token_server)
    message = str(refused.value)
    assert "\n" not in message and "is too large to upload" in message, message
    assert "its largest files are big.parquet (3 MiB)" in message and "bigger" not in message
