"""Step-back profiling: distill a user's history into a short profile with named fields.

The paper asks an LLM to "step back" from a user's individual documents and describe the person: recurring
keywords, topics, writing style. Here:

1. **Plan** (CPU, tokenizer only): history items, most recent first, each cut to ``max_item_tokens``, packed into
   parts that fit ``history_token_budget``. Every item of a part is rendered into that part's prompt.
2. **Distill** (engine): one prompt per part (a worked example, the part's items, the answer prefilled up to the
   first JSON field, which keeps small models on format). A user with several parts gets partial profiles that
   are merged ``merge_fan_in`` at a time until one is left (map-reduce: cost linear in history length).
   Optionally (the paper's CoT variant) each item first gets a one-line style note from the LLM, shown beside it.
   Each level runs as one batched engine call over every user of the chunk.
3. **Parse** the JSON robustly: ``json_repair`` first, then a keyword fallback; never raise.

The fingerprint of (history, model, prompt version, profile settings) identifies a profile, so unchanged users
can be carried over instead of recomputed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import json_repair

from .config import EngineConfig, ProfileConfig
from .data.rows import status_kind
from .engines.base import Completion, Message, PromptTools, SamplingParams
from .tasks import ProfileSchema, TaskSpec

PROMPT_VERSION = "stepback-profile/3"
MAX_LIST = 8
MAX_FIELD_CHARS = 240
PROFILE_STOP = ("}",)


# ---------------------------------------------------------------------------------------------- planning
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
    """Facts measured from the whole history (:mod:`~stepback_ray.history_facts`), kept beside the LLM's fields."""
    exemplars: list[str] = field(default_factory=list)
    """The user's newest own texts (``profile.exemplars``), listed in the profile."""

    @property
    def items_used(self) -> int:
        return sum(len(p) for p in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "items_total": self.items_total, "items_dropped": self.items_dropped,
                "parts": [[vars(s) for s in part] for part in self.parts], "base_profile": self.base_profile,
                "base_item_ids": self.base_item_ids, "habits": self.habits, "exemplars": self.exemplars}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProfilePlan":
        return cls(d["user_id"], [[SelectedItem(**s) for s in part] for part in d["parts"]], d["items_total"],
                   d["items_dropped"], d.get("base_profile"), list(d.get("base_item_ids") or []),
                   list(d.get("habits") or []), list(d.get("exemplars") or []))


def _date_key(item: dict[str, str]) -> float:
    raw = (item.get("date") or "").strip()
    for n, fmt in ((10, "%Y-%m-%d"), (7, "%Y-%m"), (4, "%Y")):
        try:
            return _dt.datetime.strptime(raw[:n], fmt).timestamp()
        except ValueError:
            continue
    return float("-inf")


def most_recent_first(items: list[dict[str, str]]) -> list[dict[str, str]]:
    """Items by date, newest first; undated items keep their order after the dated ones."""
    indexed = list(enumerate(items))
    indexed.sort(key=lambda p: (-_date_key(p[1]), p[0]))
    return [it for _, it in indexed]


def part_budget(task: TaskSpec, config: ProfileConfig, tools: PromptTools) -> int:
    """History tokens per prompt: the configured budget, shrunk if needed so that the prompt (instruction and
    worked example included) and the answer fit the model's context."""
    overhead = (tools.count_tokens(tools.render(profile_messages(task, [], example=config.example == "worked")))
                + config.max_new_tokens + 8)
    return max(16, min(config.history_token_budget, tools.max_context - overhead))


def plan_profile(user_id: str, history: list[dict[str, str]], task: TaskSpec, config: ProfileConfig,
                 tools: PromptTools, budget: int | None = None) -> ProfilePlan:
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
    return ProfilePlan(user_id, kept, len(history), dropped, habits=measure_habits(history, task, config),
                       exemplars=exemplars(history, task, config))


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


# ---------------------------------------------------------------------------------------------- prompts
def _field_is_list(schema: ProfileSchema, name: str) -> bool:
    return isinstance(schema.example_profile.get(name), list)


def prefill_for(schema: ProfileSchema) -> str:
    first = schema.fields[0]
    return '{"' + first + '": ["' if _field_is_list(schema, first) else '{"' + first + '": "'


def json_schema(schema: ProfileSchema) -> dict[str, Any]:
    """The profile as a JSON schema, for engines that decode under one (the prefill is then not needed)."""
    props = {name: ({"type": "array", "items": {"type": "string"}, "maxItems": MAX_LIST}
                    if _field_is_list(schema, name) else {"type": "string"}) for name in schema.fields}
    return {"type": "object", "properties": props, "required": list(schema.fields), "additionalProperties": False}


def _answer(schema: ProfileSchema, prefill: bool) -> list[Message]:
    return [{"role": "assistant", "content": prefill_for(schema)}] if prefill else []


def profile_messages(task: TaskSpec, items: list[str], prefill: bool = True, example: bool = True) -> list[Message]:
    """The step-back prompt: instruction, a worked example (``example``), the user's items, and (for engines that
    cannot decode under a JSON schema) the answer prefilled up to the first field."""
    schema = task.profile
    shown: list[Message] = [{"role": "user", "content": "\n\n".join(schema.example_items)},
                            {"role": "assistant", "content": json.dumps(schema.example_profile)}] if example else []
    return [
        {"role": "system", "content": schema.instruction},
        *shown,
        {"role": "user", "content": "\n\n".join(items)},
        *_answer(schema, prefill),
    ]


def _split_example(schema: ProfileSchema) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two partial profiles whose merge is the schema's example profile (for the merge prompt's worked example)."""
    a, b = {}, {}
    for name in schema.fields:
        v = schema.example_profile[name]
        if isinstance(v, list):
            half = max(1, len(v) // 2)
            a[name], b[name] = v[:half], v[half:] or v[:1]
        else:
            a[name] = b[name] = v
    return a, b


def merge_messages(task: TaskSpec, partials: list[dict[str, Any]], prefill: bool = True,
                   example: bool = True) -> list[Message]:
    """Merge partial profiles of one person (newest part first) into one profile."""
    schema = task.profile

    def listing(profiles: list[dict[str, Any]]) -> str:  # the LLM's fields only (habits are measured, not merged)
        return "\n".join(f"Profile {i + 1}: {json.dumps({k: p.get(k) for k in schema.fields})}"
                         for i, p in enumerate(profiles))

    shown: list[Message] = [{"role": "user", "content": listing(list(_split_example(schema)))},
                            {"role": "assistant", "content": json.dumps(schema.example_profile)}] if example else []
    return [
        {"role": "system", "content": (f"You merge profiles of the same {schema.person}, each distilled from a "
                                       f"different period of their history (most recent first), into one profile. "
                                       f"Keep what recurs and what is recent. "
                                       f"{schema.instruction.split('. ', 1)[1]}")},
        *shown,
        {"role": "user", "content": listing(partials)},
        *_answer(schema, prefill),
    ]


def note_messages(task: TaskSpec, item_text: str) -> list[Message]:
    """The CoT variant's per-item style note: tone, length and style features in one line."""
    person = task.profile.person
    return [
        {"role": "system", "content": f"You describe how a {person} writes. In one short line, name the tone, the "
                                      f"length and the style features of the {person}'s text below."},
        {"role": "user", "content": item_text},
    ]


# ---------------------------------------------------------------------------------------------- parsing
def _as_list(value: Any) -> list[str]:
    out: list[str] = []

    def add(v: Any) -> None:
        if isinstance(v, (list, tuple)):
            for x in v:
                add(x)
        elif isinstance(v, dict):
            for x in v.values():
                add(x)
        elif v is not None:
            for part in str(v).split(","):
                part = part.strip().strip("\"'").strip()
                if part:
                    out.append(part[:MAX_FIELD_CHARS])

    add(value)
    seen, uniq = set(), []
    for x in out:
        if x.lower() not in seen:
            seen.add(x.lower())
            uniq.append(x)
    return uniq[:MAX_LIST]


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "; ".join(_as_list(value))[:MAX_FIELD_CHARS]
    return ("" if value is None else str(value)).strip()[:MAX_FIELD_CHARS]


def parse_profile(completion: str, schema: ProfileSchema, prefilled: bool = True) -> tuple[dict[str, Any], str]:
    """Parse the model's answer (which continues the prefill, if there was one) into the schema's fields.

    Returns the profile and a status: ``ok`` (every field present and non-empty), ``partial`` (some fields
    missing) or ``fallback`` (no JSON object could be recovered; quoted phrases become keywords).
    """
    text = (prefill_for(schema) if prefilled else "") + completion
    try:
        obj = json_repair.loads(text)
    except Exception:  # noqa: BLE001 - json_repair is best effort; fall through to the fallback
        obj = None
    if isinstance(obj, list):
        obj = next((x for x in obj if isinstance(x, dict)), None)
    profile: dict[str, Any] = {}
    if isinstance(obj, dict):
        for name in schema.fields:
            value = obj.get(name)
            profile[name] = _as_list(value) if _field_is_list(schema, name) else _as_text(value)
        filled = sum(1 for name in schema.fields if profile[name])
        return profile, "ok" if filled == len(schema.fields) else "partial"
    phrases = re.findall(r'"([^"\n]{2,80})"', text)
    for name in schema.fields:
        profile[name] = [] if _field_is_list(schema, name) else ""
    first_list = next((f for f in schema.fields if _field_is_list(schema, f)), None)
    if first_list:
        profile[first_list] = _as_list([p for p in phrases if p not in schema.fields])
    return profile, "fallback"


def render_profile(profile: dict[str, Any], task: TaskSpec, habits: bool = True) -> str:
    """The profile as labelled lines for a generation prompt (empty fields left out): the LLM's fields, then (with
    ``habits``) the habits measured from the history (``profile["habits"]``) under the task's label for them."""
    schema = task.profile
    lines = []
    for name in schema.fields:
        value = profile.get(name)
        if isinstance(value, list):
            value = ", ".join(value)
        if value:
            lines.append(f"{schema.labels.get(name, name)}: {value}")
    if habits and profile.get("habits") and task.habits is not None:
        lines.append(f"{task.habits.label}: {'; '.join(profile['habits'])}")
    if habits and profile.get("exemplars") and task.habits is not None:
        noun = getattr(task.habits, "noun", "texts")
        lines.append(f"{noun.capitalize()} this {schema.person} wrote: " + "; ".join(profile["exemplars"]))
    return "\n".join(lines)


PROFILE_ENGINE_KEYS = ("kind", "model", "dtype", "load_format", "max_model_len", "prompt_family",
                       "vllm.structured_output")
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
    return out


def fingerprint(history: list[dict[str, str]], engine: EngineConfig, config: ProfileConfig, task: str) -> str:
    """Identity of a profile: same history, engine identity, prompt version and settings -> same fingerprint."""
    canon = json.dumps({"history": sorted(history, key=lambda it: json.dumps(it, sort_keys=True)),
                        "engine": engine_identity(engine), "prompt": PROMPT_VERSION, "task": task,
                        "config": config.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------- distilling
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
    completion_tokens: int = 0
    engine_seconds: float = 0.0
    prompt: str | None = None
    """The last prompt sent for this user (the merge prompt for a map-reduced history)."""


class Distiller:
    """Runs the profile DAG (notes -> parts -> merges) for many users, one batched engine call per level."""

    def __init__(self, task: TaskSpec, config: ProfileConfig, tools: PromptTools, generate: Generate):
        self.task, self.config, self.tools, self.generate = task, config, tools, generate
        self.prefill = not getattr(tools, "supports_json_schema", False)
        self.example = config.example == "worked"
        self.profile_params = (SamplingParams(max_new_tokens=config.max_new_tokens, stop=PROFILE_STOP) if self.prefill
                               else SamplingParams(max_new_tokens=config.max_new_tokens,
                                                   json_schema=json_schema(task.profile)))
        self.note_params = SamplingParams(max_new_tokens=config.note_max_new_tokens, stop=("\n",))

    def _call(self, jobs: list[tuple[ProfileResult, list[Message]]], params: SamplingParams) -> list[Completion]:
        prompts = [self.tools.render(m) for _, m in jobs]
        done = self.generate(prompts, params) if prompts else []
        for (res, _), prompt, c in zip(jobs, prompts, done):
            res.llm_calls += 1
            res.prompt_tokens += c.prompt_tokens
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
                texts = [s.text + (f"\nStyle: {res.notes[s.item_id]}" if s.item_id in res.notes else "")
                         for s in part]
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
                batches = [level[i:i + fan] for i in range(0, len(level), fan)]
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
