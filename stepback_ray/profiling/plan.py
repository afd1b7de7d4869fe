"""Planning a profile (CPU, tokenizer only): history items, most recent first, cut and packed into parts that fit
the step-back prompt; what is measured rather than distilled (habits, exemplars); and the fingerprint that says
whether a stored profile is still valid."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from stepback_ray.config import EngineConfig, ProfileConfig
from stepback_ray.data.rows import most_recent_first
from stepback_ray.engines.base import PromptTools
from stepback_ray.profiling.prompts import PROMPT_VERSION, profile_messages
from stepback_ray.tasks import TaskSpec


@dataclass
class SelectedItem:
    item_id: str
    text: str
    tokens: int


@dataclass
class ProfilePlan:
    """What the LLM will see for one user: the history cut into parts, newest part first."""

    user_id: str
    parts: list[list[SelectedItem]]
    items_total: int
    items_dropped: int = 0
    base_profile: dict[str, Any] | None = None
    """Incremental update: the user's previous profile, merged with the profiles of the (new) parts."""
    base_item_ids: list[str] = field(default_factory=list)
    """Incremental update: the items the previous profile was built from."""
    habits: list[str] = field(default_factory=list)
    """Facts measured from the whole history (:mod:`~stepback_ray.tasks.habits`), kept beside the LLM's fields."""
    exemplars: list[str] = field(default_factory=list)
    """The user's newest own texts (``profile.exemplars``), listed in the profile."""

    @property
    def items_used(self) -> int:
        return sum(len(p) for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "items_total": self.items_total,
            "items_dropped": self.items_dropped,
            "parts": [[vars(s) for s in part] for part in self.parts],
            "base_profile": self.base_profile,
            "base_item_ids": self.base_item_ids,
            "habits": self.habits,
            "exemplars": self.exemplars,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfilePlan:
        return cls(
            d["user_id"],
            [[SelectedItem(**s) for s in part] for part in d["parts"]],
            d["items_total"],
            d["items_dropped"],
            d.get("base_profile"),
            list(d.get("base_item_ids") or []),
            list(d.get("habits") or []),
            list(d.get("exemplars") or []),
        )


def part_budget(task: TaskSpec, config: ProfileConfig, tools: PromptTools) -> int:
    """History tokens per prompt: the configured budget, shrunk if needed so that the prompt (instruction and
    worked examples included) and the answer fit the model's context."""
    overhead = (
        tools.count_tokens(tools.render(profile_messages(task, [], example=config.example))) + config.max_new_tokens + 8
    )
    return max(16, min(config.history_token_budget, tools.max_context - overhead))


def plan_profile(
    user_id: str,
    history: list[dict[str, str]],
    task: TaskSpec,
    config: ProfileConfig,
    tools: PromptTools,
    budget: int | None = None,
) -> ProfilePlan:
    """Pack the history, newest first, into parts of at most :func:`part_budget` tokens each (``budget``: that
    value, computed once by a caller that plans many users; it renders and tokenizes a whole prompt)."""
    budget = part_budget(task, config, tools) if budget is None else budget
    parts: list[list[SelectedItem]] = []
    current: list[SelectedItem] = []
    used = 0
    ordered = most_recent_first(history)
    cut = tools.cut_many([task.profile_item(it) for it in ordered], min(config.max_item_tokens, budget - 2))
    for item, (text, n) in zip(ordered, cut):
        n += 2  # the blank line between items
        if current and used + n > budget:
            parts.append(current)
            current, used = [], 0
        current.append(SelectedItem(item["id"], text, n))
        used += n
    if current:
        parts.append(current)
    keep = 1 if not config.map_reduce else (config.max_parts or len(parts))
    kept = parts[:keep]
    dropped = sum(len(p) for p in parts[keep:])
    return ProfilePlan(
        user_id,
        kept,
        len(history),
        dropped,
        habits=measure_habits(history, task, config),
        exemplars=exemplars(history, task, config),
    )


RECENT_ITEMS = 5


def recent_items(history: list[dict[str, str]], task: TaskSpec, n: int = RECENT_ITEMS) -> list[str]:
    """The user's newest items in a few words each (their own output of the task's kind where the items hold one,
    as a paper's title; else the start of the item): what a reader checks a profile against."""
    field = getattr(task.habits, "field", None)
    return [(it.get(field) if field else None) or task.corpus_text(it)[:120] for it in most_recent_first(history)[:n]]


def measure_habits(history: list[dict[str, str]], task: TaskSpec, config: ProfileConfig) -> list[str]:
    """The task's habits measured over the whole history (none if the job turned them off or the task has none)."""
    return task.habits(history) if config.habits and task.habits is not None else []


def exemplars(history: list[dict[str, str]], task: TaskSpec, config: ProfileConfig) -> list[str]:
    """The user's ``config.exemplars`` newest own texts of the task's kind (none for tasks whose items hold no
    text output: labels and ratings are summed up by the habits instead)."""
    pick = getattr(task.habits, "exemplars", None)
    return pick(most_recent_first(history), config.exemplars) if config.exemplars and pick else []


PROFILE_ENGINE_KEYS = (
    "kind",
    "model",
    "dtype",
    "load_format",
    "max_model_len",
    "prompt_family",
    "vllm.structured_output",
)
"""Engine settings that change what a profile says (the model, how it is decoded and what it is shown); the
others (batch sizes, memory, timeouts) change only speed and leave a stored profile valid."""


def engine_identity(engine: EngineConfig) -> dict[str, Any]:
    """The :data:`PROFILE_ENGINE_KEYS` of an engine config, as plain data."""
    data = engine.model_dump(mode="json")
    out = {}
    for key in PROFILE_ENGINE_KEYS:
        node: Any = data
        for k in key.split("."):
            node = node[k]
        out[key] = node
    if engine.kind == "openai":  # only then: the identities (fingerprints) of the other engines stay as they were
        out["openai.structured_output"] = data["openai"]["structured_output"]
    if engine.kind == "dry-run" and engine.tokenizer:  # it counts with another tokenizer: other cuts, other rows
        out["tokenizer"] = engine.tokenizer
    return out


def fingerprint(history: list[dict[str, str]], engine: EngineConfig, config: ProfileConfig, task: str) -> str:
    """Identity of a profile: same history, engine identity, prompt version and settings -> same fingerprint."""
    canon = json.dumps(
        {
            "history": sorted(history, key=lambda it: json.dumps(it, sort_keys=True)),
            "engine": engine_identity(engine),
            "prompt": PROMPT_VERSION,
            "task": task,
            "config": config.model_dump(mode="json"),
        },
        sort_keys=True,
    )
    return hashlib.sha256(canon.encode()).hexdigest()[:32]
