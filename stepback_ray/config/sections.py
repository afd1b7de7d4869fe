"""The sections of a job spec (input, profile, retrieval, generation, ray, storage, store, plug; the engine's are in
:mod:`.engine`), each a strict pydantic model: an unknown key or a value of the wrong type is an error naming the
key. :class:`~stepback_ray.config.JobSpec` puts them together."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from stepback_ray.config.fields import SPEED_ONLY, Int, Number, Share, _Strict
from stepback_ray.modes import AUTHOR_STRATEGY_NAMES

AuthorStrategyName = Literal[AUTHOR_STRATEGY_NAMES]  # type: ignore[valid-type]
"""The co-author strategies, declared in :mod:`stepback_ray.modes`."""


class InputConfig(_Strict):
    """Where users and queries come from.

    ``format: lamp`` reads the official LaMP JSON pair (``questions`` + optional ``outputs``). ``parquet`` and
    ``jsonl`` read a dataset (``path``: a file, a folder or a glob, local or object storage) without loading it
    whole: ``layout: user`` has one row per user (``user_id``, ``history`` list of items, optional ``queries``
    list of ``{query_id, input, gold}``); ``layout: item`` has one row per history item (``user_id`` plus the
    item's fields), grouped by user."""

    format: Literal["lamp", "parquet", "jsonl"] = Field(
        default="lamp", description="lamp: the official LaMP JSON pair; parquet or jsonl: a dataset at path"
    )
    questions: str | None = Field(default=None, description="LaMP *_questions.json (local path or fsspec URI)")
    outputs: str | None = Field(default=None, description="LaMP *_outputs.json with golds; omit to only predict")
    path: str | None = Field(default=None, description="dataset location for parquet / jsonl")
    layout: Literal["user", "item"] = Field(
        default="user",
        description="a dataset's rows: user (one row per user, with history and optional queries) or item (one row "
        "per history item, grouped by user; no queries)",
    )

    @model_validator(mode="after")
    def _needs_location(self) -> InputConfig:
        if self.format == "lamp" and not self.questions:
            raise ValueError("format lamp needs input.questions")
        if self.format != "lamp" and not self.path:
            raise ValueError(f"format {self.format} needs input.path")
        return self


class ProfileConfig(_Strict):
    """Step-back profiling: how much history reaches each distillation prompt, and how long the profile is.

    A history longer than ``history_token_budget`` is distilled map-reduce: it is cut (most recent first) into
    parts that each fit the budget, each part gives a partial profile, and partial profiles are merged
    ``merge_fan_in`` at a time until one is left; cost grows linearly with history length."""

    history_token_budget: Int = Field(
        default=768, gt=0, description="history tokens in one step-back prompt; a longer history is cut into parts"
    )
    max_item_tokens: Int = Field(default=160, gt=8, description="each history item is cut to this many tokens")
    max_new_tokens: Int = Field(default=96, gt=0, description="length of one step-back answer (a profile)")
    map_reduce: bool = Field(default=True, description="false: profile only the most recent part of the history")
    max_parts: Int | None = Field(default=None, gt=0, description="cap on parts per user (oldest dropped)")
    merge_fan_in: Int = Field(default=4, ge=2, description="partial profiles merged in one call")
    style_notes: bool = Field(default=False, description="the paper's CoT variant: an LLM style note per item")
    note_max_new_tokens: Int = Field(default=32, gt=0, description="length of one style note (style_notes)")
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

    method: Literal["bm25", "dense"] = Field(
        default="bm25", description="BM25 over the user's own items, or dense (the sentence encoder dense_model)"
    )
    top_k: Int = Field(default=2, ge=0, le=64, description="history items shown with each query")
    max_item_tokens: Int = Field(default=200, gt=8, description="each retrieved item is cut to this many tokens")
    dense_model: str = Field(default="packaged:all-minilm-l6-v2", description="the encoder of method dense")


class MultiAuthorConfig(_Strict):
    """Co-authored outputs (PSW): how the authors of one query are combined, one of the strategies declared in
    :data:`stepback_ray.modes.AUTHOR_STRATEGIES` (each one's fields say what it does)."""

    strategy: AuthorStrategyName = Field(
        default="byline-rag", description="how a co-authored query is written (the strategies: the table below)"
    )
    byline_decay: Number = Field(
        default=0.7,
        gt=0.0,
        le=1.0,
        description="byline-rag: an item's retrieval score times this to the power of its author's byline position "
        "(the lead 0, the next 1, ...; an item several authors hold takes the best); 1: every author alike",
    )


class GenerationConfig(_Strict):
    max_new_tokens: Int | None = Field(default=None, gt=0, description="default: the task's (32 for most)")
    min_new_tokens: Int = Field(default=0, ge=0, description="with stop: [] and min = max: fixed-length outputs")
    stop: list[str] | None = Field(default=None, description="stop strings; default: the task's")
    temperature: Number = Field(default=0.0, ge=0.0, le=5.0, description="0: greedy decoding")
    top_p: Number = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling (with a temperature above 0)")
    seed: Int = Field(
        default=0, description="sampling seed; it also picks the donors of random-profile and pplug-random"
    )
    candidates: Int = Field(
        default=1,
        ge=1,
        le=32,
        description="answers per query: the decoded one plus "
        "candidates - 1 sampled, one kept by consensus and "
        "(profile modes) agreement with the person",
    )
    candidate_temperature: Number = Field(default=0.7, gt=0.0, le=5.0, description="sampling of the extra candidates")
    candidate_top_p: Number = Field(default=0.95, gt=0.0, le=1.0, description="sampling of the extra candidates")


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

    address: str | None = Field(
        default=None,
        description="a cluster to join (auto on a cluster node, host:port, ray://host:port); null: a local Ray of "
        "the job's own, unless Ray Jobs set RAY_ADDRESS",
        json_schema_extra=SPEED_ONLY,
    )
    engine_actors: Int | Literal["auto"] = Field(
        default=1,
        description="engine actors; 'auto': one per GPU (or per tensor-parallel group)",
        json_schema_extra=SPEED_ONLY,
    )
    engine_actor_cpus: Number = Field(
        default=1.0, ge=0.0, description="CPUs per engine actor", json_schema_extra=SPEED_ONLY
    )
    engine_actor_gpus: Number = Field(
        default=0.0, ge=0.0, description="GPUs per engine actor (1 in production)", json_schema_extra=SPEED_ONLY
    )
    accelerator_type: str | None = Field(
        default=None, description="pin engine actors to a GPU type, e.g. H100", json_schema_extra=SPEED_ONLY
    )
    engine_tasks_in_flight: Int = Field(
        default=2, gt=0, description="blocks queued at each engine actor", json_schema_extra=SPEED_ONLY
    )
    engine_coalesce: bool = Field(
        default=True,
        description="an engine actor serves its blocks in flight side by "
        "side and sends their prompts as one engine call (engines/coalesce.py)",
        json_schema_extra=SPEED_ONLY,
    )
    keep_engines: bool = Field(
        default=True,
        description="engine actors started once per run and kept across its "
        "passes (pipeline/engine_host.py); false: each pass starts its own in Ray Data",
        json_schema_extra=SPEED_ONLY,
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

    cpu_stage_actors: Int = Field(
        default=1, gt=0, description="actors for prompt building (tokenizer, retrieval)", json_schema_extra=SPEED_ONLY
    )
    object_store_gib: Number | None = Field(
        default=None,
        gt=0,
        description="local Ray only: object store size (Ray's default: 30 % of RAM); a "
        "cluster's is set where its nodes start (cluster.yaml)",
        json_schema_extra=SPEED_ONLY,
    )
    progress_bars: bool = Field(default=True, description="Ray Data's progress bars", json_schema_extra=SPEED_ONLY)
    stages: dict[str, StageResources] = Field(
        default_factory=dict,
        description="per CPU or commit stage, by the name its pass declares (stepback_ray.pipeline; an "
        "unknown name is refused with the list); the engine stages use the ray.engine_* keys",
        json_schema_extra=SPEED_ONLY,
    )


class StorageConfig(_Strict):
    """Object-storage settings. Anything left unset comes from the standard AWS environment / profile.
    Secrets are never printed and never written to the manifest."""

    endpoint_url: str | None = Field(default=None, description="an S3 endpoint (S3-compatible stores too)")
    region: str | None = Field(default=None, description="the object store's region")
    aws_profile: str | None = Field(
        default=None, description="a profile of the AWS configuration files", json_schema_extra=SPEED_ONLY
    )
    key: SecretStr | None = Field(
        default=None, description="access key id (never printed; *** in manifests)", json_schema_extra=SPEED_ONLY
    )
    secret: SecretStr | None = Field(
        default=None, description="secret access key (never printed; *** in manifests)", json_schema_extra=SPEED_ONLY
    )
    anon: bool = Field(default=False, description="anonymous access (public buckets)")
    retries: Int = Field(
        default=5,
        ge=0,
        description="retries of a failed storage request (throttling, 5xx, "
        "timeouts, lost connections), with jittered exponential backoff; "
        "one layer retries each failure (storage.py)",
        json_schema_extra=SPEED_ONLY,
    )
    shared_filesystem: bool = Field(
        default=False,
        description="on a cluster, local paths (output, store) are on a filesystem every node mounts (NFS, Lustre)",
        json_schema_extra=SPEED_ONLY,
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

    uri: str | None = Field(
        default=None, description="where the store lives (a local path or s3://...); null: no store"
    )
    incremental: bool = Field(default=True, description="grown histories: old profile + new items -> new profile")
    full_rebuild_every: Int = Field(default=7, ge=1, description="every N-th run recomputes every profile")
    keep_versions: Int = Field(
        default=14,
        ge=1,
        description="after each commit, finished versions beyond the newest "
        "N are deleted (never the current one, nor one a run "
        "in progress builds on)",
        json_schema_extra=SPEED_ONLY,
    )
    gate: StoreGateConfig = Field(default_factory=StoreGateConfig)


class PPlugConfig(_Strict):
    """Persona-Plug: the checkpoint to serve (``pplug`` modes), and the training settings of
    ``stepback train-pplug``."""

    checkpoint: str | None = Field(default=None, description="output URI of a `stepback train-pplug` run")
    encoder: str = Field(default="packaged:all-minilm-l6-v2", description="the frozen sentence encoder")
    encoder_max_tokens: Int = Field(
        default=128,
        gt=8,
        description="items and queries cut to this many encoder tokens (title and the start of the text)",
    )
    max_items: Int = Field(default=64, gt=0, description="newest history items per user")
    max_input_tokens: Int = Field(default=160, gt=8, description="training: task input cut to this many tokens")
    train_questions: str | None = Field(default=None, description="training set: LaMP *_questions.json")
    train_outputs: str | None = Field(default=None, description="training set's golds (required for training)")
    val_questions: str | None = Field(
        default=None, description="a validation set (LaMP); null: val_users taken from the training set"
    )
    val_outputs: str | None = Field(default=None, description="validation set's golds")
    val_users: Int = Field(
        default=100,
        gt=0,
        description="validation users: drawn at random from the training set, or the first N of val_questions",
    )
    max_train_users: Int | None = Field(
        default=None, gt=0, description="train on at most N users (after the validation split); null: all"
    )
    epochs: Number = Field(default=1.0, gt=0, description="passes over the training users (a fraction too)")
    batch_size: Int = Field(default=8, gt=0, description="training examples per step")
    lr: Number = Field(default=1e-3, gt=0, description="AdamW learning rate (linear warm-up and decay)")
    weight_decay: Number = Field(default=1e-4, ge=0, description="AdamW weight decay")
    eval_every: Int = Field(default=25, gt=0, description="steps between validations (and resume snapshots)")
    seed: Int = Field(
        default=0, description="the validation split, the order users are visited in and the initialization"
    )
