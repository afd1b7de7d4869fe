"""The job spec as a whole (:class:`JobSpec`: its sections, the checks across them), and which of its keys change
results: every key but those marked speed-only on their fields (:func:`speed_only_keys`)."""

from __future__ import annotations

import datetime as _dt
import functools
import json
import re
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from stepback_ray.config.engine import EngineConfig
from stepback_ray.config.fields import SPEED_ONLY, Int, Number, _Strict, marked_keys
from stepback_ray.config.sections import (
    GenerationConfig,
    InputConfig,
    MultiAuthorConfig,
    PPlugConfig,
    ProfileConfig,
    ProfileStoreConfig,
    RayConfig,
    RetrievalConfig,
    StorageConfig,
)
from stepback_ray.modes import MODE_NAMES, mode_spec
from stepback_ray.tasks import TASK_ALIASES, TASKS

Mode = Literal[MODE_NAMES]
"""Generation modes, declared in :mod:`stepback_ray.modes`. ``none``: input only. ``rag``: retrieved history items.
``profile``: the step-back profile. ``profile+rag``: both (the Step-Back Profiling method). ``random-profile``:
``profile+rag`` with another user's profile and history (the paper's control: same prompt format, wrong person).
``pplug``: the input with a Persona-Plug soft token (needs ``pplug.checkpoint``). ``pplug+profile``: the soft token
and the step-back profile. ``pplug-random``: the input with another user's soft token."""

URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
"""A location with a scheme (``s3://...``, ``file://...``): not a local path."""


class JobSpec(_Strict):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the run's name ({name} in output)",
        json_schema_extra=SPEED_ONLY,
    )
    task: str = Field(
        description="LaMP_1 ... LaMP_7, LaMP_2_news (the older news LaMP_2), PSW_title or PSW_abstract; the dashed "
        "names (LaMP-5, LaMP-2-old) too"
    )
    input: InputConfig
    modes: list[Mode] = Field(
        default_factory=lambda: ["none", "profile+rag"],
        min_length=1,
        description="the generation modes to run, each once (stepback_ray/modes.py says what each prompt holds)",
    )
    limit: Int | None = Field(default=None, gt=0, description="take only the first N users")
    output: str = Field(default="runs/{name}/{run_id}", description="run output URI; {name} and {run_id} expand")
    run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the run's id ({run_id} in output); null: the UTC start time, YYYYMMDDTHHMMSSZ. Rerunning "
        "with the same run_id and output resumes the run: committed chunks are skipped",
    )
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
        json_schema_extra=SPEED_ONLY,
    )
    max_error_fraction: Number = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="a pass whose engine-error rows exceed this share of its rows fails "
        "(exit 3, manifest status failed); a rerun retries exactly those rows",
        json_schema_extra=SPEED_ONLY,
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
                if v and (not URI_SCHEME.match(v) or v.startswith("file://"))
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
        """The spec without its :func:`speed_only_keys`: what a resumed run must match. The ``openai`` engine's
        section only where that engine runs (a run recorded before the section existed still resumes)."""
        data = without_keys(self.public_dict(), speed_only_keys())
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


@functools.cache
def speed_only_keys() -> tuple[str, ...]:
    """The spec's dotted keys marked speed-only on their fields (``json_schema_extra=SPEED_ONLY``, see
    :mod:`.fields`): they change only speed, capacity, fault injection or access, never a result, so they may
    differ when a run resumes (a smaller batch after an out-of-memory crash, a rotated credential, the fault
    switched off). Every other key (task, input, modes, model, prompts, profile, retrieval, generation, pplug,
    ``ray.num_shards`` / ``users_per_chunk``, which fix the chunks) must match."""
    return marked_keys(JobSpec)


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
