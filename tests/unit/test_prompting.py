"""Generation prompts: modes, model families, context budget, co-authored queries."""

from __future__ import annotations

import json

import pytest

from stepback_ray.config import EngineConfig, MultiAuthorConfig, RetrievalConfig
from stepback_ray.data import Query, donors, read_lamp
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.generation.prompting import merge_prompt, plan_generation
from stepback_ray.generation.retrieval import BM25Retriever, MemoRetriever
from stepback_ray.tasks import TASKS
from tests.support import FIXTURES

RET = RetrievalConfig(top_k=2)


def _q(task: str, i: int = 0) -> Query:
    return read_lamp(str(FIXTURES / f"{task}_questions.json"), str(FIXTURES / f"{task}_outputs.json"), TASKS[task])[i]


def _plan(
    formatter,
    task,
    q,
    mode,
    profiles=None,
    donor_info=None,
    multi=MultiAuthorConfig(),
    ret=RET,
    max_new=16,
    retriever=None,
):
    return plan_generation(
        TASKS[task],
        q,
        mode,
        profiles or {},
        donor_info or {},
        ret,
        multi,
        retriever or BM25Retriever(),
        formatter,
        max_new,
    )


def test_modes_show_exactly_what_they_name(formatter):
    q = _q("LaMP_5")
    profiles = {q.user_id: "Keywords: efficient attention"}
    text = {
        m: formatter.render(_plan(formatter, "LaMP_5", q, m, profiles).prompts[0].prompt)
        for m in ("none", "rag", "profile", "profile+rag")
    }
    item_title = "Linear-Time Attention for Long Documents"  # the best BM25 match in the user's history
    assert "efficient attention" not in text["none"] and item_title not in text["none"]
    assert "efficient attention" not in text["rag"] and item_title in text["rag"]
    assert "efficient attention" in text["profile"] and item_title not in text["profile"]
    assert "efficient attention" in text["profile+rag"] and item_title in text["profile+rag"]
    plan = _plan(formatter, "LaMP_5", q, "profile+rag", profiles)
    assert plan.retrieved_ids[0] == "3100" and len(plan.retrieved_ids) == 2
    assert text["profile+rag"].index(item_title) > text["profile+rag"].index("efficient attention")
    assert text["profile+rag"].rstrip().endswith("<|im_start|>assistant")


def test_random_profile_uses_another_users_profile_and_history(formatter):
    qs = read_lamp(str(FIXTURES / "LaMP_5_questions.json"), None, TASKS["LaMP_5"])
    histories = {q.user_id: q.history for q in qs}
    mapping = donors(list(histories))
    assert all(mapping[u] != u for u in mapping) and sorted(mapping.values()) == sorted(mapping)
    info = {u: {"donor": d, "history": histories[d]} for u, d in mapping.items()}
    profiles = {u: f"Keywords: profile-of-{u}" for u in histories}
    q = qs[0]
    text = formatter.render(_plan(formatter, "LaMP_5", q, "random-profile", profiles, info).prompts[0].prompt)
    donor = mapping[q.user_id]
    assert f"profile-of-{donor}" in text and f"profile-of-{q.user_id}" not in text
    assert not any(it["title"] in text for it in q.history)  # none of the user's own items
    assert donors(["only-one"]) == {}


def test_plain_family_uses_the_official_lamp_pattern():
    tools = PromptFormatter(EngineConfig(prompt_family="plain"))
    q = _q("LaMP_5")
    prompt = _plan(tools, "LaMP_5", q, "rag").prompts[0].prompt
    assert isinstance(prompt, str)
    first = q.history[0]
    assert prompt.startswith(f'"{first["title"]}" is a title for "{first["abstract"]}" , and ')
    assert f". Following the given patterns {q.input}\nTitle:" in prompt
    lamp1 = _plan(tools, "LaMP_1", _q("LaMP_1"), "rag").prompts[0].prompt
    assert lamp1.startswith('For an author who has written the paper with the title, and "')  # official quirk
    none = _plan(tools, "LaMP_5", q, "none").prompts[0].prompt
    assert none == f"{q.input}\nTitle:"


def test_items_without_outputs_are_shown_as_context(formatter):
    q = _q("LaMP_7")
    text = formatter.render(_plan(formatter, "LaMP_7", q, "rag").prompts[0].prompt)
    assert "Tweets this person has written:\n- Tweet: bus was late AGAIN today lol" in text
    assert text.count("<|im_start|>user") == 1


def test_context_budget_drops_least_relevant_items_and_flags_it(formatter):
    q = _q("LaMP_5")
    full = _plan(formatter, "LaMP_5", q, "rag", ret=RetrievalConfig(top_k=3))
    tight = PromptFormatter(
        EngineConfig(max_model_len=formatter.count_tokens(formatter.render(full.prompts[0].prompt)) - 30)
    )
    cut = _plan(tight, "LaMP_5", q, "rag", ret=RetrievalConfig(top_k=3), max_new=16)
    assert cut.truncated and len(cut.retrieved_ids) < 3
    assert cut.retrieved_ids == full.retrieved_ids[: len(cut.retrieved_ids)]  # the best kept
    assert any(n.startswith("truncated:") for n in cut.all_notes())
    assert q.input.split(": ", 1)[1] in tight.render(cut.prompts[0].prompt)  # the input is never cut


def test_lead_merge_and_concat_for_coauthored_papers(formatter):
    q = _q("PSW_title", 1)  # three authors: Cy, Ada, Bo
    profiles = {"Cy": "Keywords: benchmarks", "Ada": "Keywords: sparse attention", "Bo": "Keywords: retrieval"}
    lead_merge = MultiAuthorConfig(strategy="lead-merge")
    plan = _plan(formatter, "PSW_title", q, "profile+rag", profiles, multi=lead_merge)
    assert len(plan.prompts) == 3 and plan.merge["authors"] == ["Cy", "Ada", "Bo"]
    for p, kw in zip(plan.prompts, ["benchmarks", "sparse attention", "retrieval"]):
        assert kw in formatter.render(p.prompt)
    merged = formatter.render(merge_prompt(TASKS["PSW_title"], formatter, plan.merge, ["A", "B", "C"]))
    assert "Author 1 (you, the lead author): A\nAuthor 2: B\nAuthor 3: C" in merged
    assert "benchmarks" in merged and "You are the lead author" in merged
    concat = _plan(formatter, "PSW_title", q, "profile+rag", profiles, multi=MultiAuthorConfig(strategy="concat"))
    assert len(concat.prompts) == 1 and concat.merge is None
    text = formatter.render(concat.prompts[0].prompt)
    assert text.index("benchmarks") < text.index("sparse attention") < text.index("retrieval")
    single = _plan(formatter, "PSW_title", q, "none", profiles)
    assert len(single.prompts) == 1 and single.merge is None
    lead_only = _plan(formatter, "PSW_title", q, "profile+rag", profiles, multi=MultiAuthorConfig(strategy="single"))
    assert len(lead_only.prompts) == 1 and lead_only.merge is None
    text = formatter.render(lead_only.prompts[0].prompt)
    assert "benchmarks" in text and "sparse attention" not in text and "retrieval" not in text
    assert set(lead_only.retrieved_ids) <= {it["id"] for it in q.histories[0]}  # the lead's own history only


class CountingRetriever(BM25Retriever):
    def __init__(self):
        self.calls = 0

    def scores(self, query, docs):
        self.calls += 1
        return super().scores(query, docs)


def test_a_querys_modes_score_each_pool_once_with_the_same_prompts(formatter):
    q = _q("PSW_title", 1)  # three authors, so lead-merge retrieves from three pools
    profiles = {"Cy": "Keywords: benchmarks", "Ada": "Keywords: sparse attention", "Bo": "Keywords: retrieval"}
    counting = CountingRetriever()
    memo = MemoRetriever(counting)
    modes = ("rag", "profile+rag", "profile")
    multi = MultiAuthorConfig(strategy="lead-merge")
    shared = {m: _plan(formatter, "PSW_title", q, m, profiles, multi=multi, retriever=memo) for m in modes}
    assert counting.calls == 3  # one per author's pool, not one per (mode, author)
    for m in modes:
        alone = _plan(formatter, "PSW_title", q, m, profiles, multi=multi)
        assert [p.text for p in shared[m].prompts] == [p.text for p in alone.prompts]
        assert shared[m].retrieved_ids == alone.retrieved_ids
        assert [p.text for p in alone.prompts] == [formatter.render(p.prompt) for p in alone.prompts]


def test_unknown_mode_is_rejected(formatter):
    with pytest.raises(ValueError):
        _plan(formatter, "LaMP_5", _q("LaMP_5"), "telepathy")


def test_each_personal_mode_names_its_donor_control_from_the_registry():
    from stepback_ray.modes import MODE_SPECS, donor_control

    assert donor_control("profile+rag") == "random-profile" and donor_control("pplug") == "pplug-random"
    for own in ("profile+rag", "pplug"):  # a control keeps the prompt's context and changes only the person
        a, b = MODE_SPECS[own], MODE_SPECS[donor_control(own)]
        assert (a.profile, a.retrieval, a.plug) == (b.profile, b.retrieval, b.plug) and b.donor and not a.donor
    with pytest.raises(ValueError, match="'rag' has no donor control; modes with one: profile\\+rag, pplug"):
        donor_control("rag")
    with pytest.raises(ValueError, match="'random-profile' has no donor control"):
        donor_control("random-profile")


def test_the_tokenizer_loads_by_its_named_class_as_autotokenizer_would_without_importing_torch(tmp_path):
    """load_tokenizer takes the class tokenizer_config.json names and the context from config.json: the same
    tokenizer as AutoTokenizer's (class, ids, chat rendering) and the same context as AutoConfig's, in a fresh
    process without torch (AutoTokenizer imports it: ~2.5 s in every CLI call and Ray worker)."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoConfig, AutoTokenizer

    from stepback_ray.engines.formatting import load_tokenizer
    from stepback_ray.engines.models import resolve_model

    path = resolve_model(EngineConfig().model)
    no_class = tmp_path / "no-class"  # a folder that names no class: AutoTokenizer's way, the same result
    shutil.copytree(path, no_class, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((no_class / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class")
    (no_class / "tokenizer_config.json").write_text(json.dumps(cfg))
    auto = AutoTokenizer.from_pretrained(path)
    texts = ["Step-back profiling: a user's history, distilled.", "  <|im_start|> émigré 東京 \n\n tabs\t"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": texts[1]}]
    for folder in (path, str(no_class)):
        tok, context = load_tokenizer.__wrapped__(folder)
        assert type(tok) is type(auto) and context == AutoConfig.from_pretrained(path).max_position_embeddings
        for t in texts:
            assert (
                tok.encode(t) == auto.encode(t)
                and tok(t, add_special_tokens=False)["input_ids"] == auto(t, add_special_tokens=False)["input_ids"]
            )
        assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == auto.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        assert tok.padding_side == "left" and tok.pad_token_id is not None
    code = (
        "import sys\nfrom stepback_ray.config import EngineConfig\n"
        "from stepback_ray.engines.formatting import PromptFormatter\nPromptFormatter(EngineConfig())\n"
        "print('torch' in sys.modules)"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "False"
