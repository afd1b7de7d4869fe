"""``stepback submit``: run a job on a Ray cluster through Ray Jobs and follow it to the end.

What the job runs is what validated its spec here: the ``stepback_ray`` package this command imports is shipped
with the job (Ray's ``py_modules``), so the cluster needs stepback-ray's dependencies (or ``--pip``) but not
stepback-ray itself. The current directory (the project, without virtual environments, runs, VCS data and a
checkout's own copy of the package) is uploaded as the job's working directory, where the entrypoint ``python -m
stepback_ray run JOB.yaml --set ...`` runs; ``python`` is the first on the head's ``PATH`` (or the environment
``--pip`` builds). Extra pip requirements and environment variables go into the job's runtime environment. Secrets
never do: variables whose names look like credentials are refused (the cluster's instance role or its own
environment provides them). The Jobs server is reached with the user's Ray token (:mod:`.ray_jobs`).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from stepback_ray.errors import ConfigError, StepbackError
from stepback_ray.pipeline.ray_jobs import JobsServer, follow_up_commands, status_name
from stepback_ray.pipeline.resources import WORKER_ENV

PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The ``stepback_ray`` package this command runs from: shipped with every job."""

EXCLUDES = [
    ".venv",
    ".venv-*",
    "venv",
    "runs",
    "bench-runs",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "/build",
    "/dist",
    "/.whl",
    "/.gl",
    f"/{PACKAGE_DIR.name}",  # a checkout's copy of the package: the shipped one (py_modules) is what runs
]
"""What the uploaded working directory leaves out (Ray's gitignore-style patterns; ``.gitignore`` and
``.rayignore`` files are respected too)."""

UPLOAD_LIMIT_MIB = 100
"""The most a Ray Jobs server accepts in one upload (its HTTP request size limit)."""

_SECRET = re.compile(
    r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE|_KEY$|^AWS_ACCESS_KEY_ID$|^AWS_SESSION)", re.IGNORECASE
)


def runtime_env(working_dir: str, pip: list[str], env: list[str], package_dir: Path = PACKAGE_DIR) -> dict:
    """The job's runtime environment: the working dir, the stepback_ray package, pip extras, non-secret
    environment variables."""
    env_vars = {}
    for item in env:
        if "=" not in item:
            raise ConfigError(f"--env {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if _SECRET.search(key):
            raise ConfigError(
                f"--env {key}: looks like a secret; give the cluster its credentials through its "
                "instance role or environment, not through the job"
            )
        env_vars[key] = value
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    for key, value in WORKER_ENV.items():  # as a local run's workers get them
        env_vars.setdefault(key, value)
    out: dict = {
        "working_dir": working_dir,
        "py_modules": [str(package_dir)],
        "excludes": list(EXCLUDES),
        "env_vars": env_vars,
    }
    if pip:
        out["pip"] = list(pip)
    return out


def entrypoint(job_path: str, sets: list[str], command: str = "run") -> str:
    """The shell command the job runs on the cluster, in its working directory."""
    parts = ["python", "-m", "stepback_ray", command, job_path]
    for s in sets:
        parts += ["--set", s]
    return " ".join(shlex.quote(p) for p in parts)


def _largest_files(root: Path, count: int = 3) -> str:
    """The biggest files under ``root`` (outside the folders always left out), for an upload too large."""
    skipped = {".git", "runs", "bench-runs", "__pycache__", PACKAGE_DIR.name}
    sizes = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skipped and not d.startswith(".venv")]
        for name in files:
            path = Path(folder, name)
            if not path.is_symlink():
                sizes.append((path.stat().st_size, path.relative_to(root).as_posix()))
    return ", ".join(f"{name} ({size / 2**20:.0f} MiB)" for size, name in sorted(sizes, reverse=True)[:count])


def submit_job(
    job_path: str,
    sets: list[str],
    address: str,
    *,
    pip: list[str] | None = None,
    env: list[str] | None = None,
    wait: bool = True,
    command: str = "run",
) -> int:
    """Submit the job and follow its logs to the end (exit status 0 when it succeeded), or with ``wait=False``
    print its id and the commands that follow it."""
    cwd = Path.cwd().resolve()
    job_file = Path(job_path).resolve()
    if cwd not in job_file.parents:
        raise ConfigError(f"{job_path}: the job spec must be inside the working directory {cwd}, which is uploaded")
    rel = job_file.relative_to(cwd).as_posix()
    environment = runtime_env(str(cwd), pip or [], env or [])
    server = JobsServer(address)
    # a head that has just started answers before its job agent is up: "No available agent ... try again later"
    retrying = Retrying(
        stop=stop_after_delay(120),
        wait=wait_fixed(2),
        reraise=True,
        retry=retry_if_exception(lambda e: "try again later" in str(e).lower()),
    )
    try:
        with server.answering():
            job_id = retrying(
                server.client.submit_job,
                entrypoint=entrypoint(rel, sets, command),
                runtime_env=environment,
                metadata={"stepback_job": rel},
            )
    except StepbackError:
        raise
    except Exception as e:  # noqa: BLE001 - the cluster's refusal, in one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "status code 413" in str(e) or "exceeds the maximum size" in str(e):
            raise ConfigError(
                f"the working directory {cwd} is too large to upload (a Ray Jobs server takes at most "
                f"{UPLOAD_LIMIT_MIB} MiB): its largest files are {_largest_files(cwd)}; keep data in object "
                "storage or list such files in a .rayignore file"
            ) from None
        raise StepbackError(f"the Ray cluster at {address} refused the job: {detail}") from None
    print(f"submitted {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        print("follow it with:", *(f"  {c}" for c in follow_up_commands(job_id, address)), sep="\n", file=sys.stderr)
        return 0
    return follow(server, job_id)


def follow(server: JobsServer, job_id: str) -> int:
    """Print the job's logs as they come until it ends; 0 when it succeeded, 1 when not."""
    from ray.job_submission import JobStatus  # deferred: ray

    async def tail() -> None:
        async for lines in server.client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - log streaming is best effort; the status below decides
        pass
    status = server.status(job_id).status
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
        status = server.status(job_id).status
    print(f"job {job_id}: {status_name(status)}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1
