"""The engine benchmark's own arithmetic: the machine's limit for a model and the report's rows and ratios."""

from __future__ import annotations

import pytest

from benchmarks import bench_engines as bench


def test_the_limit_is_the_matmul_peak_over_the_models_flops_per_token():
    from stepback_ray.engines.models import resolve_model

    shape = bench.flops_per_token(resolve_model("packaged:smollm2-135m-instruct"))
    # SmolLM2-135M: 134.5 M parameters, embeddings tied (the LM head is the one matmul they cost)
    assert shape["params"] == pytest.approx(134.5e6, rel=0.01)
    assert shape["gflop_per_token"] == pytest.approx(0.269, abs=0.002)
    assert (shape["hidden"], shape["intermediate"]) == (576, 1536)
    peak = bench.matmul_peak("cpu", "fp32", 64, 128, threads=1, rows=32)
    assert peak > 0.1  # GFLOP/s of a real product on this machine


def test_every_pipeline_block_size_gets_a_row_and_its_ratios_held_to_the_limit_in_tokens_computed():
    from benchmarks import results_tables

    row = {
        "prompts": 2,
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "cached_prompt_tokens": 0,
        "wall_s": 1.0,
        "tokens_per_s": 14.0,
        "prompts_per_s": 2.0,
    }
    limit = {"matmul_gflops": 10.0, "dtype": "fp32", "threads": 2, "gflop_per_token": 0.25, "tokens_per_s": 40.0}
    paths = {
        "pipeline": bench.with_computed({**row, "engine_s": 0.8, "engine_tokens_per_s": 17.5}, 0.8),
        "pipeline (block 200)": {**row, "engine_s": 0.7, "engine_tokens_per_s": 20.0},
        "pipeline (block 9)_error": "RuntimeError: boom",
        # 6 of the 10 prompt tokens served by the prefix cache: 8 computed, 40 sent tokens/s, 8 computed tokens/s
        "raw": bench.with_computed(
            {**row, "cached_prompt_tokens": 6, "tokens_per_s": 20.0, "load_s": 0.5, "tokens_per_s_with_load": 18.0}
            | {"limit": limit},
            1.0,
        ),
    }
    slower_peak = {
        "raw": bench.with_computed(
            {**row, "cached_prompt_tokens": None, "tokens_per_s": 16.0, "load_s": 0.5, "tokens_per_s_with_load": 15.0}
            | {"limit": {**limit, "matmul_gflops": 8.0, "tokens_per_s": 32.0}},
            1.0,
        )
    }
    report = {
        "date": "2026-12-03",
        "machine": "m",
        "model": "x",
        "dummy": False,
        "device": "cpu",
        "prompts": 2,
        "new_tokens": {},
        "command": "c",
        "results": {"generation": {"transformers": paths, "transformers-one-call": slower_peak}},
    }
    bench.add_ratios(report["results"])
    r = paths["ratios"]
    assert r["pipeline/raw (engine time)"] == 0.875 and r["pipeline (block 200)/raw (engine time)"] == 1.0
    assert r["raw/limit, computed"] == 0.2  # 8 computed tokens/s against 40, not the 20 sent
    assert r["pipeline/limit (engine time), computed"] == 0.438  # 14 computed tokens in 0.8 s
    # a path whose cached tokens were not counted is held to the run's best limit in tokens sent, and says so
    assert slower_peak["ratios"] == {"raw/limit (tokens sent; computed not recorded)": 0.4}
    md = "\n".join(results_tables.engines_table(report))
    assert "| transformers | pipeline (block 200) | 2 | 14 | 14 |" in md
    assert "| transformers | raw | 2 | 14 | 8 | 1.0 | 20.0 | 8.0 | **0.200** |" in md
    assert "| transformers-one-call | raw | 2 | 14 | not recorded | 1.0 | 16.0 | not recorded | sent: 0.350; " in md
    assert "limit 40.0 tokens/s = fp32 matmul peak 10.0 GFLOP/s" in md
    assert "pipeline (block 9): failed: `RuntimeError: boom`" in md


def test_only_engines_that_count_their_cached_prompt_tokens_get_tokens_computed():
    from stepback_ray.config import EngineConfig

    assert bench.counts_cached(EngineConfig(kind="transformers")) and bench.counts_cached(EngineConfig(kind="dry-run"))
    http = EngineConfig(kind="openai", openai={"base_url": "http://127.0.0.1:8000/v1"})
    assert not bench.counts_cached(http)  # a server may leave the count out
    assert bench.counts_cached(http, server_reports_cached=True)
    assert (
        bench.with_computed({"prompt_tokens": 9, "completion_tokens": 1, "cached_prompt_tokens": None}, 2.0)[
            "computed_tokens"
        ]
        is None
    )


def test_cpu_seconds_are_split_between_the_engine_actor_the_driver_and_the_rest():
    import os

    me = os.getpid()
    before = {me: ("python bench", 10.0, 1), 7: ("ray::IDLE", 1.0, 50), 8: ("raylet", 5.0, 2), 10: ("x", 9.0, 3)}
    after = {
        me: ("python bench", 12.5, 1),
        7: ("ray::MapWorker(MapBatches(GenerationEngineStage))", 41.0, 50),
        8: ("raylet", 6.5, 2),
        9: ("ray::_StatsActor", 0.7, 90),
        10: ("ray::IDLE", 0.4, 95),
    }
    # the idle worker renamed into the engine actor is charged from the snapshot on; pid 10 is a new process
    assert bench.cpu_by_role(before, after) == {"engine actor": 40.0, "driver": 2.5, "other": 2.6}
    snapshot = bench.process_cpu_seconds()
    assert me in snapshot and snapshot[me][1] > 0


def test_alternated_engines_run_in_turn_and_report_against_the_first():
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams

    configs = {"a": EngineConfig(kind="dry-run"), "b": EngineConfig(kind="dry-run", dry_run_output_fraction=0.5)}
    out = bench.run_alternated(configs, ["one prompt", "another prompt here"], SamplingParams(max_new_tokens=8), 3)
    assert set(out) == {"a", "b"} and all(len(r["tokens_per_s"]) == 3 for r in out.values())
    assert out["a"]["vs_first"] == 1.0 and out["a"]["texts_equal_first"] == 2 and out["b"]["prompts"] == 2
    assert 0 < out["a"]["computed_share"] <= 1  # the dry-run engine models a prefix cache
    report = {
        "date": "d",
        "machine": "m",
        "model": "x",
        "set": "generation",
        "prompts": 2,
        "new_tokens": 8,
        "rounds": 3,
        "command": "c",
        "results": out,
    }
    from benchmarks import results_tables

    text = "\n".join(results_tables.alternated_table(report))
    assert "| a | " in text and "| b | " in text and "computed share of tokens sent" in text


def test_an_alternated_engine_can_be_called_a_few_prompts_at_a_time(monkeypatch):
    """``<engine>@<n>`` is the same engine called with n prompts per call: as many calls as that takes, the same
    answers in the same order."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams
    from stepback_ray.engines.dry_run import DryRunEngine

    assert bench.engine_and_calls("transformers@10") == ("transformers", 10)
    assert bench.engine_and_calls("transformers") == ("transformers", None)
    sizes = []
    real = DryRunEngine.generate

    def counted(self, prompts, params):
        sizes.append(len(prompts))
        return real(self, prompts, params)

    monkeypatch.setattr(DryRunEngine, "generate", counted)
    prompts = [f"prompt number {i}" for i in range(5)]
    configs = {"dry-run": EngineConfig(kind="dry-run"), "dry-run@2": EngineConfig(kind="dry-run")}
    out = bench.run_alternated(configs, prompts, SamplingParams(max_new_tokens=8), 1)
    assert sorted(sizes) == [1, 2, 2, 5] and out["dry-run@2"]["texts_equal_first"] == 5


def test_a_run_against_its_own_vllm_server_shows_the_command_that_started_it():
    """``--serve-vllm`` reruns the benchmark with the server's URL and ``--reset-server-cache``; the report shows
    the command a reader types, not the port of a server that is gone."""
    served = [
        "--engines",
        "vllm,openai",
        "--prompts",
        "64",
        "--openai-base-url",
        "http://127.0.0.1:50489/v1",
        "--reset-server-cache",
        "--server-reports-cached",
    ]
    assert (
        bench.shown_command(served)
        == "python -m benchmarks.bench_engines --engines vllm,openai --prompts 64 --serve-vllm"
    )
    own = ["--engines", "openai", "--openai-base-url", "http://127.0.0.1:8000/v1"]
    assert bench.shown_command(own) == "python -m benchmarks.bench_engines " + " ".join(own)
