"""The transformers engine with the real embedded model: batching, stop strings, prefill, context overflow."""

from __future__ import annotations

import os

import pytest

from stepback_ray.engines import SamplingParams

PROMPTS = [
    [{"role": "user", "content": "Name a color."}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is the capital of France? Explain the history of the city as well."},
    ],
    [{"role": "user", "content": "Write a title for a paper about graph neural networks for molecules."}],
]


def test_batched_equals_one_at_a_time(engine):
    params = SamplingParams(max_new_tokens=12)
    batched = engine.generate(PROMPTS, params)
    single = [engine.generate([p], params)[0] for p in PROMPTS]
    assert [c.text for c in batched] == [c.text for c in single]
    for p, c in zip(PROMPTS, batched):
        assert c.prompt_tokens == engine.count_tokens(engine.render(p))
        assert 0 < c.completion_tokens <= 12
        assert c.finish_reason in {"stop", "length"} and c.seconds > 0 and c.error is None


@pytest.mark.parametrize("prefill_tokens", [8, 1536], ids=["each-prompt-alone", "grouped"])
def test_split_prefill_writes_what_one_padded_call_writes(engine, prefill_tokens):
    """The default path (prompts prefilled in groups of at most ``max_batch_tokens``, their caches stitched into
    one decode batch) against one padded generate call per batch: the same greedy texts and token counts."""
    assert engine.split_prefill  # transformers 5, full-attention model: the split path is the one that runs
    params = SamplingParams(max_new_tokens=12, stop=("\n\n",))
    config = engine.config
    try:
        engine.config = config.model_copy(update={"max_batch_tokens": prefill_tokens})
        split = engine.generate(PROMPTS, params)
        engine.split_prefill = False
        one = engine.generate(PROMPTS, params)
    finally:
        engine.config, engine.split_prefill = config, True
    assert [c.text for c in split] == [c.text for c in one]
    assert [(c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in split] == [
        (c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in one
    ]


SHARED_SYSTEM = (
    "You are a careful assistant for scientists. You read the request, think about the field it "
    "belongs to, and answer with a short, precise title in the field's usual style, without quotes."
)
SHARING = [
    [{"role": "system", "content": SHARED_SYSTEM}, {"role": "user", "content": text}]
    for text in (
        "Graph neural networks for molecules.",
        "A study of sparse attention in long-document summarization with retrieval, evaluated on three benchmarks.",
        "Diffusion models.",
        "Contrastive pretraining of speech encoders for low-resource languages and dialects.",
    )
]


@pytest.mark.parametrize("prefill_tokens", [8, 1536], ids=["each-prompt-alone", "grouped"])
def test_a_shared_opening_is_prefilled_once_and_writes_the_same(engine, prefill_tokens):
    """Prompts that open with the same system prompt: with ``engine.prefix_reuse`` the opening is computed once
    and copied to each prompt's cache. The cache the decode steps see is the one each prompt would have alone (no
    gap between the shared part and the prompt's own tokens), so the greedy texts, the samples and the token counts
    equal those without it; every prompt but one reports the shared tokens as cached."""
    import torch

    config = engine.config
    seqs = [engine.formatter.encode(engine.render(p)) for p in SHARING]
    shared = engine._shared_prefix(seqs, [None] * len(seqs))
    assert shared >= 40 and all(s[:shared] == seqs[0][:shared] for s in seqs)
    try:
        engine.config = config.model_copy(update={"max_batch_tokens": prefill_tokens, "prefix_reuse": True})
        with torch.inference_mode():  # the stitched cache itself: the same keys and values, right-aligned
            lengths = [len(s) for s in seqs]
            width = max(lengths) - 1
            seqs_sorted = sorted(seqs, key=len)
            plain = engine._prefill(seqs_sorted, [None] * 4, sorted(lengths), width, 1, room=2)
            reused = engine._prefill(seqs_sorted, [None] * 4, sorted(lengths), width, 1, room=2, shared=shared)
        for layer_plain, layer_reused in zip(plain, reused):
            for x0, x1 in zip(layer_plain, layer_reused):  # each row's own positions (padding is masked)
                for row, n in enumerate(sorted(lengths)):
                    assert torch.allclose(
                        x0[row, :, width - n + 1 : width], x1[row, :, width - n + 1 : width], atol=1e-4
                    )
                    assert not x1[row, :, : width - n + 1].any()  # no gap: zeros, then the prompt
        outs = {}
        for reuse in (False, True):
            engine.config = config.model_copy(update={"max_batch_tokens": prefill_tokens, "prefix_reuse": reuse})
            outs[reuse] = (
                engine.generate(SHARING, SamplingParams(max_new_tokens=12, stop=("\n\n",))),
                engine.generate(SHARING, SamplingParams(max_new_tokens=8, temperature=0.8, n=2, seed=3)),
            )
    finally:
        engine.config = config
    for plain_out, reused_out in zip(outs[False], outs[True]):
        assert [(c.text, c.samples, c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in plain_out] == [
            (c.text, c.samples, c.prompt_tokens, c.completion_tokens, c.finish_reason) for c in reused_out
        ]
        assert all(c.cached_tokens == 0 for c in plain_out)
    # batch_size 4: one decode batch; its first prompt computed the opening, the other three reused it
    assert sorted(c.cached_tokens for c in outs[True][0]) == [0, shared, shared, shared]
    # the sampled call decodes 2 sequences per prompt, so 2 prompts per batch of 4: each batch shares once
    assert sorted(c.cached_tokens for c in outs[True][1]) == [0, 0, shared, shared]


def test_the_engine_accounts_for_its_prefill_and_decode(engine):
    """``engine.phases`` (what a profile of a run reads) counts what the prompts make it compute: the prefill's
    tokens (a shared opening once, each prompt's last token left to the decode) and causal query-key pairs, and one
    decode batch of every sequence, as many steps as the longest took, from the longest prompt's cache."""
    from stepback_ray.engines.base import EnginePhases

    config, before = engine.config, engine.phases
    try:
        engine.config, engine.phases = config.model_copy(update={"prefix_reuse": True}), EnginePhases()
        out = engine.generate(SHARING, SamplingParams(max_new_tokens=12))
        phases = engine.phases
    finally:
        engine.config, engine.phases = config, before
    shared = max(c.cached_tokens for c in out)
    assert shared >= 40 and sorted(c.cached_tokens for c in out) == [0, shared, shared, shared]
    own = [c.prompt_tokens - 1 - shared for c in out]
    assert phases.prefill_tokens == shared + sum(own) == sum(c.prompt_tokens - 1 - c.cached_tokens for c in out)
    assert phases.prefill_pairs == shared * (shared + 1) // 2 + sum(n * shared + n * (n + 1) // 2 for n in own)
    [(rows, steps, cached)] = phases.decode_batches
    assert rows == 4 and max(c.completion_tokens for c in out) <= steps <= 12
    assert cached == max(c.prompt_tokens for c in out) - 1
    assert set(phases.seconds) == {"tokenize", "prefill", "decode", "finish"}
    assert all(t > 0 for t in phases.seconds.values())
    assert phases.seconds["prefill"] + phases.seconds["decode"] < sum(c.seconds for c in out)


def test_soft_tokens_and_a_one_token_prompt_write_the_same_on_both_paths(engine):
    """Persona-Plug soft tokens go through the split prefill as through one call; a prompt of a single token has
    nothing to prefill, so a call holding one runs on the one-call path (and still answers every prompt)."""
    import numpy as np

    from stepback_ray.engines import Request

    d = engine.model.get_input_embeddings().weight.shape[1]
    soft = np.random.default_rng(0).normal(0, 0.02, (2, d)).astype(np.float32)
    requests = [Request(PROMPTS[0], soft), Request(PROMPTS[2]), Request(PROMPTS[1], soft)]
    params = SamplingParams(max_new_tokens=10)
    try:
        split = engine.generate(requests, params)
        engine.split_prefill = False
        one = engine.generate(requests, params)
    finally:
        engine.split_prefill = True
    assert [c.text for c in split] == [c.text for c in one]
    assert [c.prompt_tokens for c in split] == [
        engine.count_tokens(engine.render(r.prompt)) + (2 if r.soft_tokens is not None else 0) for r in requests
    ]
    single = "Hello"
    assert len(engine.formatter.encode(single)) == 1
    mixed = engine.generate([single, PROMPTS[0]], params)
    assert [c.error for c in mixed] == [None, None] and all(c.completion_tokens > 0 for c in mixed)
    assert mixed[1].text == engine.generate([PROMPTS[0]], params)[0].text


def test_stop_strings_cut_the_text(engine):
    prompt = [{"role": "user", "content": "List three fruits, one per line."}]
    free = engine.generate([prompt], SamplingParams(max_new_tokens=24))[0]
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=24, stop=("\n",)))[0]
    assert "\n" not in stopped.text
    assert free.text.startswith(stopped.text)
    assert stopped.completion_tokens <= free.completion_tokens
    assert stopped.finish_reason == "stop"


def test_prefill_is_continued(engine):
    prompt = [
        {"role": "user", "content": "Give JSON with a key 'color'."},
        {"role": "assistant", "content": '{"color": "'},
    ]
    text = engine.render(prompt)
    assert text.endswith('{"color": "')
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop=('"',)))[0]
    assert '"' not in out.text


def test_prompt_longer_than_context_is_an_error_row_not_a_crash(engine):
    long_text = "word " * (engine.max_context + 10)
    outs = engine.generate([long_text, PROMPTS[0]], SamplingParams(max_new_tokens=4))
    assert outs[0].finish_reason == "error" and "exceeds the context" in outs[0].error and outs[0].text == ""
    assert outs[1].error is None and outs[1].completion_tokens > 0


def test_truncate_and_count(engine):
    text = "one two three four five six seven eight nine ten " * 5
    cut = engine.truncate(text, 10)
    assert engine.count_tokens(cut) <= 12 and text.startswith(cut[:-4])
    assert engine.truncate("short", 10) == "short"


def test_cut_many_equals_truncate_then_count(formatter):
    texts = ["short", "", "héllo wörld 日本語 " * 40, "word " * 300, "Title: a study\nAbstract: " + "x y " * 90]
    cut = formatter.cut_many(texts, 50)
    assert cut == [(formatter.truncate(t, 50), formatter.count_tokens(formatter.truncate(t, 50))) for t in texts]
    assert cut[0] == ("short", formatter.count_tokens("short")) and cut[1] == ("", 0)
    assert cut[3][0].endswith(" ...") and formatter.encode_many(texts) == [formatter.encode(t) for t in texts]


def test_vllm_cpu_bind_all_is_this_process_cores():
    from stepback_ray.engines.vllm_engine import cpu_bind

    assert cpu_bind("auto") == "auto" and cpu_bind("0-3") == "0-3"
    assert [int(c) for c in cpu_bind("all").split(",")] == sorted(os.sched_getaffinity(0))


def test_a_stitched_cache_layer_grows_in_place_then_past_its_room_like_a_dynamic_one():
    import torch
    from transformers.cache_utils import DynamicLayer

    from stepback_ray.engines.transformers import kv_cache

    keys, values = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)  # 5 positions filled, room for 2
    layer, reference = kv_cache._LayerWithRoom(keys, values, filled=5), DynamicLayer()
    reference.update(keys[:, :, :5], values[:, :, :5])
    buffer = layer.keys.data_ptr()
    for step in range(4):  # two steps fit in the room, two more grow past it
        new_k, new_v = torch.randn(2, 3, 1, 4), torch.randn(2, 3, 1, 4)
        got, want = layer.update(new_k, new_v), reference.update(new_k, new_v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert (layer.keys.data_ptr() == buffer) == (step < 2)
    assert layer.get_seq_length() == reference.get_seq_length() == 9


def test_the_own_decode_loop_writes_what_generate_writes(engine):
    """The split path's decode loop (transformers/decoding.py) against transformers' generate from the same stitched
    cache: the same greedy texts, token counts and finish reasons, with a stop string that can end inside a token,
    a minimum length (end-of-sequence banned first) and sampled answers of the same shape."""
    prompts = PROMPTS + [[{"role": "user", "content": "Write two short lines about the sea."}]]
    try:
        runs = {}
        for loop in (True, False):
            engine.own_decode = loop
            runs[loop] = [
                engine.generate(prompts, p)
                for p in (
                    SamplingParams(max_new_tokens=16, stop=("\n",)),
                    SamplingParams(max_new_tokens=12, stop=(".",)),
                    SamplingParams(max_new_tokens=10, min_new_tokens=10),
                    SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=2),
                )
            ]
    finally:
        engine.own_decode = True
    for own, ref in zip(runs[True][:3], runs[False][:3]):
        assert [(c.text, c.completion_tokens, c.finish_reason) for c in own] == [
            (c.text, c.completion_tokens, c.finish_reason) for c in ref
        ]
    assert all(c.completion_tokens == 10 for c in runs[True][2])
    free = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    stopped = runs[True][1]
    assert any("." in f.text and s.completion_tokens < f.completion_tokens for f, s in zip(free, stopped))  # it cut
    for sampled in (runs[True][3], runs[False][3]):
        assert all(len(c.samples) == 3 and c.text == c.samples[0] and 0 < c.completion_tokens <= 18 for c in sampled)


def test_stop_strings_end_where_transformers_criterion_ends_them(formatter):
    """Token by token, the loop's stop check fires exactly where transformers' ``StopStringCriteria`` does: on
    a stop string split over several tokens (a multi-byte character, an emoji), one that starts in the prompt,
    and not again on one the prompt already holds."""
    import torch
    from transformers.generation.stopping_criteria import StopStringCriteria

    from stepback_ray.engines.transformers.decoding import StopStrings

    tok = formatter.tokenizer
    cases = [
        ("Title: 日本 is here", ["日"]),
        ("ok 🙂 done", ["🙂"]),
        ("a\n\nb", ["\n\n"]),
        ("x. y. z", ["."]),
        ("say END now", ["END", "now"]),
    ]
    for text, stop in cases:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for cut in range(1, len(ids)):  # the first `cut` ids are the prompt, the rest come one by one
            prompt, new = ids[:cut], ids[cut:]
            check, criterion = StopStrings(tok, stop, [prompt]), StopStringCriteria(tok, stop)
            for k in range(1, len(new) + 1):
                want = bool(criterion(torch.tensor([prompt + new[:k]]), None)[0])
                assert bool(check.ended([0], [new[:k]])) == want, (text, cut, k)
                if want:
                    break


def test_sampling_warps_the_scores_as_transformers_does():
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from stepback_ray.engines.transformers.decoding import warped

    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(3)) * 3
    for temperature, top_k, top_p in [(0.7, 50, 0.95), (1.0, 0, 0.5), (1.3, 5, 1.0), (0.7, 0, 1.0)]:
        want = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        got = warped(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])


def test_the_cpu_decode_kernels_compute_what_sdpa_and_the_lm_head_compute():
    import torch
    import torch.nn.functional as F

    from stepback_ray.engines.transformers import cpu_decode

    torch.manual_seed(0)
    batch, heads, groups, positions, dim = 3, 6, 2, 11, 8
    query = torch.randn(batch, heads, 1, dim)
    key, value = torch.randn(batch, groups, positions, dim), torch.randn(batch, groups, positions, dim)
    mask = torch.ones(batch, 1, 1, positions, dtype=torch.bool)
    mask[0, ..., :4] = False  # a left-padded row
    want = F.scaled_dot_product_attention(
        query, key.repeat_interleave(heads // groups, 1), value.repeat_interleave(heads // groups, 1), attn_mask=mask
    ).transpose(1, 2)
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf")), None):
        got = cpu_decode._attention(query, key, value, m, None)
        ref = (
            want
            if m is not None
            else F.scaled_dot_product_attention(
                query, key.repeat_interleave(heads // groups, 1), value.repeat_interleave(heads // groups, 1)
            ).transpose(1, 2)
        )
        assert got.shape == (batch, 1, heads, dim) and torch.allclose(got, ref, atol=1e-5)
    head = torch.nn.Linear(dim, 50, bias=True)
    hidden = torch.randn(batch, 2, dim)
    want = head(hidden)
    head.forward = cpu_decode._lm_head(head)
    assert torch.allclose(head(hidden), want, atol=1e-5)


def test_the_engine_runs_the_cpu_decode_kernels(engine):
    from stepback_ray.engines.transformers import cpu_decode

    assert engine.model.config._attn_implementation == cpu_decode.NAME
    head = engine.model.get_output_embeddings()
    assert "forward" in vars(head)  # the instance's own forward: (W @ x.T).T


def test_the_cpu_attention_kernel_gives_sdpas_decode_step_on_a_grouped_query_model(tmp_path):
    """A tiny Qwen2 (2 query heads per key/value head, biased projections, random weights) and a left-padded
    batch: one decode step from the same cache gives the same hidden states with the CPU kernel as with SDPA."""
    import json

    import torch
    from transformers import AutoTokenizer

    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import build_engine
    from stepback_ray.engines.models import resolve_model
    from stepback_ray.engines.transformers import cpu_decode

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "use_sliding_window": False,
        "initializer_range": 0.5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct")).save_pretrained(tmp_path)
    eng = build_engine(EngineConfig(model=str(tmp_path), device="cpu", load_format="dummy"))
    model = eng.model
    assert model.config._attn_implementation == cpu_decode.NAME
    seqs = [[5, 9, 33, 7, 81, 12], [44, 3, 8], [19, 2000, 6, 71]]
    width = max(map(len, seqs))
    ids, mask = eng._left_padded(seqs, [len(s) for s in seqs], width)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode_step(impl: str) -> torch.Tensor:
        model.set_attn_implementation(impl)
        with torch.no_grad():
            prefill = model.model(
                input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True
            )
            return model.model(
                input_ids=ids[:, -1:],
                attention_mask=mask,
                position_ids=positions[:, -1:],
                use_cache=True,
                **{eng._cache_kw: prefill[eng._cache_kw]},
            ).last_hidden_state

    kernel, sdpa = decode_step(cpu_decode.NAME), decode_step("sdpa")
    assert torch.allclose(kernel, sdpa, atol=1e-5)
    mask[1, :] = 1  # attending to the padding changes the step: the comparison can tell
    assert not torch.allclose(decode_step("sdpa"), sdpa, atol=1e-3)
    eng.close()
