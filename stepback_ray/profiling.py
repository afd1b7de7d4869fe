"""Step-back profiling: distill a user's history into a short profile with named fields.

The paper asks an LLM to "step back" from a user's individual documents and describe the person: recurring
keywords, research topics, writing style. Here that is one LLM call per user:

1. **Select** history items, most recent first, each cut to ``max_item_tokens``, until the token budget is used;
   every selected item is rendered into the prompt (nothing is silently cut after selection).
2. **Prompt** with a fixed worked example (a chat turn showing the JSON we want) and the selected items, with the
   answer prefilled up to the first field, which keeps small models on format.
3. **Parse** the JSON robustly: ``json_repair`` first, then a keyword fallback; never raise.

The fingerprint of (history, model, prompt version, profile settings) identifies a profile, so unchanged users
can be carried over instead of recomputed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import json_repair

from .config import ProfileConfig
from .engines.base import Message, PromptTools
from .tasks import ProfileSchema, TaskSpec

PROMPT_VERSION = "stepback-profile/1"
MAX_LIST = 8
MAX_FIELD_CHARS = 240


@dataclass
class SelectedItem:
    item: dict[str, str]
    text: str
    tokens: int


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


def select_history(items: list[dict[str, str]], task: TaskSpec, config: ProfileConfig,
                   tools: PromptTools) -> list[SelectedItem]:
    """Most recent items first, each cut to ``max_item_tokens``, while the total fits ``history_token_budget``."""
    chosen: list[SelectedItem] = []
    used = 0
    for item in most_recent_first(items):
        text = tools.truncate(task.profile_item(item), config.max_item_tokens)
        n = tools.count_tokens(text) + 2  # the blank line between items
        if used + n > config.history_token_budget:
            break
        chosen.append(SelectedItem(item, text, n))
        used += n
    return chosen


def _field_is_list(schema: ProfileSchema, name: str) -> bool:
    return isinstance(schema.example_profile.get(name), list)


def prefill_for(schema: ProfileSchema) -> str:
    first = schema.fields[0]
    return '{"' + first + '": ["' if _field_is_list(schema, first) else '{"' + first + '": "'


def profile_messages(task: TaskSpec, selected: list[SelectedItem]) -> list[Message]:
    """The step-back prompt: instruction, a worked example, the user's selected items, a prefilled answer."""
    schema = task.profile
    example_items = "\n\n".join(task.profile_item(it) for it in schema.example_items)
    return [
        {"role": "system", "content": schema.instruction},
        {"role": "user", "content": example_items},
        {"role": "assistant", "content": json.dumps(schema.example_profile)},
        {"role": "user", "content": "\n\n".join(s.text for s in selected)},
        {"role": "assistant", "content": prefill_for(schema)},
    ]


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


def parse_profile(completion: str, schema: ProfileSchema) -> tuple[dict[str, Any], str]:
    """Parse the model's answer (which continues the prefill) into the schema's fields.

    Returns the profile and a status: ``ok`` (every field present and non-empty), ``partial`` (some fields
    missing) or ``fallback`` (no JSON object could be recovered; quoted phrases become keywords).
    """
    text = prefill_for(schema) + completion
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


def render_profile(profile: dict[str, Any], schema: ProfileSchema) -> str:
    """The profile as labelled lines for a generation prompt (empty fields left out)."""
    lines = []
    for name in schema.fields:
        value = profile.get(name)
        if isinstance(value, list):
            value = ", ".join(value)
        if value:
            lines.append(f"{schema.labels.get(name, name)}: {value}")
    return "\n".join(lines)


def fingerprint(history: list[dict[str, str]], model: str, config: ProfileConfig, task: str) -> str:
    """Identity of a profile: same history, model, prompt version and settings -> same fingerprint."""
    canon = json.dumps({"history": sorted(history, key=lambda it: json.dumps(it, sort_keys=True)),
                        "model": model, "prompt": PROMPT_VERSION, "task": task,
                        "config": config.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]
