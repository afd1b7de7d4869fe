"""A cluster's Ray Jobs server as ``stepback submit`` talks to it: the user's Ray token sent along, a job's status
and logs, and the server's refusals (no token, a wrong token, an unknown job, no server at all) as one-line errors.

Ray's token authentication (``RAY_AUTH_MODE=token`` on the cluster) makes its Jobs server answer 401 to a request
without ``Authorization: Bearer <token>`` and 403 to one with a wrong token. Ray's own client sends the token only
when the client's environment also says ``RAY_AUTH_MODE=token``; ``stepback submit`` looks the user's token up
where Ray looks, in Ray's order: the ``RAY_AUTH_TOKEN`` variable, the file ``RAY_AUTH_TOKEN_PATH`` names, then
``~/.ray/auth_token`` (``ray get-auth-token`` prints a cluster's token).

A found token travels only where it cannot be read on the way (:func:`token_may_travel`): over HTTPS, to this
machine (a tunnel to the head), or anywhere when the user's environment says ``RAY_AUTH_MODE=token`` as Ray's own
client requires. Over plain HTTP to another host it is withheld, and a cluster that then asks for it gets one line
saying why and what to do.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stepback_ray.errors import ClusterError, ConfigError

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in ~/.ray/auth_token); "
    "`ray get-auth-token` on the head prints it"
)


@dataclass(frozen=True)
class RayToken:
    """A Ray authentication token and where it was found (said in errors; the token itself never is)."""

    value: str
    source: str


def ray_auth_token(environ: Mapping[str, str] | None = None, home: Path | None = None) -> RayToken | None:
    """The Ray token of the user's environment, found where Ray finds it and in the same order; None without one.

    A ``RAY_AUTH_TOKEN_PATH`` that cannot be read, or names an empty file, is an error (Ray treats it as one too,
    rather than fall back to the default file)."""
    environ = os.environ if environ is None else environ
    value = environ.get("RAY_AUTH_TOKEN", "").strip()
    if value:
        return RayToken(value, "RAY_AUTH_TOKEN")
    path = environ.get("RAY_AUTH_TOKEN_PATH", "")
    if path:
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the Ray token file ({e.strerror})") from None
        if not value:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: the Ray token file is empty")
        return RayToken(value, f"RAY_AUTH_TOKEN_PATH ({path})")
    default = (home or Path.home()) / ".ray" / "auth_token"
    try:
        value = default.read_text().strip()
    except OSError:
        return None
    return RayToken(value, str(default)) if value else None


def token_may_travel(address: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether a token may be sent to the Jobs server at ``address``: over HTTPS, to a loopback address (a tunnel),
    or anywhere once ``RAY_AUTH_MODE=token`` is set (the user asked for token auth, as Ray's client requires)."""
    from urllib.parse import urlsplit

    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").strip().lower() == "token":
        return True
    url = urlsplit(address if "://" in address else f"http://{address}")
    if url.scheme == "https":
        return True
    host = url.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def follow_up_commands(job_id: str, address: str) -> list[str]:
    """The commands that ask for a submitted job's status and its logs, as the user types them."""
    q_id, q_address = shlex.quote(job_id), shlex.quote(address)
    return [f"stepback submit --{what} {q_id} --address {q_address}" for what in ("status", "logs")]


class JobsServer:
    """The Ray Jobs server at ``address``, reached with the user's Ray token (when there is one)."""

    def __init__(self, address: str):
        from ray.job_submission import JobSubmissionClient  # deferred: ray

        self.address = address
        found = ray_auth_token()
        travels = found is not None and token_may_travel(address)
        self.token, self.withheld = (found, None) if travels else (None, found)
        headers = {"Authorization": f"Bearer {self.token.value}"} if self.token else None
        with self.answering():
            self.client = JobSubmissionClient(address, headers=headers)

    @contextmanager
    def answering(self, job_id: str | None = None) -> Iterator[None]:
        """The server's refusals met inside as one line each (``ClusterError``); anything else passes through."""
        import requests  # deferred: with ray
        from ray.exceptions import AuthenticationError  # deferred: ray

        try:
            yield
        except AuthenticationError:
            if self.withheld is not None:
                raise ClusterError(
                    f"the cluster at {self.address} requires Ray token authentication; the token from "
                    f"{self.withheld.source} is not sent over plain HTTP to another host: use an https:// address "
                    "or a tunnel to 127.0.0.1, or set RAY_AUTH_MODE=token to send it anyway"
                ) from None
            if self.token is None:
                raise ClusterError(
                    f"the cluster at {self.address} requires Ray token authentication: {TOKEN_HELP}"
                ) from None
            raise ClusterError(
                f"the cluster at {self.address} refused the Ray token from {self.token.source}: it is not this "
                "cluster's token (`ray get-auth-token` on the head prints the right one)"
            ) from None
        except (ConnectionError, requests.exceptions.RequestException) as e:
            raise ClusterError(f"cannot reach the Ray cluster at {self.address}: {_first_line(e)}") from None
        except RuntimeError as e:
            if job_id is not None and "status code 404" in str(e):
                raise ClusterError(f"no job {job_id!r} on the Ray cluster at {self.address}") from None
            raise

    def status(self, job_id: str) -> Any:
        """The job's details (``JobDetails``: status, message, entrypoint, metadata, times)."""
        with self.answering(job_id):
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        """Everything the job has printed so far."""
        with self.answering(job_id):
            return self.client.get_job_logs(job_id)


def describe(job_id: str, details: Any) -> str:
    """A job's details as the lines ``stepback submit --status`` prints."""
    lines = [f"job: {job_id}", f"status: {status_name(details.status)}"]
    if details.message:
        lines.append(f"message: {details.message}")
    spec = (details.metadata or {}).get("stepback_job")
    if spec:
        lines.append(f"job spec: {spec}")
    lines.append(f"entrypoint: {details.entrypoint}")
    for label, millis in (("started", details.start_time), ("ended", details.end_time)):
        if millis:
            when = datetime.fromtimestamp(millis / 1000, tz=timezone.utc)
            lines.append(f"{label}: {when:%Y-%m-%d %H:%M:%S} UTC")
    return "\n".join(lines)


def status_name(status: Any) -> str:
    """A Ray ``JobStatus`` as its name (``SUCCEEDED``), whatever the Python version's enum formatting."""
    return str(getattr(status, "value", status))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
