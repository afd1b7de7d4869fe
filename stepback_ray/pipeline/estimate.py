"""``stepback plan``: what a job will cost, before it runs.

The job is run end to end with the dry-run engine (:mod:`stepback_ray.engines.dry_run`) into a scratch output:
every prompt is built and tokenized with the model's real tokenizer, every profile map-reduce and lead-author
merge is planned as in the real run, and each answer is given its expected length. No model is loaded. The
result counts users, queries, LLM calls, prompt tokens and expected output tokens, and turns them into GPU-hours
at a throughput you supply (measure yours with ``python -m benchmarks.bench_engines``). A job with a profile store is
planned as a full rebuild (the store is not touched). A LaMP job is planned in this process (seconds, no Ray).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.engines.prefix import summary
from stepback_ray.pipeline import run_job, run_profile_job
from stepback_ray.pipeline.console import LOG_FILE


def estimate_job(job: JobSpec, tokens_per_s: float, profile_only: bool = False, quiet: bool = False) -> dict[str, Any]:
    """The job's cost, from a dry run of it into a scratch output that is removed afterwards; ``quiet``: Ray's
    output in the scratch output's log file (:mod:`.console`), which is kept (``logs/``) for the console named it."""
    scratch = tempfile.mkdtemp(prefix="stepback-plan-")
    try:
        # planned on this machine whatever the job's cluster: LaMP JSON in this process (no Ray), a dataset on a
        # local Ray (Ray Data stages it) with one engine actor and no GPU requests
        dry = job.model_copy(
            update={
                "executor": "in-process" if job.input.format == "lamp" else "ray",
                "engine": job.engine.model_copy(
                    update={"kind": "dry-run", "vllm": job.engine.vllm.model_copy(update={"tensor_parallel_size": 1})}
                ),
                "ray": job.ray.model_copy(
                    update={"address": None, "engine_actors": 1, "engine_actor_gpus": 0.0, "accelerator_type": None}
                ),
                "output": scratch,
                "profile_store": job.profile_store.model_copy(update={"uri": None}),
            }
        )
        result = run_profile_job(dry, quiet) if profile_only else run_job(dry, quiet=quiet)
    finally:
        _remove_all_but_logs(scratch)
    prof = result.metrics.get("profiles") or {}
    modes = result.metrics.get("modes", {})
    passes = {}
    if prof:
        passes["profile"] = {
            "users": prof["users"],
            "llm_calls": prof["llm_calls"],
            "prompt_tokens": prof["prompt_tokens"],
            "cached_prompt_tokens": prof["cached_prompt_tokens"],
            "output_tokens": prof["completion_tokens"],
        }
    for mode, m in modes.items():
        passes[f"generate:{mode}"] = {
            "queries": m["queries"],
            "prompt_tokens": m["prompt_tokens"],
            "cached_prompt_tokens": m["cached_prompt_tokens"],
            "output_tokens": m["completion_tokens"],
        }
    prompt = sum(p["prompt_tokens"] for p in passes.values())
    cached = sum(p["cached_prompt_tokens"] for p in passes.values())
    output = sum(p["output_tokens"] for p in passes.values())
    counts = result.manifest["counts"]
    return {
        "job": job.name,
        "task": job.task,
        "model": job.engine.model,
        "users": counts.get("users", prof.get("users")),
        "queries": counts.get("queries"),
        "passes": passes,
        "prompt_tokens": prompt,
        "expected_output_tokens": output,
        "tokens_per_s": tokens_per_s,
        "gpu_hours": round((prompt + output) / tokens_per_s / 3600, 4),
        "prefix_cache": {
            **summary(prompt, cached),
            "gpu_hours": round((prompt - cached + output) / tokens_per_s / 3600, 4),
        },
        "note": f"output tokens assume answers of {job.engine.dry_run_output_fraction:.0%} of max_new_tokens; "
        "prefix_cache: the prompt tokens a prefix cache (vLLM's, engine.vllm.prefix_caching) would serve "
        "instead of computing, modelled on the prompts in the order the engine gets them (no eviction)",
    }


def _remove_all_but_logs(scratch: str) -> None:
    """The scratch output removed, except the Ray log the console named (the whole folder when there is none)."""
    logs = os.path.dirname(os.path.join(scratch, LOG_FILE))
    if not os.path.isdir(logs):
        shutil.rmtree(scratch, ignore_errors=True)
        return
    for name in os.listdir(scratch):
        path = os.path.join(scratch, name)
        if path != logs:
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
