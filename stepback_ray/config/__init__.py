"""The job spec: one typed, validated description of a run.

A job spec is a YAML file (see ``jobs/``) plus ``--set key=value`` overrides from the command line. It is
validated in full before anything runs: an unknown key, a value of the wrong type or out of range, or an
unknown task or mode is a :class:`~stepback_ray.errors.ConfigError` naming the key. The sections are in
:mod:`.sections`; this module holds the whole spec, which keys change results, and loading.

Relative input paths written in a job file are resolved against the job file's folder (so a spec works from
any working directory); input paths given with ``--set`` and the output location are resolved against the
current directory, as a shell user expects. URIs with a scheme (``s3://...``) are left alone.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from stepback_ray.config.sections import (
    DEFAULT_MODEL,
    EngineConfig,
    GenerationConfig,
    InputConfig,
    Int,
    MultiAuthorConfig,
    Number,
    OpenAIOptions,
    PPlugConfig,
    ProfileConfig,
    ProfileStoreConfig,
    RayConfig,
    RetrievalConfig,
    StageResources,
    StorageConfig,
    StoreGateConfig,
    VLLMOptions,
    _Strict,
)
from stepback_ray.errors import ConfigError
from stepback_ray.modes import MODE_NAMES, mode_spec
from stepback_ray.tasks import TASK_ALIASES, TASKS

Mode = Literal[MODE_NAMES]
"""Generation modes, declared in :mod:`stepback_ray.modes`. ``none``: input only. ``rag``: retrieved history items.
``profile``: the step-back profile. ``profile+rag``: both (the Step-Back Profiling method). ``random-profile``:
``profile+rag`` with another user's profile and history (the paper's control: same prompt format, wrong person).
``pplug``: the input with a Persona-Plug soft token (needs ``pplug.checkpoint``). ``pplug+profile``: the soft token
and the step-back profile. ``pplug-random``: the input with another user's soft token."""

__all__ = [
    "DEFAULT_MODEL",
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
    "SPEED_ONLY_KEYS",
    "StageResources",
    "StorageConfig",
    "StoreGateConfig",
    "VLLMOptions",
    "load_job",
    "parse_overrides",
    "storage_config",
    "without_keys",
]


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: str
    input: InputConfig
    modes: list[Mode] = Field(default_factory=lambda: ["none", "profile+rag"], min_length=1)
    limit: Int | None = Field(default=None, gt=0, description="take only the first N users")
    output: str = Field(default="runs/{name}/{run_id}", description="run output URI; {name} and {run_id} expand")
    run_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    multi_author: MultiAuthorConfig = Field(default_factory=MultiAuthorConfig)
    profile_store: ProfileStoreConfig = Field(default_factory=ProfileStoreConfig)
    pplug: PPlugConfig = Field(default_factory=PPlugConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    executor: Literal["ray", "in-process"] = Field(
        default="ray",
        description="'in-process': the same passes and stages run one chunk after another in this "
        "process (small jobs, debugging, the fast tests); a dataset input is still "
        "staged by Ray Data first, on a local Ray",
    )
    max_error_fraction: Number = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="a pass whose engine-error rows exceed this share of its rows fails "
        "(exit 3, manifest status failed); a rerun retries exactly those rows",
    )

    _path_notes: dict[str, str] = PrivateAttr(default_factory=dict)
    """How each location given as a relative path was resolved (key -> note), for error messages."""

    def path_note(self, key: str) -> str:
        """`` (written 'x' in JOB.yaml: ...)`` when the location at ``key`` (``input.path``) was written as a
        relative path: what an error about it adds, so that the resolved path it names can be told apart from
        what was written, and the rule that joined them. Empty for a path given in full."""
        note = self._path_notes.get(key)
        return f" ({note})" if note else ""

    @field_validator("name", "run_id", mode="before")
    @classmethod
    def _identifier_as_text(cls, v: Any) -> Any:
        """``--set run_id=$(date +%Y%m%d)`` or ``run_id: 2026-11-22`` in YAML reads as a number or a date: an
        identifier is text, so take it as written."""
        if isinstance(v, _dt.date):  # datetimes too (a subclass)
            return v.isoformat()
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    @model_validator(mode="after")
    def _in_process_needs_no_cluster(self) -> JobSpec:
        """The in-process executor runs the passes in this process: not on a cluster."""
        if self.executor == "in-process" and self.ray.address:
            raise ValueError(
                "executor 'in-process' runs the passes in this process: unset ray.address (or use executor: ray)"
            )
        return self

    @model_validator(mode="after")
    def _cluster_paths_are_shared(self) -> JobSpec:
        """On a cluster the engine actors of other nodes write the chunks: a path only this machine sees would
        scatter them over the nodes' own disks."""
        if self.ray.address and not self.storage.shared_filesystem:
            local = [
                f"{k} {v}"
                for k, v in (("output", self.output), ("profile_store.uri", self.profile_store.uri))
                if v and (not _SCHEME.match(v) or v.startswith("file://"))
            ]
            if local:
                raise ValueError(
                    f"ray.address is set (a cluster) but {' and '.join(local)} is a local path the "
                    "other nodes cannot write to: use object storage (s3://...), or set "
                    "storage.shared_filesystem: true if every node mounts it"
                )
        return self

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        v = TASK_ALIASES.get(v, v)
        if v not in TASKS:
            raise ValueError(f"unknown task {v!r}; known tasks: {', '.join(sorted(TASKS))}")
        return v

    @field_validator("modes")
    @classmethod
    def _unique_modes(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"modes repeat: {v}")
        return v

    @model_validator(mode="after")
    def _lift_gate_needs_golds_and_a_store(self) -> JobSpec:
        """The gate's lift check scores a sample against golds, before a store version is committed."""
        if self.profile_store.gate.min_lift is None:
            return self
        if not self.profile_store.uri:
            raise ValueError("profile_store.gate.min_lift gates a profile store version: set profile_store.uri")
        if self.input.format == "lamp" and not self.input.outputs:
            raise ValueError("profile_store.gate.min_lift scores a sample against golds: set input.outputs")
        if self.input.format != "lamp" and self.input.layout == "item":
            raise ValueError("profile_store.gate.min_lift needs queries with golds: input.layout 'item' has none")
        return self

    @model_validator(mode="after")
    def _pplug_needs_a_checkpoint(self) -> JobSpec:
        if any(mode_spec(m).plug for m in self.modes) and not self.pplug.checkpoint:
            raise ValueError(
                "modes pplug / pplug+profile / pplug-random need pplug.checkpoint (train one with "
                "`stepback train-pplug`)"
            )
        return self

    @model_validator(mode="after")
    def _fill_run_id(self) -> JobSpec:
        if self.run_id is None:
            self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return self

    @model_validator(mode="after")
    def _settings_that_would_fail_every_row(self) -> JobSpec:
        """Combinations that pass field by field but would fail every generation call late (or be ignored)."""
        if self.generation.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens ({self.generation.min_new_tokens}) is above the generation "
                f"length for {self.task} ({self.max_new_tokens}; set generation.max_new_tokens)"
            )
        if (
            self.engine.kind == "vllm"
            and any(mode_spec(m).plug for m in self.modes)
            and not self.engine.vllm.enable_prompt_embeds
        ):
            raise ValueError(
                "modes pplug / pplug+profile on the vllm engine need engine.vllm.enable_prompt_embeds: "
                "true (the soft token goes in as a prompt embedding)"
            )
        if self.engine.kind == "openai" and any(mode_spec(m).plug for m in self.modes):
            raise ValueError(
                "modes pplug / pplug+profile / pplug-random need soft tokens (prompt embeddings), which "
                "the openai engine cannot send over HTTP: use engine.kind vllm or transformers"
            )
        if self.limit is not None and self.input.format != "lamp":
            raise ValueError(
                f"limit applies to LaMP input only; a {self.input.format} dataset is read whole (point "
                "input.path at fewer files to run a part)"
            )
        return self

    @model_validator(mode="after")
    def _output_placeholders(self) -> JobSpec:
        try:
            self.output.format(name="n", run_id="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"output {self.output!r}: only {{name}} and {{run_id}} expand ({type(e).__name__}: "
                f"{e}); write a literal brace as {{{{ or }}}}"
            ) from None
        return self

    @property
    def max_new_tokens(self) -> int:
        """Generation length: the job's setting, else the task's default, else 32."""
        return self.generation.max_new_tokens or TASKS[self.task].max_new_tokens or 32

    @property
    def output_uri(self) -> str:
        return self.output.format(name=self.name, run_id=self.run_id)

    def results_dict(self) -> dict[str, Any]:
        """The spec without the keys of :data:`SPEED_ONLY_KEYS`: what a resumed run must match. The ``openai``
        engine's section only where that engine runs (a run recorded before the section existed still resumes)."""
        data = without_keys(self.public_dict(), SPEED_ONLY_KEYS)
        if self.engine.kind != "openai":
            data["engine"].pop("openai", None)
        return data

    def public_dict(self) -> dict[str, Any]:
        """The spec as plain data with secrets removed: what goes into manifests and logs."""
        data = self.model_dump(mode="json")
        for k in ("key", "secret"):
            if data["storage"].get(k) is not None:
                data["storage"][k] = "***"
        return data


SPEED_ONLY_KEYS = (
    "name",
    "max_error_fraction",
    "engine.batch_size",
    "engine.prefix_order",
    "engine.max_batch_tokens",
    "engine.max_cache_tokens",
    "engine.split_prefill",
    "engine.prefix_reuse",
    "engine.threads",
    "engine.device",
    "engine.call_timeout_s",
    "engine.max_restarts",
    "engine.dry_run_tokens_per_s",
    "engine.dry_run_fail_marker",
    "engine.dry_run_fatal_after",
    "engine.dry_run_hang_after",
    "engine.dry_run_fault_log",
    "engine.vllm.gpu_memory_utilization",
    "engine.vllm.max_num_seqs",
    "engine.vllm.cpu_kv_cache_gb",
    "engine.vllm.cpu_threads_bind",
    "engine.vllm.enforce_eager",
    "engine.vllm.chunked_prefill",
    "engine.vllm.prefix_caching",
    "engine.vllm.block_size",
    "engine.openai.api_key_env",
    "engine.openai.max_concurrency",
    "engine.openai.request_timeout_s",
    "engine.openai.connect_timeout_s",
    "engine.openai.max_retries",
    "engine.openai.backoff_base_s",
    "engine.openai.backoff_max_s",
    "ray.address",
    "ray.engine_actors",
    "ray.engine_actor_cpus",
    "ray.engine_actor_gpus",
    "ray.accelerator_type",
    "ray.engine_tasks_in_flight",
    "ray.engine_coalesce",
    "ray.keep_engines",
    "ray.cpu_stage_actors",
    "ray.stages",
    "ray.object_store_gib",
    "ray.progress_bars",
    "executor",
    "profile_store.keep_versions",
    "storage.retries",
    "storage.key",
    "storage.secret",
    "storage.aws_profile",
    "storage.shared_filesystem",
)
"""Spec keys that change only speed, capacity, fault injection or access, never a result: a run resumed after an
out-of-memory crash with a smaller batch or memory share, a rotated credential or the fault switched off goes on
where it stopped. Every other key (task, input, modes, model, prompts, profile, retrieval, generation, pplug,
``ray.num_shards`` / ``users_per_chunk``, which fix the chunks) must match. Keys a section does not have are
ignored, so the list may name optional ones."""


def without_keys(data: dict[str, Any], dotted: tuple[str, ...]) -> dict[str, Any]:
    """A deep copy of ``data`` without the ``a.b.c`` keys in ``dotted``."""
    out = json.loads(json.dumps(data))
    for key in dotted:
        *path, last = key.split(".")
        node = out
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


# --------------------------------------------------------------------------------------------------- loading

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PATH_KEYS = (
    ("input", "questions"),
    ("input", "outputs"),
    ("input", "path"),
    ("pplug", "train_questions"),
    ("pplug", "train_outputs"),
    ("pplug", "val_questions"),
    ("pplug", "val_outputs"),
)


_LOCATION_KEYS = {
    "input.questions",
    "input.outputs",
    "input.path",
    "output",
    "profile_store.uri",
    "pplug.checkpoint",
    "pplug.train_questions",
    "pplug.train_outputs",
    "pplug.val_questions",
    "pplug.val_outputs",
}


def _is_local_relative(p: str) -> bool:
    return not _SCHEME.match(p) and not os.path.isabs(p)


def _resolve_paths(data: dict[str, Any], base: Path, notes: dict[str, str], source: str) -> None:
    for keys in _PATH_KEYS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and _is_local_relative(node[keys[-1]]):
                notes[".".join(keys)] = (
                    f"written {node[keys[-1]]!r} in {source}: a relative path in a job file is read from the job "
                    "file's folder"
                )
                node[keys[-1]] = os.path.normpath(str(base / node[keys[-1]]))


_SET_RULE = "a relative path on the command line is read from the current directory"


def _resolve_override(key: str, value: Any, notes: dict[str, str]) -> Any:
    """A ``--set`` value with its relative local paths made absolute against the current directory (also those
    inside a section given whole, ``--set input={format: jsonl, path: x}``); ``notes`` says which were."""
    for dotted in [k for k in notes if k == key or k.startswith(key + ".")]:
        del notes[dotted]  # given again on the command line
    if isinstance(value, str):
        if key in _LOCATION_KEYS and _is_local_relative(value):
            notes[key] = f"given as {value!r} with --set: {_SET_RULE}"
            return os.path.abspath(value)
        return value
    if isinstance(value, dict):
        return {k: _resolve_override(f"{key}.{k}", v, notes) for k, v in value.items()}
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-parsed value). ``limit=5`` gives an int, ``modes=[none]`` a list."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def load_job(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> JobSpec:
    """Read a job spec file (or take ``data``), apply ``--set`` overrides and validate everything."""
    source = str(path) if path is not None else "<job spec>"
    notes: dict[str, str] = {}
    if data is None:
        if path is None:
            raise ConfigError("no job spec given")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: job spec not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a job spec is a YAML mapping of keys to values")
        _resolve_paths(data, p.resolve().parent, notes, source)
    else:
        data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, _resolve_override(key, value, notes))
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None
    job._path_notes = notes
    return job


def storage_config(overrides: list[str]) -> StorageConfig:
    """Storage settings alone, from ``storage.KEY=VALUE`` overrides (commands that read a finished run)."""
    data: dict[str, Any] = {}
    for key, value in parse_overrides(overrides):
        if not key.startswith("storage."):
            raise ConfigError(f"--set {key}: only storage.* settings apply here")
        data[key[len("storage.") :]] = value
    try:
        return StorageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error("--set", e).replace("--set: ", "--set storage.")) from None
