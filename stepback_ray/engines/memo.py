"""Greedy answers kept across engine calls and jobs (``engine.response_cache``): an engine wrapped so that a
request it has answered before, with the same model, rendered prompt and sampling settings, is answered from a
local SQLite file instead of the model.

Only deterministic requests are kept: greedy decoding (temperature 0), one completion per prompt, no Persona-Plug
soft tokens; anything else, and any failed completion, goes to the model every time. A kept answer comes back
with the token counts it had, no engine seconds, and every prompt token counted as cached (served without being
computed). Several processes may share one file (SQLite's own locking); the file is only a cache: deleting it
costs time, never results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import Completion, Engine, Prompt, Request, SamplingParams

RESULT_KEYS = ("kind", "model", "dtype", "max_model_len", "prompt_family", "load_format")
"""The engine settings besides the prompt and sampling that a kept answer depends on (part of its key)."""


def request_key(config: EngineConfig, prompt: Prompt, params: SamplingParams) -> str:
    """The hash an answer is kept under: the engine's result settings, the prompt as sent and the sampling."""
    payload = {
        "engine": {k: getattr(config, k) for k in RESULT_KEYS},
        "prompt": prompt,
        "params": dataclasses.asdict(params),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def cacheable(request: Prompt | Request, params: SamplingParams) -> bool:
    """Whether the answer to ``request`` is the same every time (greedy, one completion, no soft tokens)."""
    soft = request.soft_tokens if isinstance(request, Request) else None
    return params.temperature == 0 and params.n == 1 and soft is None


class MemoEngine:
    """An engine whose deterministic answers are kept in ``path`` (see the module docstring); every other
    attribute (prompt tools, ``model_id``, ``close``) is the wrapped engine's."""

    def __init__(self, inner: Engine, config: EngineConfig, path: str):
        self.inner, self.config = inner, config
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, timeout=120, check_same_thread=False)
        self._lock = threading.Lock()  # an actor serving blocks side by side calls from several threads
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, completion TEXT)")
        self.hits = self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _kept(self, keys: list[str]) -> dict[str, Completion]:
        out: dict[str, Completion] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i : i + 500]
                marks = ",".join("?" * len(part))
                for key, value in self._db.execute(f"SELECT key, completion FROM answers WHERE key IN ({marks})", part):
                    c = json.loads(value)
                    out[key] = Completion(
                        c["text"],
                        c["prompt_tokens"],
                        c["completion_tokens"],
                        c["finish_reason"],
                        0.0,
                        cached_tokens=c["prompt_tokens"],
                    )
        return out

    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        keys = [
            request_key(self.config, r.prompt if isinstance(r, Request) else r, params)
            if cacheable(r, params)
            else None
            for r in requests
        ]
        kept = self._kept([k for k in keys if k is not None])
        todo = [i for i, k in enumerate(keys) if k is None or k not in kept]
        self.hits += len(requests) - len(todo)
        self.misses += len(todo)
        fresh = self.inner.generate([requests[i] for i in todo], params) if todo else []
        kept_fields = ("text", "prompt_tokens", "completion_tokens", "finish_reason")
        rows = [
            (keys[i], json.dumps({f: getattr(c, f) for f in kept_fields}))
            for i, c in zip(todo, fresh)
            if keys[i] is not None and c.error is None and c.finish_reason != "error"
        ]
        if rows:
            with self._lock, self._db:
                self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", rows)
        out: list[Completion | None] = [kept.get(k) if k is not None else None for k in keys]
        for i, c in zip(todo, fresh):
            out[i] = c
        return out  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.inner.close()
