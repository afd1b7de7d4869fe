"""`stepback plan` (no model loaded) against a real run of the same job: token counts within 5 %."""

from __future__ import annotations

import json

import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from stepback_ray.planning import plan_job

from .conftest import REPO
from .test_cli import stepback

SETTINGS = ["limit=3", "modes=[none, profile+rag]", "ray.progress_bars=false", "run_id=p",
            "profile.history_token_budget=512"]


def test_plan_matches_a_real_run(ray_local, tmp_path):
    job = load_job(REPO / "jobs" / "demo.yaml", [*SETTINGS, f"output={tmp_path / 'real'}"])
    real = run_job(job).metrics
    plan = plan_job(load_job(REPO / "jobs" / "demo.yaml", [*SETTINGS, f"output={tmp_path / 'x'}"]), 1000.0)
    assert plan["users"] == 3 and plan["queries"] == 3
    real_prompt = real["profiles"]["prompt_tokens"] + sum(m["prompt_tokens"] for m in real["modes"].values())
    real_output = real["profiles"]["completion_tokens"] + sum(m["completion_tokens"] for m in real["modes"].values())
    assert plan["prompt_tokens"] == pytest.approx(real_prompt, rel=0.05)
    assert plan["prompt_tokens"] + plan["expected_output_tokens"] == pytest.approx(real_prompt + real_output, rel=0.05)
    assert plan["passes"]["profile"]["llm_calls"] == real["profiles"]["llm_calls"]
    assert plan["gpu_hours"] == pytest.approx((plan["prompt_tokens"] + plan["expected_output_tokens"]) / 1000 / 3600,
                                              abs=1e-4)
    print(json.dumps({"plan_prompt": plan["prompt_tokens"], "real_prompt": real_prompt,
                      "plan_output": plan["expected_output_tokens"], "real_output": real_output}))
    assert not (tmp_path / "x").exists()  # the plan writes nothing where the job would


def test_plan_command_prints_json():
    proc = stepback("plan", "jobs/demo.yaml", "--set", "limit=2", "--set", "engine.kind=dry-run",
                    "--tokens-per-s", "500")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["users"] == 2 and out["tokens_per_s"] == 500 and out["gpu_hours"] > 0
