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

The files follow the steps: :mod:`.plan` (and the fingerprint), :mod:`.prompts` (and parsing), :mod:`.distill`.
The fingerprint of (history, model, prompt version, profile settings) identifies a profile, so unchanged users
can be carried over instead of recomputed.
"""

from stepback_ray.profiling.distill import Distiller, ProfileResult
from stepback_ray.profiling.plan import (
    PROFILE_ENGINE_KEYS,
    ProfilePlan,
    SelectedItem,
    engine_identity,
    exemplars,
    fingerprint,
    measure_habits,
    part_budget,
    plan_profile,
    recent_items,
)
from stepback_ray.profiling.prompts import (
    MAX_FIELD_CHARS,
    MAX_LIST,
    PROFILE_STOP,
    PROMPT_VERSION,
    json_schema,
    merge_messages,
    note_messages,
    parse_profile,
    prefill_for,
    profile_messages,
    render_profile,
)

__all__ = [
    "Distiller",
    "MAX_FIELD_CHARS",
    "MAX_LIST",
    "PROFILE_ENGINE_KEYS",
    "PROFILE_STOP",
    "PROMPT_VERSION",
    "ProfilePlan",
    "ProfileResult",
    "SelectedItem",
    "engine_identity",
    "exemplars",
    "fingerprint",
    "json_schema",
    "measure_habits",
    "merge_messages",
    "note_messages",
    "parse_profile",
    "part_budget",
    "plan_profile",
    "prefill_for",
    "profile_messages",
    "recent_items",
    "render_profile",
]
