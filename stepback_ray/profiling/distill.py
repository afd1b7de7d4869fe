"""Distilling on the engine: each level (style notes, part profiles, merges) one batched call over every planned
user of a chunk; failures kept as statuses, never raised."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stepback_ray.config import ProfileConfig
from stepback_ray.data.rows import status_kind
from stepback_ray.engines.base import Completion, Message, PromptTools, SamplingParams
from stepback_ray.profiling.plan import ProfilePlan
from stepback_ray.profiling.prompts import (
    PROFILE_STOP,
    json_schema,
    merge_messages,
    note_messages,
    parse_profile,
    profile_messages,
)
from stepback_ray.tasks import TaskSpec

Generate = Callable[[list[str], SamplingParams], list[Completion]]


@dataclass
class ProfileResult:
    user_id: str
    profile: dict[str, Any] | None
    status: str
    raw_output: str | None = None
    partials: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)
    llm_calls: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    prompt: str | None = None
    """The last prompt sent for this user (the merge prompt for a map-reduced history)."""


class Distiller:
    """Runs the profile DAG (notes -> parts -> merges) for many users, one batched engine call per level."""

    def __init__(self, task: TaskSpec, config: ProfileConfig, tools: PromptTools, generate: Generate):
        self.task, self.config, self.tools, self.generate = task, config, tools, generate
        self.prefill = not getattr(tools, "supports_json_schema", False)
        self.example = config.example
        self.profile_params = (
            SamplingParams(max_new_tokens=config.max_new_tokens, stop=PROFILE_STOP)
            if self.prefill
            else SamplingParams(max_new_tokens=config.max_new_tokens, json_schema=json_schema(task.profile))
        )
        self.note_params = SamplingParams(max_new_tokens=config.note_max_new_tokens, stop=("\n",))

    def _call(self, jobs: list[tuple[ProfileResult, list[Message]]], params: SamplingParams) -> list[Completion]:
        prompts = [self.tools.render(m) for _, m in jobs]
        done = self.generate(prompts, params) if prompts else []
        for (res, _), prompt, c in zip(jobs, prompts, done):
            res.llm_calls += 1
            res.prompt_tokens += c.prompt_tokens
            res.cached_prompt_tokens += c.cached_tokens
            res.completion_tokens += c.completion_tokens
            res.engine_seconds += c.seconds
            res.prompt = prompt
        return done

    def run(self, plans: list[ProfilePlan]) -> list[ProfileResult]:
        schema = self.task.profile
        results = [ProfileResult(p.user_id, None, "skipped: empty history") for p in plans]
        active = [(p, r) for p, r in zip(plans, results) if p.parts]
        if self.config.style_notes:
            jobs, keys = [], []
            for plan, res in active:
                for part in plan.parts:
                    for s in part:
                        jobs.append((res, note_messages(self.task, s.text)))
                        keys.append((res, s))
            for (res, s), c in zip(keys, self._call(jobs, self.note_params)):
                note = " ".join(c.text.split())
                if note and not c.error:
                    res.notes[s.item_id] = note
        # map: one partial profile per part
        jobs, owners = [], []
        for plan, res in active:
            for part in plan.parts:
                texts = [s.text + (f"\nStyle: {res.notes[s.item_id]}" if s.item_id in res.notes else "") for s in part]
                jobs.append((res, profile_messages(self.task, texts, self.prefill, self.example)))
                owners.append(res)
        pending: dict[int, list[tuple[dict[str, Any], str, str | None]]] = {id(r): [] for _, r in active}
        for res, c in zip(owners, self._call(jobs, self.profile_params)):
            prof, status = parse_profile(c.text, schema, self.prefill) if not c.error else ({}, f"error: {c.error}")
            res.partials.append(prof)
            pending[id(res)].append((prof, status, c.text))
        for plan, res in active:  # incremental: the previous profile joins as the oldest partial
            if plan.base_profile:
                pending[id(res)].append((plan.base_profile, "ok", None))
        _keep_failures(pending, active)
        # reduce: merge fan_in partials at a time until each user has one profile
        while True:
            jobs, groups = [], []
            for _, res in active:
                level = pending[id(res)]
                if len(level) <= 1:
                    continue
                fan = self.config.merge_fan_in
                batches = [level[i : i + fan] for i in range(0, len(level), fan)]
                pending[id(res)] = []
                for b in batches:
                    if len(b) == 1:
                        pending[id(res)].append(b[0])
                    else:
                        jobs.append((res, merge_messages(self.task, [x[0] for x in b], self.prefill, self.example)))
                        groups.append(res)
            if not jobs:
                break
            merged: dict[int, list] = {}
            for res, c in zip(groups, self._call(jobs, self.profile_params)):
                prof, status = parse_profile(c.text, schema, self.prefill) if not c.error else ({}, f"error: {c.error}")
                merged.setdefault(id(res), []).append((prof, status, c.text))
            for _, res in active:
                pending[id(res)] = merged.get(id(res), []) + pending[id(res)]
            _keep_failures(pending, active)
        for _, res in active:
            prof, status, raw = pending[id(res)][0]
            res.profile, res.status, res.raw_output = (prof or None), status, raw
        return results


def _keep_failures(pending: dict[int, list[tuple[dict[str, Any], str, str | None]]], active: list) -> None:
    """A user with a failed call (map or merge) ends with that failure: merging the partials that did come back
    would give a profile of part of the history under the fingerprint of all of it (and carry it over on later
    runs); failed, it is retried on the next run."""
    for _, res in active:
        failed = next((x for x in pending[id(res)] if status_kind(x[1]) == "error"), None)
        if failed is not None:
            pending[id(res)] = [failed]
