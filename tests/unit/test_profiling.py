"""Step-back profiling: history selection under a token budget, the prompt, robust parsing."""

from __future__ import annotations

import json

import pytest

from stepback_ray import profiling
from stepback_ray.config import EngineConfig, ProfileConfig
from stepback_ray.data import collect_users, read_lamp
from stepback_ray.data.rows import most_recent_first
from stepback_ray.tasks import TASKS
from tests.support import SAMPLE

TASK = TASKS["LaMP_5"]


def _first_part(history, cfg, formatter):
    """The items of the most recent part: what a single (non map-reduce) profile prompt shows."""
    plan = profiling.plan_profile("", history, TASK, cfg, formatter)
    return plan.parts[0] if plan.parts else []


def _users():
    return collect_users(read_lamp(f"{SAMPLE}_questions.json", f"{SAMPLE}_outputs.json", TASK))


def test_every_selected_item_reaches_the_prompt(formatter):
    cfg = ProfileConfig(history_token_budget=700, max_item_tokens=120)
    for user in _users()[:8]:
        chosen = _first_part(user.history, cfg, formatter)
        assert chosen, user.user_id
        prompt = formatter.render(profiling.profile_messages(TASK, [c.text for c in chosen]))
        titles = {it["id"]: it["title"] for it in user.history}
        for c in chosen:
            assert c.text in prompt  # the whole (token-cut) item text, not a fragment of it
            assert titles[c.item_id] in prompt
        assert sum(c.tokens for c in chosen) <= cfg.history_token_budget


def test_selection_is_most_recent_first_and_fills_the_budget(formatter):
    user = max(_users(), key=lambda u: len(u.history))
    cfg = ProfileConfig(history_token_budget=600, max_item_tokens=100)
    chosen = _first_part(user.history, cfg, formatter)
    date = {it["id"]: it["date"] for it in user.history}
    dates = [date[c.item_id] for c in chosen]
    assert dates == sorted(dates, reverse=True)
    newest = most_recent_first(user.history)
    assert [c.item_id for c in chosen] == [it["id"] for it in newest[: len(chosen)]]
    # the next item would not have fit
    nxt = newest[len(chosen)]
    nxt_tokens = formatter.count_tokens(formatter.truncate(TASK.profile_item(nxt), cfg.max_item_tokens)) + 2
    assert sum(c.tokens for c in chosen) + nxt_tokens > cfg.history_token_budget
    assert all(formatter.count_tokens(c.text) <= cfg.max_item_tokens + 2 for c in chosen)


def test_undated_items_come_after_dated_ones_in_order():
    items = [{"id": "a"}, {"id": "b", "date": "2020-01-01"}, {"id": "c"}, {"id": "d", "date": "2024-05"}]
    assert [i["id"] for i in most_recent_first(items)] == ["d", "b", "a", "c"]


def test_prompt_ends_with_the_prefill_and_shows_an_example(formatter):
    chosen = _first_part(_users()[0].history, ProfileConfig(), formatter)
    prompt = formatter.render(profiling.profile_messages(TASK, [c.text for c in chosen]))
    assert prompt.endswith('{"keywords": ["')
    assert json.dumps(TASK.profile.example_profile) in prompt
    assert json.dumps(TASK.profile.contrast_profile) not in prompt


@pytest.mark.parametrize("task", list(TASKS.values()), ids=list(TASKS))
def test_the_contrast_prompt_shows_two_examples_whose_styles_differ(task):
    """profile.example=contrast: the worked example, then one of the opposite style, then the user's items; every
    task family has both, with the schema's fields."""
    schema = task.profile
    msgs = profiling.profile_messages(task, ["Title: X"], example="contrast")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == json.dumps(schema.example_profile)
    assert msgs[4]["content"] == json.dumps(schema.contrast_profile)
    assert set(schema.contrast_profile) == set(schema.fields) and schema.contrast_items
    assert schema.contrast_profile["style"] != schema.example_profile["style"]
    assert [m["role"] for m in profiling.profile_messages(task, ["Title: X"], example="none")] == [
        "system",
        "user",
        "assistant",
    ]


def test_parse_clean_json():
    prof, status = profiling.parse_profile(
        'graph learning", "molecules"], "topics": ["drug discovery"], "style": "Short, method-first titles."}',
        TASK.profile,
    )
    assert status == "ok"
    assert prof == {
        "keywords": ["graph learning", "molecules"],
        "topics": ["drug discovery"],
        "style": "Short, method-first titles.",
    }
    text = profiling.render_profile(prof, TASK)
    assert text.splitlines() == [
        "Keywords: graph learning, molecules",
        "Research topics: drug discovery",
        "Title style: Short, method-first titles.",
    ]
    with_habits = profiling.render_profile({**prof, "habits": ["Titles are 8-12 words long (median 10)"]}, TASK)
    assert with_habits.splitlines()[-1] == "Title habits: Titles are 8-12 words long (median 10)"
    assert profiling.render_profile({**prof, "habits": ["x"]}, TASK, habits=False) == text


def test_parse_repairs_broken_json_and_dedupes():
    # unbalanced brackets, a repeated keyword, a list where a string belongs, a missing field
    prof, status = profiling.parse_profile(
        'RL", "rl", "robots"], "style": ["terse", "playful"]], "extra": 1', TASK.profile
    )
    assert status == "partial"
    assert prof["keywords"] == ["RL", "robots"]
    assert prof["topics"] == []
    assert prof["style"] == "terse; playful"


def test_parse_never_raises_on_garbage():
    for junk in ["", "}}}}", "\x00\x01", "no json here at all", '"a" "b"', "[[[[", '{"keywords": ' * 50]:
        prof, status = profiling.parse_profile(junk, TASK.profile)
        assert set(prof) == set(TASK.profile.fields)
        assert status in {"ok", "partial", "fallback"}


def test_fingerprint_covers_history_settings_and_every_engine_key_that_changes_a_profile():
    h = [{"id": "1", "title": "t", "abstract": "a"}]
    cfg, eng = ProfileConfig(), EngineConfig(model="m")
    base = profiling.fingerprint(h, eng, cfg, "LaMP_5")
    assert base == profiling.fingerprint(list(reversed(h)), eng, cfg, "LaMP_5")
    assert base != profiling.fingerprint(h + [{"id": "2", "title": "u", "abstract": "b"}], eng, cfg, "LaMP_5")
    assert base != profiling.fingerprint(h, eng, ProfileConfig(history_token_budget=400), "LaMP_5")
    assert base != profiling.fingerprint(h, eng, cfg, "LaMP_4")
    changes = {
        "kind": "vllm",
        "model": "other-model",
        "dtype": "float16",
        "load_format": "dummy",
        "max_model_len": 2048,
        "prompt_family": "plain",
        "vllm.structured_output": False,
    }
    assert set(changes) == set(profiling.PROFILE_ENGINE_KEYS)  # every declared key tested
    for key, value in changes.items():
        data = eng.model_dump()
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
        assert profiling.fingerprint(h, EngineConfig(**data), cfg, "LaMP_5") != base, key
    # speed-only engine settings keep stored profiles valid
    for key, value in {"batch_size": 4, "threads": 1, "call_timeout_s": 10.0, "max_restarts": 0}.items():
        assert profiling.fingerprint(h, EngineConfig(model="m", **{key: value}), cfg, "LaMP_5") == base, key
    fast = EngineConfig(model="m", vllm={"gpu_memory_utilization": 0.5, "max_num_seqs": 8})
    assert profiling.fingerprint(h, fast, cfg, "LaMP_5") == base


# ---------------------------------------------------------------------------------------------- map-reduce
def _long_history(n: int) -> list[dict]:
    return [
        {
            "id": f"i{k}",
            "title": f"Paper number {k} on topic {k % 3}",
            "abstract": f"We study problem {k}. " * 6,
            "date": f"20{10 + k // 12:02d}-{k % 12 + 1:02d}-01",
        }
        for k in range(n)
    ]


def test_long_history_is_planned_into_parts_that_each_fit_the_budget(formatter):
    history = _long_history(40)
    cfg = ProfileConfig(history_token_budget=300, max_item_tokens=80)
    plan = profiling.plan_profile("u", history, TASK, cfg, formatter)
    assert len(plan.parts) > 3 and plan.items_used == 40 and plan.items_dropped == 0
    for part in plan.parts:
        assert sum(s.tokens for s in part) <= cfg.history_token_budget
    order = [s.item_id for p in plan.parts for s in p]
    assert order == [it["id"] for it in most_recent_first(history)]
    capped = profiling.plan_profile(
        "u", history, TASK, ProfileConfig(history_token_budget=300, max_item_tokens=80, max_parts=2), formatter
    )
    assert len(capped.parts) == 2 and capped.items_dropped == 40 - capped.items_used
    single = profiling.plan_profile(
        "u", history, TASK, ProfileConfig(history_token_budget=300, max_item_tokens=80, map_reduce=False), formatter
    )
    assert single.parts == plan.parts[:1]
    assert profiling.ProfilePlan.from_dict(plan.to_dict()) == plan


def test_distiller_map_reduce_calls_grow_linearly(dry_engine):  # the call structure, not the model's answers
    engine = dry_engine
    calls: list[int] = []

    def generate(prompts, params):
        calls.append(len(prompts))
        return engine.generate(prompts, params)

    cfg = ProfileConfig(history_token_budget=200, max_item_tokens=60, max_new_tokens=24, merge_fan_in=2)
    distiller = profiling.Distiller(TASK, cfg, engine, generate)
    short = profiling.plan_profile("short", _long_history(2), TASK, cfg, engine)
    long = profiling.plan_profile("long", _long_history(14), TASK, cfg, engine)
    empty = profiling.plan_profile("empty", [], TASK, cfg, engine)
    k = len(long.parts)
    assert len(short.parts) == 1 and k >= 4
    results = distiller.run([short, long, empty])
    # one batched call per level: all parts, then merge rounds (fan-in 2) until one profile is left
    assert calls[0] == 1 + k
    assert sum(calls[1:]) == k - 1  # a binary merge tree over k leaves has k - 1 inner nodes
    res_short, res_long, res_empty = results
    assert res_short.llm_calls == 1 and res_long.llm_calls == k + (k - 1)
    assert len(res_long.partials) == k and res_long.profile is not None
    assert set(res_long.profile) == set(TASK.profile.fields)
    assert res_empty.status == "skipped: empty history" and res_empty.llm_calls == 0
    assert res_long.prompt_tokens > res_short.prompt_tokens > 0


def test_style_notes_are_one_call_per_item_and_reach_the_profile_prompt(dry_engine):
    engine = dry_engine
    cfg = ProfileConfig(
        history_token_budget=400, max_item_tokens=60, max_new_tokens=24, style_notes=True, note_max_new_tokens=12
    )
    plan = profiling.plan_profile("u", _long_history(3), TASK, cfg, engine)
    (res,) = profiling.Distiller(TASK, cfg, engine, engine.generate).run([plan])
    assert len(res.notes) == 3 and res.llm_calls == 3 + len(plan.parts)
    assert all(f"Style: {note}" in res.prompt for note in res.notes.values() if len(plan.parts) == 1)
