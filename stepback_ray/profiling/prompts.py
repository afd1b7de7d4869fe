"""The step-back prompts (a part, a merge of partial profiles, a style note), the JSON answer's parsing (never
raises: ``json_repair`` first, then a keyword fallback) and the profile rendered as the text generation prompts
show."""

from __future__ import annotations

import json
import re
from typing import Any

import json_repair

from stepback_ray.engines.base import Message
from stepback_ray.tasks import ProfileSchema, TaskSpec

PROMPT_VERSION = "stepback-profile/3"
MAX_LIST = 8
MAX_FIELD_CHARS = 240
PROFILE_STOP = ("}",)


def _field_is_list(schema: ProfileSchema, name: str) -> bool:
    return isinstance(schema.example_profile.get(name), list)


def prefill_for(schema: ProfileSchema) -> str:
    first = schema.fields[0]
    return '{"' + first + '": ["' if _field_is_list(schema, first) else '{"' + first + '": "'


def json_schema(schema: ProfileSchema) -> dict[str, Any]:
    """The profile as a JSON schema, for engines that decode under one (the prefill is then not needed)."""
    props = {
        name: (
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_LIST}
            if _field_is_list(schema, name)
            else {"type": "string"}
        )
        for name in schema.fields
    }
    return {"type": "object", "properties": props, "required": list(schema.fields), "additionalProperties": False}


def _answer(schema: ProfileSchema, prefill: bool) -> list[Message]:
    return [{"role": "assistant", "content": prefill_for(schema)}] if prefill else []


def profile_messages(task: TaskSpec, items: list[str], prefill: bool = True, example: str = "worked") -> list[Message]:
    """The step-back prompt: instruction, the worked examples ``example`` names (``profile.example``), the user's
    items, and (for engines that cannot decode under a JSON schema) the answer prefilled up to the first field."""
    schema = task.profile
    shown: list[Message] = [
        turn
        for ex_items, ex_profile in schema.examples(example)
        for turn in (
            {"role": "user", "content": "\n\n".join(ex_items)},
            {"role": "assistant", "content": json.dumps(ex_profile)},
        )
    ]
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


def merge_messages(
    task: TaskSpec, partials: list[dict[str, Any]], prefill: bool = True, example: str = "worked"
) -> list[Message]:
    """Merge partial profiles of one person (newest part first) into one profile (with a worked example of a merge
    unless ``example`` is ``none``: merging needs no contrast, the partials' styles are the user's)."""
    schema = task.profile

    def listing(profiles: list[dict[str, Any]]) -> str:  # the LLM's fields only (habits are measured, not merged)
        return "\n".join(
            f"Profile {i + 1}: {json.dumps({k: p.get(k) for k in schema.fields})}" for i, p in enumerate(profiles)
        )

    shown: list[Message] = (
        [
            {"role": "user", "content": listing(list(_split_example(schema)))},
            {"role": "assistant", "content": json.dumps(schema.example_profile)},
        ]
        if example != "none"
        else []
    )
    return [
        {
            "role": "system",
            "content": (
                f"You merge profiles of the same {schema.person}, each distilled from a "
                f"different period of their history (most recent first), into one profile. "
                f"Keep what recurs and what is recent. "
                f"{schema.instruction.split('. ', 1)[1]}"
            ),
        },
        *shown,
        {"role": "user", "content": listing(partials)},
        *_answer(schema, prefill),
    ]


def note_messages(task: TaskSpec, item_text: str) -> list[Message]:
    """The CoT variant's per-item style note: tone, length and style features in one line."""
    person = task.profile.person
    return [
        {
            "role": "system",
            "content": f"You describe how a {person} writes. In one short line, name the tone, the "
            f"length and the style features of the {person}'s text below.",
        },
        {"role": "user", "content": item_text},
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
