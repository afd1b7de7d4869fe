"""LLM engines behind one interface (:class:`~stepback_ray.engines.base.Engine`)."""

from __future__ import annotations

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import Completion, Engine, Message, Prompt, Request, SamplingParams


def build_engine(config: EngineConfig) -> Engine:
    """Construct the engine the job asks for. Call it inside the process that will use the engine."""
    if config.kind == "transformers":
        from stepback_ray.engines.transformers import TransformersEngine

        return TransformersEngine(config)
    if config.kind == "dry-run":
        from stepback_ray.engines.dry_run import DryRunEngine

        return DryRunEngine(config)
    if config.kind == "vllm":
        from stepback_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.kind == "openai":
        from stepback_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(config)
    raise ValueError(f"unknown engine kind {config.kind!r}")


__all__ = ["Completion", "Engine", "Message", "Prompt", "Request", "SamplingParams", "build_engine"]
