"""The job spec: one typed, validated description of a run.

A job spec is a YAML file (see ``jobs/``) plus ``--set key=value`` overrides from the command line. It is
validated in full before anything runs: an unknown key, a value of the wrong type or out of range, or an
unknown task or mode is a :class:`~stepback_ray.errors.ConfigError` naming the key. The sections are in
:mod:`.sections` and :mod:`.engine` (built from :mod:`.fields`), the whole spec and which keys change results in
:mod:`.spec`, reading a spec in :mod:`.loading`.
"""

from __future__ import annotations

from stepback_ray.config.engine import DEFAULT_MODEL, ENGINES, EngineConfig, OpenAIOptions, VLLMOptions
from stepback_ray.config.fields import SPEED_ONLY, Int, Number
from stepback_ray.config.loading import load_job, parse_overrides, storage_config
from stepback_ray.config.sections import (
    GenerationConfig,
    InputConfig,
    MultiAuthorConfig,
    PPlugConfig,
    ProfileConfig,
    ProfileStoreConfig,
    RayConfig,
    RetrievalConfig,
    StageResources,
    StorageConfig,
    StoreGateConfig,
)
from stepback_ray.config.spec import JobSpec, Mode, speed_only_keys, without_keys

__all__ = [
    "DEFAULT_MODEL",
    "ENGINES",
    "EngineConfig",
    "GenerationConfig",
    "InputConfig",
    "Int",
    "JobSpec",
    "Mode",
    "MultiAuthorConfig",
    "Number",
    "PPlugConfig",
    "ProfileConfig",
    "ProfileStoreConfig",
    "RayConfig",
    "OpenAIOptions",
    "RetrievalConfig",
    "SPEED_ONLY",
    "StageResources",
    "StorageConfig",
    "StoreGateConfig",
    "VLLMOptions",
    "load_job",
    "parse_overrides",
    "speed_only_keys",
    "storage_config",
    "without_keys",
]
