"""Step-back profiling: history selection under a token budget, the prompt, robust parsing."""

from __future__ import annotations

import json

from stepback_ray import profiling
from stepback_ray.config import ProfileConfig
from stepback_ray.data import group_by_user, read_lamp
from stepback_ray.tasks import TASKS

from .conftest import SAMPLE

TASK = TASKS["LaMP_5"]


def _users():
    return group_by_user(read_lamp(f"{SAMPLE}_questions.json", f"{SAMPLE}_outputs.json", TASK))


def test_every_selected_item_reaches_the_prompt(formatter):
    cfg = ProfileConfig(history_token_budget=700, max_item_tokens=120)
    for user in _users()[:8]:
        chosen = profiling.select_history(user.history, TASK, cfg, formatter)
        assert chosen, user.user_id
        prompt = formatter.render(profiling.profile_messages(TASK, chosen))
        for c in chosen:
            assert c.text in prompt  # the whole (token-cut) item text, not a fragment of it
            assert c.item["title"] in prompt
        assert sum(c.tokens for c in chosen) <= cfg.history_token_budget


def test_selection_is_most_recent_first_and_fills_the_budget(formatter):
    user = max(_users(), key=lambda u: len(u.history))
    cfg = ProfileConfig(history_token_budget=600, max_item_tokens=100)
    chosen = profiling.select_history(user.history, TASK, cfg, formatter)
    dates = [c.item["date"] for c in chosen]
    assert dates == sorted(dates, reverse=True)
    newest = profiling.most_recent_first(user.history)
    assert [c.item["id"] for c in chosen] == [it["id"] for it in newest[:len(chosen)]]
    # the next item would not have fit
    nxt = newest[len(chosen)]
    nxt_tokens = formatter.count_tokens(formatter.truncate(TASK.profile_item(nxt), cfg.max_item_tokens)) + 2
    assert sum(c.tokens for c in chosen) + nxt_tokens > cfg.history_token_budget
    assert all(formatter.count_tokens(c.text) <= cfg.max_item_tokens + 2 for c in chosen)


def test_undated_items_come_after_dated_ones_in_order():
    items = [{"id": "a"}, {"id": "b", "date": "2020-01-01"}, {"id": "c"}, {"id": "d", "date": "2024-05"}]
    assert [i["id"] for i in profiling.most_recent_first(items)] == ["d", "b", "a", "c"]


def test_prompt_ends_with_the_prefill_and_shows_an_example(formatter):
    chosen = profiling.select_history(_users()[0].history, TASK, ProfileConfig(), formatter)
    prompt = formatter.render(profiling.profile_messages(TASK, chosen))
    assert prompt.endswith('{"keywords": ["')
    assert json.dumps(TASK.profile.example_profile) in prompt


def test_parse_clean_json():
    prof, status = profiling.parse_profile(
        'graph learning", "molecules"], "topics": ["drug discovery"], "style": "Short, method-first titles."}',
        TASK.profile)
    assert status == "ok"
    assert prof == {"keywords": ["graph learning", "molecules"], "topics": ["drug discovery"],
                    "style": "Short, method-first titles."}
    text = profiling.render_profile(prof, TASK.profile)
    assert text.splitlines() == ["Keywords: graph learning, molecules", "Research topics: drug discovery",
                                 "Title style: Short, method-first titles."]


def test_parse_repairs_broken_json_and_dedupes():
    # unbalanced brackets, a repeated keyword, a list where a string belongs, a missing field
    prof, status = profiling.parse_profile(
        'RL", "rl", "robots"], "style": ["terse", "playful"]], "extra": 1', TASK.profile)
    assert status == "partial"
    assert prof["keywords"] == ["RL", "robots"]
    assert prof["topics"] == []
    assert prof["style"] == "terse; playful"


def test_parse_never_raises_on_garbage():
    for junk in ["", "}}}}", "\x00\x01", "no json here at all", '"a" "b"', "[[[[", '{"keywords": ' * 50]:
        prof, status = profiling.parse_profile(junk, TASK.profile)
        assert set(prof) == set(TASK.profile.fields)
        assert status in {"ok", "partial", "fallback"}


def test_fingerprint_changes_with_history_and_model_only():
    h = [{"id": "1", "title": "t", "abstract": "a"}]
    cfg = ProfileConfig()
    base = profiling.fingerprint(h, "m", cfg, "LaMP_5")
    assert base == profiling.fingerprint(list(reversed(h)), "m", cfg, "LaMP_5")
    assert base != profiling.fingerprint(h + [{"id": "2", "title": "u", "abstract": "b"}], "m", cfg, "LaMP_5")
    assert base != profiling.fingerprint(h, "other-model", cfg, "LaMP_5")
    assert base != profiling.fingerprint(h, "m", ProfileConfig(history_token_budget=100), "LaMP_5")
