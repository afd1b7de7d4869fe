"""The OpenAI-compatible HTTP engine (``engine.kind: openai``): a vLLM server fleet or a hosted endpoint as the engine.

Prompts reach the engine already rendered with the model's chat template by the CPU stages (the formatter), so
they go to the ``/v1/completions`` endpoint as text: exactly what the in-process engines decode, with no second
template. (``/v1/chat/completions`` would apply the server's template again; it is not used.) The local tokenizer
still budgets and counts prompts, so the served model must be ``engine.model`` itself (same weights, same
tokenizer); the server's own counts (``usage``) are reported.

Each ``generate`` call runs an asyncio loop: at most ``max_concurrency`` requests in flight, one per prompt. A
request is retried after 429, 5xx, a timeout or a dropped connection, up to ``max_retries`` times, waiting
``backoff_base_s * 2^attempt`` (with jitter, capped at ``backoff_max_s``) or, if the server sent one, exactly its
``Retry-After``. Failures are sorted as the guard (``engines/guard.py``) expects:

- a prompt the server rejects (400, 413, 422 ...) is that prompt's ``error`` completion, as is one whose retries
  ran out while other prompts of the call were served;
- a refused key or an unknown model or URL (401, 403, 404), or a call in which no prompt could be served after
  every retry (the server is down or overloaded for good), is a :class:`FatalEngineError`: never rows of empty
  answers.

The API key is read from the environment variable ``engine.openai.api_key_env`` when the engine is built; it is
kept out of the config, the manifest, reprs and error messages. Persona-Plug soft tokens cannot travel over this
API: a request carrying them is an ``error`` completion.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from stepback_ray.config import EngineConfig, OpenAIOptions
from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams, cut_at_stop
from stepback_ray.engines.formatting import FormattedEngine
from stepback_ray.engines.guard import FatalEngineError
from stepback_ray.errors import StepbackError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
"""Statuses worth a retry: throttling, timeouts and server-side failures."""
FATAL_STATUS = frozenset({401, 403, 404})
"""Statuses that say nothing about the prompt: the key, the URL or the model name is wrong."""


def api_key(opts: OpenAIOptions) -> str | None:
    """The API key from the environment (None when ``api_key_env`` is null); a one-line error when it is unset."""
    if opts.api_key_env is None:
        return None
    key = os.environ.get(opts.api_key_env)
    if not key:
        raise StepbackError(
            f"engine.openai.api_key_env names {opts.api_key_env}, which is not set in the engine's "
            "environment: export it (the key never goes in the job spec), or set "
            "engine.openai.api_key_env: null for a server that takes no key"
        )
    return key


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (a number of seconds or an HTTP date); None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Secret:
    """A string that never shows itself (repr, str, logs)."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "***" if self._value else "None"

    __str__ = __repr__


@dataclass
class HTTPStats:
    """What the engine's requests did so far (tests, logs)."""

    requests: int = 0
    """HTTP requests sent, retries included."""
    retries: int = 0
    throttled: int = 0
    """Answers 429."""
    waits: list[float] = field(default_factory=list)
    """Each wait before a retry, in seconds."""


class _Failed(Exception):
    def __init__(self, message: str, fatal: bool = False, retryable: bool = False):
        super().__init__(message)
        self.fatal, self.retryable = fatal, retryable


class OpenAIEngine(FormattedEngine):
    def __init__(self, config: EngineConfig):
        try:
            import httpx
        except ImportError:
            raise StepbackError("engine.kind is 'openai' but httpx is not installed (pip install httpx)") from None
        opts = config.openai
        if not opts.base_url:
            raise StepbackError("engine.kind is 'openai' but engine.openai.base_url is not set")
        self._httpx = httpx
        self._key = _Secret(api_key(opts))
        self._init_prompt_tools(config)
        self.opts = opts
        self.url = opts.base_url.rstrip("/") + "/completions"
        self.served_model = opts.model_name or config.model
        self.supports_json_schema = opts.structured_output != "none"
        self.stats = HTTPStats()
        self._rng = random.Random(0)

    def __repr__(self) -> str:
        return f"OpenAIEngine(url={self.url!r}, model={self.served_model!r})"

    # ------------------------------------------------------------------ requests
    def _body(self, text: str, params: SamplingParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.served_model,
            "prompt": text,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.min_new_tokens:
            body["min_tokens"] = params.min_new_tokens  # a vLLM extension
        if params.temperature > 0 and self.opts.send_seed:
            body["seed"] = params.seed
        if params.json_schema is not None and self.supports_json_schema:
            if self.opts.structured_output == "response_format":
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "profile", "schema": params.json_schema},
                }
            else:
                body["guided_json"] = params.json_schema
        body.update(self.opts.extra_body)
        return body

    def _headers(self) -> dict[str, str]:
        key = self._key.get()
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _wait(self, attempt: int, after: float | None) -> None:
        if after is not None:
            wait = after
        else:
            base = self.opts.backoff_base_s * (2**attempt)
            wait = min(self.opts.backoff_max_s, base * (0.5 + self._rng.random()))  # jitter: 0.5x .. 1.5x
        self.stats.retries += 1
        self.stats.waits.append(wait)
        await asyncio.sleep(wait)

    async def _one(self, client, sem: asyncio.Semaphore, text: str, params: SamplingParams) -> dict[str, Any]:
        """The server's answer to one prompt, after retries; raises :class:`_Failed`."""
        httpx = self._httpx
        body = self._body(text, params)
        last = "no attempt"
        for attempt in range(self.opts.max_retries + 1):
            after = None
            async with sem:
                self.stats.requests += 1
                try:
                    resp = await client.post(self.url, json=body, headers=self._headers())
                except httpx.TimeoutException as e:
                    last = f"timed out after {self.opts.request_timeout_s:g} s ({type(e).__name__})"
                    resp = None
                except httpx.TransportError as e:
                    last = f"connection failed: {type(e).__name__}: {e}"
                    resp = None
            if resp is not None:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError:
                        raise _Failed(
                            f"the server answered 200 with a body that is not JSON: {resp.text[:200]!r}"
                        ) from None
                detail = _detail(resp)
                last = f"HTTP {resp.status_code}: {detail}"
                if resp.status_code == 429:
                    self.stats.throttled += 1
                if resp.status_code in FATAL_STATUS:
                    raise _Failed(
                        f"{self.url} answered {last} (check base_url, model_name and the API key)", fatal=True
                    )
                if resp.status_code not in RETRY_STATUS:
                    raise _Failed(f"the server rejected the prompt: {last}")
                after = retry_after(resp.headers.get("retry-after"))
            if attempt < self.opts.max_retries:
                await self._wait(attempt, after)
        raise _Failed(f"{self.url}: {last}, still after {self.opts.max_retries} retries", retryable=True)

    async def _all(self, texts: list[str], params: SamplingParams) -> list[Any]:
        httpx = self._httpx
        sem = asyncio.Semaphore(self.opts.max_concurrency)
        timeout = httpx.Timeout(self.opts.request_timeout_s, connect=self.opts.connect_timeout_s)
        limits = httpx.Limits(
            max_connections=self.opts.max_concurrency, max_keepalive_connections=self.opts.max_concurrency
        )
        async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
            return await asyncio.gather(*(self._one(client, sem, t, params) for t in texts), return_exceptions=True)

    # ------------------------------------------------------------------ the engine interface
    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        reqs = [r if isinstance(r, Request) else Request(r) for r in requests]
        texts = [self.render(r.prompt) for r in reqs]
        lengths = [len(ids) for ids in self.formatter.encode_many(texts)]
        results, runnable = self.fit_context(lengths, params)
        send = []
        for i in runnable:
            if reqs[i].soft_tokens is not None:
                results[i] = Completion(
                    "",
                    lengths[i],
                    0,
                    "error",
                    0.0,
                    error="soft tokens (pplug modes) cannot be sent to an OpenAI-compatible "
                    "server: use engine.kind vllm or transformers",
                )
            else:
                send.append(i)
        if send:
            t0 = time.perf_counter()
            answers = _run(self._all([texts[i] for i in send], params))
            share = (time.perf_counter() - t0) / len(send)
            fatal = [a for a in answers if isinstance(a, _Failed) and a.fatal]
            if fatal:
                raise FatalEngineError(f"openai engine: {fatal[0]}")
            failed = [a for a in answers if isinstance(a, BaseException)]
            if len(failed) == len(answers) and all(isinstance(a, _Failed) and a.retryable for a in failed):
                raise FatalEngineError(
                    f"openai engine: the server failed every one of {len(answers)} requests of this call: {failed[0]}"
                )
            for i, a in zip(send, answers):
                if isinstance(a, _Failed):
                    results[i] = Completion("", lengths[i], 0, "error", share, error=f"openai engine: {a}"[:500])
                elif isinstance(a, BaseException):
                    raise a
                else:
                    results[i] = self._completion(a, lengths[i], params, share)
        return [r for r in results if r is not None]

    def _completion(self, answer: dict[str, Any], n_prompt: int, params: SamplingParams, share: float) -> Completion:
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if not choices:
            return Completion(
                "", n_prompt, 0, "error", share, error="openai engine: the server's answer has no choices"
            )
        texts = []
        for c in choices:
            text, _ = cut_at_stop(c.get("text") or "", params.stop)
            texts.append(text)
        usage = answer.get("usage") or {}
        first = choices[0]
        reason = "length" if first.get("finish_reason") == "length" else "stop"
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")  # servers that report it
        return Completion(
            texts[0],
            int(usage.get("prompt_tokens") or n_prompt),
            int(usage.get("completion_tokens") or 0),
            reason,
            share,
            samples=texts if params.n > 1 else [],
            cached_tokens=int(cached or 0),
        )

    def close(self) -> None:
        pass


def _detail(resp) -> str:
    """The error message of a failed answer, short (OpenAI's ``{"error": {"message"}}`` or the body's start)."""
    try:
        data = resp.json()
        err = data.get("error") if isinstance(data, dict) else None
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or data
        return str(msg)[:300]
    except Exception:  # noqa: BLE001 - any body at all
        return resp.text[:300] or resp.reason_phrase


def _run(coro):
    """Run ``coro`` to the end from synchronous code, also where this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
