"""``stepback submit``: run a job on a Ray cluster through Ray Jobs and follow it to the end.

The current directory (the project, without virtual environments, runs and VCS data) is uploaded as the job's
working directory; the entrypoint is ``python -m stepback_ray run JOB.yaml --set ...`` on the cluster. Extra pip
requirements and environment variables go into the job's runtime environment. Secrets never do: variables whose
names look like credentials are refused (the cluster's instance role or its own environment provides them).
"""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from stepback_ray.errors import ConfigError, StepbackError
from stepback_ray.pipeline.resources import WORKER_ENV

EXCLUDES = [".venv", ".venv-*", "runs", ".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".whl", ".gl"]
_SECRET = re.compile(
    r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE|_KEY$|^AWS_ACCESS_KEY_ID$|^AWS_SESSION)", re.IGNORECASE
)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def runtime_env(working_dir: str, pip: list[str], env: list[str]) -> dict:
    """The job's runtime environment: working dir, pip extras, non-secret environment variables."""
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
    out: dict = {"working_dir": working_dir, "excludes": EXCLUDES, "env_vars": env_vars}
    if pip:
        out["pip"] = list(pip)
    return out


def entrypoint(job_path: str, sets: list[str], command: str = "run") -> str:
    parts = ["python", "-m", "stepback_ray", command, job_path]
    for s in sets:
        parts += ["--set", s]
    return " ".join(shlex.quote(p) for p in parts)


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
    from ray.job_submission import JobStatus, JobSubmissionClient

    cwd = Path.cwd().resolve()
    job_file = Path(job_path).resolve()
    if cwd not in job_file.parents:
        raise ConfigError(f"{job_path}: the job spec must be inside the working directory {cwd}, which is uploaded")
    rel = job_file.relative_to(cwd).as_posix()
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection problems of any kind become one line
        raise StepbackError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    # a head that has just started answers before its job agent is up: "No available agent ... try again later"
    retrying = Retrying(
        stop=stop_after_delay(120),
        wait=wait_fixed(2),
        reraise=True,
        retry=retry_if_exception(lambda e: "try again later" in str(e).lower()),
    )
    try:
        job_id = retrying(
            client.submit_job,
            entrypoint=entrypoint(rel, sets, command),
            runtime_env=runtime_env(str(cwd), pip or [], env or []),
            metadata={"stepback_job": rel},
        )
    except Exception as e:  # noqa: BLE001 - the cluster's refusal, in one line
        raise StepbackError(f"the Ray cluster at {address} refused the job: {str(e).splitlines()[0]}") from None
    print(f"submitted {job_id} to {address}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(follow())
    except Exception:  # noqa: BLE001 - log streaming is best effort; the status below decides
        pass
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(1)
        status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", file=sys.stderr)
    return 0 if status == JobStatus.SUCCEEDED else 1
