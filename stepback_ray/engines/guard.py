"""Engine calls as an engine stage makes them: each failure sorted into the kind a batch job must treat its way.

A **prompt** failure (the engine rejects one prompt: too long, bad characters) belongs to that prompt: the batch is
retried prompt by prompt and the rejected one becomes one ``error`` row, counted against the run's
``max_error_fraction``. A **fatal** failure (the engine process died, the GPU ran out of memory, NCCL broke, a call
hung past ``engine.call_timeout_s``) says nothing about the prompts: writing rows for it would turn a dead engine
into a run of empty answers. Inside a Ray actor it ends the actor's process instead, Ray restarts the actor (its
constructor builds a new engine) and the block is retried, up to ``engine.max_restarts``; past that the pass fails.
Called in-process (tests, the variant harness), a fatal failure is raised as :class:`FatalEngineError`.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams

FATAL_MARKERS = (
    "out of memory",
    "cuda error",
    "cudaerror",
    "nccl",
    "enginedeaderror",
    "engine dead",
    "engine core",
    "device-side assert",
    "cublas",
    "cudnn",
    "hip error",
    "xla",
)
"""Lower-case text in an exception's type or message that marks the engine itself as broken, whatever the type
(vLLM, torch and NCCL raise plain ``RuntimeError`` for most of them)."""

EXIT_FATAL = 70
"""Exit status of an engine actor that ends itself after a fatal failure (so Ray restarts it)."""


class FatalEngineError(RuntimeError):
    """The engine cannot serve any prompt any more (dead, out of device memory, hung)."""


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` means the engine is broken rather than one prompt bad."""
    if isinstance(exc, (FatalEngineError, MemoryError, TimeoutError)):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(m in text for m in FATAL_MARKERS)


def end_actor(reason: str) -> None:
    """End this process so Ray restarts the actor with a fresh engine; the reason goes to the driver's log."""
    print(
        f"stepback: fatal engine failure, ending the engine actor (pid {os.getpid()}) so Ray restarts it with a "
        f"new engine and retries the block: {reason}",
        file=sys.stderr,
        flush=True,
    )
    os._exit(EXIT_FATAL)


class EngineCalls:
    """``engine.generate`` for an engine stage: one bad prompt isolated into one error row, a fatal failure never
    written as rows, a call longer than ``timeout_s`` treated as a dead engine.

    ``in_actor``: the stage owns its process (a Ray actor), so a fatal failure ends it; otherwise it is raised.
    The hang guard needs its own process to end, so it only runs in an actor."""

    def __init__(self, engine: Any, timeout_s: float | None, in_actor: bool):
        self.engine, self.timeout_s, self.in_actor = engine, timeout_s, in_actor

    def __call__(self, prompts: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        timer = None
        if self.in_actor and self.timeout_s:
            t0 = time.monotonic()
            timer = threading.Timer(
                self.timeout_s,
                lambda: end_actor(
                    f"an engine call of {len(prompts)} prompts has run {time.monotonic() - t0:.0f} s, over "
                    f"engine.call_timeout_s = {self.timeout_s:g}"
                ),
            )
            timer.daemon = True
            timer.start()
        try:
            return self._isolated(prompts, params)
        except Exception as e:
            if self.in_actor and is_fatal(e):
                end_actor(f"{type(e).__name__}: {e}"[:1000])
            if is_fatal(e) and not isinstance(e, FatalEngineError):
                raise FatalEngineError(f"{type(e).__name__}: {e}") from e
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _isolated(self, prompts: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        """The whole batch; if it fails for a prompt's reason, each prompt on its own (one error row each)."""
        try:
            return self.engine.generate(prompts, params)
        except Exception as e:  # noqa: BLE001 - sorted below: fatal re-raised, a prompt failure isolated
            if is_fatal(e):
                raise
        out = []
        for p in prompts:
            try:
                out += self.engine.generate([p], params)
            except Exception as e:  # noqa: BLE001 - a fatal one is re-raised; any other is this prompt's row
                if is_fatal(e):
                    raise
                out.append(Completion("", 0, 0, "error", 0.0, error=f"engine failed: {type(e).__name__}: {e}"[:500]))
        return out
