"""Shared prompt prefixes: engine calls sorted so prompts sharing a prefix are adjacent (outputs unchanged), and the
prefix-cache model the dry-run engine and `stepback plan` report (no Ray, no model beyond the tokenizer)."""

from __future__ import annotations

from stepback_ray.config import load_job
from stepback_ray.engines.base import Completion, Request, SamplingParams
from stepback_ray.engines.prefix import BLOCK, PrefixOrdered, cached_tokens, sort_key
from stepback_ray.pipeline import run_job
from tests.support import SAMPLE


def test_the_cache_model_serves_whole_shared_blocks_and_always_computes_the_last_token():
    a = list(range(100))
    b = list(range(64)) + [999] * 36  # shares 4 blocks with a
    c = list(range(32))  # wholly inside a's blocks: all but its last token served
    assert cached_tokens([a, b, c]) == [0, 4 * BLOCK, 31]
    assert cached_tokens([b, a]) == [0, 4 * BLOCK]
    assert cached_tokens([[5] * 15, [5] * 15]) == [0, 0]  # under one block: nothing to share


def test_prefix_ordered_calls_send_shared_prefixes_together_and_answer_in_the_callers_order():
    sent = []

    def engine(requests, params):
        sent.extend(requests)
        return [Completion(f"answer to {r if isinstance(r, str) else r.prompt}", 1, 1, "stop", 0.0) for r in requests]

    reqs = ["user B: query 1", "user A: query 2", Request("user A: soft", soft_tokens=[[0.0]]), "user A: query 1"]
    out = PrefixOrdered(engine)(reqs, SamplingParams())
    assert [c.text for c in out] == [f"answer to {r if isinstance(r, str) else r.prompt}" for r in reqs]
    assert sent == sorted(reqs, key=sort_key) and sent[-1] == reqs[2]  # soft tokens last: nothing to share
    assert [r for r in sent if isinstance(r, str)] == ["user A: query 1", "user A: query 2", "user B: query 1"]


def _job(tmp_path, name, extra=()):
    return load_job(
        None,
        ["engine.kind=dry-run", *extra],
        data={
            "name": "prefix",
            "task": "LaMP_5",
            "modes": ["profile", "profile+rag", "random-profile"],
            "limit": 8,
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": str(tmp_path / name),
            "run_id": "r",
            "executor": "in-process",
            "ray": {"num_shards": 2, "progress_bars": False},
        },
    )


def test_reordering_changes_no_row_and_the_dry_run_counts_what_the_cache_would_serve(tmp_path):
    import pandas as pd

    on, off = run_job(_job(tmp_path, "on")), run_job(_job(tmp_path, "off", ["engine.prefix_order=false"]))
    cols = ["query_id", "mode", "prompt", "raw_output", "output", "score", "prompt_tokens"]
    a, b = (
        pd.read_parquet(tmp_path / d / "generations").sort_values(["query_id", "mode"])[cols].reset_index(drop=True)
        for d in ("on", "off")
    )
    pd.testing.assert_frame_equal(a, b)
    for result in (on, off):
        for m in result.metrics["modes"].values():  # the system prompt and profile are shared: blocks served
            assert 0 < m["cached_prompt_tokens"] < m["prompt_tokens"]
        prof = result.metrics["profiles"]
        assert 0 < prof["cached_prompt_tokens"] < prof["prompt_tokens"]  # the step-back prompt's shared opening
    cached = {
        k: sum(m["cached_prompt_tokens"] for m in r.metrics["modes"].values()) for k, r in (("on", on), ("off", off))
    }
    assert cached["on"] >= cached["off"]  # sorted, each prompt follows the one it shares most with


def test_plan_reports_the_prefix_cache_estimate(tmp_path):
    from stepback_ray.pipeline.estimate import estimate_job

    plan = estimate_job(_job(tmp_path, "plan"), tokens_per_s=1000.0)
    pc = plan["prefix_cache"]
    assert pc["prompt_tokens"] == plan["prompt_tokens"] and 0 < pc["cached_prompt_tokens"] < pc["prompt_tokens"]
    assert pc["computed_prompt_tokens"] == pc["prompt_tokens"] - pc["cached_prompt_tokens"]
    assert pc["gpu_hours"] < plan["gpu_hours"]
