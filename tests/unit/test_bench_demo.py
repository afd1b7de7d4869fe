"""The demo benchmark's profile arithmetic: the roofline a run's engine phases are held to."""

from __future__ import annotations

import pytest

from benchmarks import bench_contention, bench_demo, results_tables
from stepback_ray.engines.base import EnginePhases

SHAPE = {"params": 1000, "body": 900, "lm_head": 100, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}


def test_the_prefill_floor_is_its_flops_at_the_matmul_peak():
    phases = EnginePhases(prefill_tokens=10, prefill_pairs=55)
    floors = bench_demo.roofline(phases, SHAPE, peak_gflops=1e-6, bandwidth_gbs=1.0)
    # 10 tokens through the 900 body weights (2 FLOPs each) + 55 pairs x 4 x heads x head_dim x layers
    flops = 2 * 900 * 10 + 55 * 4 * 4 * 8 * 2
    assert floors["prefill"]["floor_s"] == pytest.approx(flops / 1e3)
    assert floors["decode"]["floor_s"] == 0 and floors["decode"]["compute_bound_steps"] == 0


@pytest.mark.parametrize("bound", ["compute", "memory"])
def test_each_decode_step_is_held_to_the_slower_of_its_flops_and_its_bytes(bound):
    phases = EnginePhases(decode_batches=[(3, 2, 5)])  # 3 rows, 2 steps, 5 cached positions before the first
    peak, bandwidth = (1e-6, 1e3) if bound == "compute" else (1e3, 1e-6)
    floors = bench_demo.roofline(phases, SHAPE, peak_gflops=peak, bandwidth_gbs=bandwidth)
    want = 0.0
    for ctx in (6, 7):  # the step's token attends to the cache and itself
        flops = 3 * (2 * (900 + 100) + 4 * 4 * 8 * 2 * ctx)
        # every weight once (the layers and the LM head) + each row's keys and values
        nbytes = (900 + 100) * 4 + 3 * ctx * 2 * 2 * 8 * 2 * 4
        want += max(flops / peak / 1e9, nbytes / bandwidth / 1e9)
    assert floors["decode"]["floor_s"] == pytest.approx(want)
    assert floors["decode"]["compute_bound_steps"] == (2 if bound == "compute" else 0)
    assert "2 steps, 6 row-steps" in floors["decode"]["work"]


def test_the_models_shape_is_read_from_its_config():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepback_ray.engines.models import resolve_model

    # resolved before the meta device: on a cold cache resolve_model converts the GGUF with from_pretrained, which
    # transformers refuses under a meta device context (RuntimeError), so the test failed on a fresh machine only
    config = AutoConfig.from_pretrained(resolve_model("packaged:smollm2-135m-instruct"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shape = bench_demo.model_shape(model)
    # SmolLM2-135M: 30 layers, 9 query heads sharing 3 key-value heads of 64, the embedding tied to the LM head
    assert (shape["layers"], shape["heads"], shape["kv_heads"], shape["head_dim"]) == (30, 9, 3, 64)
    assert shape["lm_head"] == 49152 * 576 and shape["body"] == shape["params"] - 49152 * 576
    assert shape["params"] == pytest.approx(134.5e6, rel=0.01)


def test_the_demo_summary_reads_each_passs_engine_preemptions_per_cpu_second():
    t = {"profile_engine_cpu_s": 200.0, "profile_engine_preemptions": 120_000}
    assert bench_demo.preemption_rate(t, "profile") == 600.0
    assert bench_demo.preemption_rate(t, "generation") is None  # a summary from before the counts were kept


def test_the_contention_benchmark_feeds_the_demos_shape_and_reports_each_condition_against_alone():
    batch = bench_contention.prompts()
    assert len(batch) == 8 and all(len(p[1]["content"]) > 2000 for p in batch)  # ~1,000-token histories
    runs = [
        {"condition": c, "round": 1, "calls": [{"s": s}]}
        for c, s in zip(bench_contention.CONDITIONS, (10.0, 12.0, 10.5))
    ]
    summary = {
        "alone": {"mean_s": 10.0, "preemptions_per_cpu_s": 20.0},
        "beside-ray": {"mean_s": 12.0, "preemptions_per_cpu_s": 600.0, "over_alone": 1.2},
        "beside-ray-sched-idle": {"mean_s": 10.5, "preemptions_per_cpu_s": 40.0, "over_alone": 1.05},
    }
    md = "\n".join(
        results_tables.contention_table(
            {
                "date": "2026-12-06",
                "machine": "m",
                "actors": 8,
                "rounds": 1,
                "calls": 1,
                "command": "c",
                "runs": runs,
                "summary": summary,
            }
        )
    )
    assert "| beside-ray | 12.0 | 1.2 | 600.0 |" in md and "| alone | 10.0 | 1.0 | 20.0 |" in md
    assert md.startswith("Date: 2026-12-06; machine: m; command: `c`.")


def test_a_demo_run_is_held_to_the_limit_in_the_tokens_it_computed():
    """Tokens its prefix cache served cost the engine nothing: the bound counts the tokens computed."""
    run = {"tokens": 1000, "cached_prompt_tokens": 200, "total_s": 4.0, "engine_s": [1.0, 1.0]}
    held = bench_demo.against(run, 400.0)
    assert held["compute_bound_s"] == 2.0 and held["ratio"] == 2.0 and held["engine_over_bound"] == 1.0
