"""LLM engines behind one interface (:class:`~stepback_ray.engines.base.Engine`)."""

from __future__ import annotations

import importlib

from stepback_ray.config import ENGINES, EngineConfig
from stepback_ray.engines.base import Completion, Engine, Message, Prompt, Request, SamplingParams
from stepback_ray.engines.memo import MemoEngine


def build_engine(config: EngineConfig) -> Engine:
    """Construct the engine the job asks for (``engine.kind``, declared with its class in
    :data:`~stepback_ray.config.ENGINES`). Call it inside the process that will use the engine: its module, and
    the heavy libraries that one needs, are imported only here. With ``engine.response_cache`` its greedy answers
    are kept across calls and jobs (:mod:`.memo`)."""
    if config.kind not in ENGINES:
        raise ValueError(f"unknown engine kind {config.kind!r}")
    module, _, name = ENGINES[config.kind].partition(":")
    engine = getattr(importlib.import_module(module), name)(config)
    if config.response_cache:
        return MemoEngine(engine, config, config.response_cache)
    return engine


__all__ = ["Completion", "Engine", "Message", "Prompt", "Request", "SamplingParams", "build_engine"]
