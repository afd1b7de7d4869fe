"""The whole job on local Ray with the real embedded model: local output, a rerun, and S3 (moto)."""

from __future__ import annotations

import html
import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from stepback_ray.pipeline.estimate import estimate_job
from tests.support import REPO, SAMPLE

FAST = [
    "generation.max_new_tokens=10",
    "profile.max_new_tokens=24",
    "profile.history_token_budget=200",
    "profile.max_item_tokens=48",
    "retrieval.max_item_tokens=48",
    "profile.max_parts=1",
    "ray.progress_bars=false",
]  # short prompts and outputs: nothing here needs long texts


def test_end_to_end_five_users_then_rerun_skips_committed_chunks(ray_local, tmp_path):
    out = tmp_path / "run"
    job = load_job(
        REPO / "jobs" / "demo.yaml", [*FAST, "limit=5", f"output={out}", "ray.users_per_chunk=2", "run_id=t1"]
    )
    result = run_job(job)

    gens = pd.read_parquet(out / "generations")
    assert len(gens) == 10  # 5 users x 1 query x 2 modes
    assert gens.groupby(["query_id", "mode"]).size().eq(1).all()
    for col in (
        "user_id",
        "query_id",
        "mode",
        "input",
        "gold",
        "profile_text",
        "prompt",
        "output",
        "rouge1",
        "rougeL",
        "prompt_tokens",
        "completion_tokens",
        "status",
    ):
        assert col in gens.columns, col
    assert set(gens["status"]) == {"ok"}
    assert gens["gold"].notna().all() and gens["rouge1"].between(0, 1).all()
    full = gens[gens["mode"] == "profile+rag"]
    for _, row in full.iterrows():
        assert row["profile_text"] and row["profile_text"] in row["prompt"]
        assert len(row["retrieved_ids"]) == 2
    none = gens[gens["mode"] == "none"]
    assert not any(r["profile_text"] in r["prompt"] for _, r in none.iterrows() if r["profile_text"])

    profiles = pd.read_parquet(out / "profiles")
    assert len(profiles) == 5 and profiles["fingerprint"].nunique() == 5
    assert set(profiles["status"]) <= {"ok", "partial", "fallback"}
    assert (profiles["items_used"] > 0).all()
    assert (profiles["recent_items"].map(len) > 0).all()  # the newest items, kept for the report

    metrics = json.loads((out / "metrics.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert metrics == result.metrics
    assert metrics["modes"]["none"]["queries"] == 5 and metrics["modes"]["profile+rag"]["rouge-1"] is not None
    assert manifest["counts"]["generation_rows"] == manifest["counts"]["expected_generation_rows"] == 10
    assert manifest["chunks_committed_this_run"] == {"profiles": 3, "generations": 3}
    assert len(manifest["files"]["generations"]) == 3 and "torch" in manifest["versions"]
    t = manifest["timings"]  # fixed costs: Ray's start (0 here: the fixture started it), the run's engine actor
    assert t["ray_start_s"] >= 0 and t["profile_engines_started"] == 1
    assert 0 < t["profile_model_load_s"] < t["profile_first_engine_ready_s"] < t["profile_pass_s"], t
    assert "generation_engines_started" not in t, t  # ray.keep_engines: the profile pass's engine actor served it
    for name in ("profile", "generation"):
        assert 0 < t[f"{name}_engine_cpu_s"] and t[f"{name}_engine_preemptions"] >= 0, t  # the actor's usage
    assert "engine_ready_at" not in gens.columns
    report = (out / "report.html").read_text()  # the run report, its figures beside it
    for fig in ("metrics.png", "history.png", "stages.png", "throughput.png", "failures.png"):
        assert f'src="{fig}"' in report and (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    assert "profile+rag" in report and "10 of 10 expected" in report
    quality = metrics["profiles"]["quality"]  # the model-free profile measures of every profile pass
    assert quality["sample_users"] == 5 and quality["identifiability"]["users"] == 5
    assert quality["identifiability"]["chance_top1"] == 0.2 and 0 <= quality["identifiability"]["top1"] <= 1
    assert 0 <= quality["grounding"]["keywords_grounded"] <= 1
    assert "<h2>Profiles</h2>" in report and "identifiability (LLM fields)" in report
    assert "<h2>Examples</h2>" in report and "newest history items" in report
    first_file = pd.read_parquet(sorted((out / "generations").glob("*.parquet"))[0])  # the report's examples file
    first = first_file.sort_values("query_id").iloc[0]
    assert html.escape(first["gold"]) in report and html.escape(first["user_id"]) in report

    # `stepback plan` (no model: the dry-run engine with the real tokenizer) predicts this run's tokens within 5 %
    plan = estimate_job(
        load_job(REPO / "jobs" / "demo.yaml", [*FAST, "limit=5", f"output={tmp_path / 'x'}", "ray.users_per_chunk=2"]),
        1000.0,
    )
    assert plan["users"] == 5 and plan["queries"] == 5
    real_prompt = metrics["profiles"]["prompt_tokens"] + sum(m["prompt_tokens"] for m in metrics["modes"].values())
    real_output = metrics["profiles"]["completion_tokens"] + sum(
        m["completion_tokens"] for m in metrics["modes"].values()
    )
    assert plan["prompt_tokens"] == pytest.approx(real_prompt, rel=0.05)
    assert plan["prompt_tokens"] + plan["expected_output_tokens"] == pytest.approx(real_prompt + real_output, rel=0.05)
    assert plan["passes"]["profile"]["llm_calls"] == metrics["profiles"]["llm_calls"]
    assert plan["gpu_hours"] == pytest.approx(
        (plan["prompt_tokens"] + plan["expected_output_tokens"]) / 1000 / 3600, abs=1e-4
    )
    assert not (tmp_path / "x").exists()  # the plan writes nothing where the job would

    again = run_job(
        load_job(REPO / "jobs" / "demo.yaml", [*FAST, "limit=5", f"output={out}", "ray.users_per_chunk=2", "run_id=t1"])
    )
    assert again.manifest["resumed"] is True
    assert again.manifest["chunks_committed_this_run"] == {"profiles": 0, "generations": 0}
    assert len(pd.read_parquet(out / "generations")) == 10
    assert again.metrics["modes"] == metrics["modes"]

    # the in-process executor runs the same declared stages on the same chunks: the same rows, word for word
    local = run_job(
        load_job(
            REPO / "jobs" / "demo.yaml",
            [*FAST, "limit=5", f"output={tmp_path / 'local'}", "ray.users_per_chunk=2", "executor=in-process"],
        )
    )
    cols = ["query_id", "mode", "prompt", "raw_output", "output", "rouge1", "prompt_tokens", "completion_tokens"]
    mine = pd.read_parquet(tmp_path / "local" / "generations")[cols].sort_values(["query_id", "mode"])
    assert mine.reset_index(drop=True).equals(gens[cols].sort_values(["query_id", "mode"]).reset_index(drop=True))
    assert local.manifest["chunks_committed_this_run"] == {"profiles": 3, "generations": 3}


def test_reads_and_writes_s3_through_moto(ray_local, s3_bucket, tmp_path):
    import s3fs

    endpoint, bucket, storage = s3_bucket
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint, key=storage["key"], secret=storage["secret"], skip_instance_cache=True
    )
    fs.put(f"{SAMPLE}_questions.json", f"{bucket}/in/q.json")
    fs.put(f"{SAMPLE}_outputs.json", f"{bucket}/in/o.json")
    settings = [f"storage.{k}={v}" for k, v in storage.items()]
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [  # the dry-run engine: this test is about storage
            *FAST,
            *settings,
            "limit=2",
            "engine.kind=dry-run",
            f"input.questions=s3://{bucket}/in/q.json",
            f"input.outputs=s3://{bucket}/in/o.json",
            f"output=s3://{bucket}/runs/{{name}}/{{run_id}}",
            "run_id=s3run",
        ],
    )
    result = run_job(job)
    root = f"{bucket}/runs/demo/s3run"
    assert fs.exists(f"{root}/manifest.json") and fs.exists(f"{root}/metrics.json")
    manifest = json.loads(fs.cat(f"{root}/manifest.json"))
    assert manifest["output"] == f"s3://{bucket}/runs/demo/s3run" and manifest["counts"]["generation_rows"] == 4
    assert "testing" not in json.dumps(manifest)  # credentials never reach the manifest
    files = fs.ls(f"{root}/generations")
    table = pq.ParquetDataset(files, filesystem=fs).read()
    assert table.num_rows == 4 and result.metrics["modes"]["none"]["queries"] == 2
    assert len(fs.ls(f"{root}/profiles")) == 1
