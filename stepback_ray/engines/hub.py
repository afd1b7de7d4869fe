"""Hub model ids on a machine that may have no network: whether the hub answers, found out at once, and a model
already in the local hub cache loaded from there when it does not."""

from __future__ import annotations

import functools
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from stepback_ray.errors import StepbackError

HUB_CHECK_TIMEOUT_S = 3.0
"""How long the hub may take to resolve and accept a connection before a run counts it as unreachable."""


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return var
    return None


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """Why the model hub cannot be reached from this process (None: it answers). Checked once per process in at
    most a few seconds: ``HF_HUB_OFFLINE`` set, the hub's host (or the HTTPS proxy's) not resolving, or no
    connection to it. Without this a hub id on a machine without network waited through the hub client's whole
    retry schedule before its error."""
    var = _offline_env()
    if var:
        return f"{var} is set"
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    proxy = next((os.environ[v] for v in proxies if os.environ.get(v)), "")
    if proxy:  # the proxy resolves the hub's name: it is what must answer here
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    else:
        target = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = target.hostname or "huggingface.co", target.port or (443 if target.scheme == "https" else 80)
    what = f"the HTTPS proxy {host}:{port}" if proxy else host
    pool = ThreadPoolExecutor(max_workers=1)  # getaddrinfo has no timeout of its own
    try:
        resolving = pool.submit(socket.getaddrinfo, host, port)
        try:
            resolving.result(timeout=HUB_CHECK_TIMEOUT_S)
        except TimeoutError:
            if not resolving.done():
                return f"{what} did not resolve within {HUB_CHECK_TIMEOUT_S:g} s"
            raise
        with socket.create_connection((host, port), timeout=HUB_CHECK_TIMEOUT_S):
            pass
    except OSError as e:
        return f"{what}: {e.strerror or e}"
    finally:
        pool.shutdown(wait=False)
    return None


def _cached_snapshot(model: str) -> str | None:
    """The folder of ``model`` in the local hub cache, found without the network (None: not there)."""
    try:
        from huggingface_hub import snapshot_download  # deferred: only a hub id that cannot be reached needs it

        return snapshot_download(repo_id=model, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached, or not a valid hub id: either way nothing to load offline
        return None


def hub_model(model: str, packaged: list[str], advice: str | None = None, what: str = "model") -> str:
    """A hub id as it can be loaded here: unchanged when the hub answers; offline, the copy in the local hub cache,
    or one line saying how to point at a local copy or one of the ``packaged`` models (``advice``: what to do
    instead, where the caller knows better, e.g. that a plan needs only a tokenizer; ``what``: the id's name in
    that line, e.g. ``engine.tokenizer``)."""
    offline = hub_unreachable()
    if offline is None:
        return model
    cached = _cached_snapshot(model)
    if cached is not None:
        return cached
    raise StepbackError(
        f"{what} {model!r} is a hub id, but the hub cannot be reached ({offline}) and it is not in the local hub "
        "cache: "
        + (
            advice
            or "point engine.model at a local copy (a model folder or a .gguf file), or use a packaged "
            f"model ({', '.join(packaged)})"
        )
    )
