"""``stepback plan``: what a job will cost, before it runs.

The job is run end to end with the dry-run engine (:mod:`stepback_ray.engines.dry_run`) into a scratch output:
every prompt is built and tokenized with the model's real tokenizer (or ``engine.tokenizer``), every profile
map-reduce and lead-author merge is planned as in the real run, and each answer is given its expected length. No
model is loaded. The result counts users, queries, LLM calls, prompt tokens and expected output tokens, and turns
them into GPU-hours at a throughput you supply (measure yours with ``python -m benchmarks.bench_engines``). A job
with a profile store is planned as a full rebuild (the store is not touched) and as an incremental night, where only
the users whose history changed are profiled again. A LaMP job is planned in this process (seconds, no Ray); a
dataset on a local Ray (staged by Ray Data), unless it is sampled.

With ``sample`` the dry run covers that many users only (:mod:`~.plan_sample`: drawn by id hash, planned in this
process, no Ray), and its cost per user is scaled up to the input's users (or to ``users``), with a 95 % margin
from the spread of the cost between the sampled users.
"""

from __future__ import annotations

import glob
import math
import os
import shutil
import tempfile
from typing import Any

import pyarrow.parquet as pq

from stepback_ray.config import JobSpec
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.engines.prefix import summary
from stepback_ray.errors import StepbackError
from stepback_ray.pipeline import run_job, run_profile_job
from stepback_ray.pipeline.console import LOG_FILE
from stepback_ray.pipeline.plan_sample import PlanSample, draw_sample
from stepback_ray.pipeline.profile_pass import profiled_authors
from stepback_ray.storage import RunStore, describe_storage_error
from stepback_ray.store.layout import read_pointer

Z95 = 1.96
"""Standard errors either side of an estimate for a 95 % interval (normal approximation)."""
MARGIN = (
    "95 % margin of the prompt + output tokens (and GPU-hours) from the spread of the cost between the planned users: "
    "1.96 standard errors of their mean, times the users, finite-population corrected (0: every user planned)"
)


def estimate_job(
    job: JobSpec,
    tokens_per_s: float,
    profile_only: bool = False,
    sample: int | None = None,
    users: int | None = None,
    changed: float | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """The plan of ``job`` (``profile_only``: of ``stepback profile``), from a dry run of every user or of a
    ``sample`` of them, scaled to ``users`` when given; ``changed``: the share of users an incremental night
    profiles again (default: the profile store's last incremental night, where it has one). The dry run writes
    into a scratch output that is removed afterwards; ``quiet``: Ray's output goes to the scratch output's log
    file (:mod:`.console`), which is kept (``logs/``) because the console named it."""
    # the tokenizer first: one that cannot be had (a hub id offline) is one line in a second, before any input is read
    PromptFormatter(job.engine.model_copy(update={"kind": "dry-run"}))
    drawn = draw_sample(job, sample, profiled_authors(job, "profile" if profile_only else "run")) if sample else None
    result, per_user, generation_calls = _dry_run(job, profile_only, drawn, quiet)
    prof = result.metrics.get("profiles") or {}
    counts = result.manifest["counts"]
    passes = {}
    if prof:
        passes["profile"] = {
            "users": prof["users"],
            "llm_calls": prof["llm_calls"],
            "prompt_tokens": prof["prompt_tokens"],
            "cached_prompt_tokens": prof["cached_prompt_tokens"],
            "output_tokens": prof["completion_tokens"],
        }
    for mode, m in result.metrics.get("modes", {}).items():
        passes[f"generate:{mode}"] = {
            "queries": m["queries"],
            "llm_calls": generation_calls.get(mode, 0),
            "prompt_tokens": m["prompt_tokens"],
            "cached_prompt_tokens": m["cached_prompt_tokens"],
            "output_tokens": m["completion_tokens"],
        }
    if drawn is not None:
        planned_units, input_units = len(drawn.units), drawn.input_units
        units = {u: per_user.pop(u, (0, 0)) for u in drawn.units}  # a drawn user whose rows were refused costs 0
        for uid, cost in per_user.items():  # co-authors: with the lead user whose query needs them
            lead = drawn.unit_of.get(uid, uid)
            units[lead] = (units.get(lead, (0, 0))[0] + cost[0], units.get(lead, (0, 0))[1] + cost[1])
    else:
        units = per_user
        planned_units = input_units = counts.get("users", prof.get("users")) or len(per_user)
    target = users or input_units
    scale = target / planned_units if planned_units else 0.0
    margin_of = round(len(units) * scale)  # the users the planned ones stand for: themselves, without --users
    full = {name: {k: round(v * scale) for k, v in p.items()} for name, p in passes.items()}
    out: dict[str, Any] = {
        "job": job.name,
        "task": job.task,
        "model": job.engine.model,
        "tokenizer": job.engine.tokenizer or job.engine.model,
    }
    if drawn is not None:
        out["sample"] = {
            "users": planned_units,
            "drawn": "the lead users with the smallest id hash (sha1 of the id, the hash that shards users): the "
            "same users whatever the input's order or files",
            "planned": {"users": counts["users"], "queries": counts.get("queries"), "passes": passes},
        }
        out["input"] = drawn.input
    out["users"] = target
    out["users_from"] = (
        "--users"
        if users
        else (f"counted: {drawn.input['users_counted_from']}" if drawn is not None else "counted: every user planned")
    )
    queries = counts.get("queries")
    out["queries"] = round(queries * scale) if queries is not None else None
    out.update(_totals(full, tokens_per_s))
    margin = _margin(units, margin_of, tokens_per_s, lambda p, g: p + g)
    out["plus_minus"] = margin and {**margin, "what": MARGIN}
    out["full_rebuild"] = {**_night(full, tokens_per_s), "plus_minus": margin}
    out["incremental_night"] = _incremental(job, changed, full, units, margin_of, tokens_per_s)
    if out["incremental_night"].get("gpu_hours") is not None and job.profile_store.incremental:
        k = job.profile_store.full_rebuild_every
        out["rebuild_cycle"] = {
            "nights": k,
            "gpu_hours": round(out["gpu_hours"] + (k - 1) * out["incremental_night"]["gpu_hours"], 4),
            "note": f"profile_store.full_rebuild_every {k}: one full rebuild and {k - 1} incremental nights",
        }
    out["note"] = (
        f"output tokens assume answers of {job.engine.dry_run_output_fraction:.0%} of max_new_tokens; "
        "prefix_cache: the prompt tokens a prefix cache (vLLM's, engine.vllm.prefix_caching) would serve "
        "instead of computing, modelled on the prompts in the order the engine gets them (no eviction)"
        + ("; every count above is the planned users' scaled to `users`" if scale != 1 else "")
    )
    return out


def _dry_run(
    job: JobSpec, profile_only: bool, drawn: PlanSample | None, quiet: bool = False
) -> tuple[Any, dict[str, tuple[int, int]], dict[str, int]]:
    """The dry run (of the sample's work, when drawn) into a scratch output; per user its (profile, generation)
    tokens, prompt and output together, and per generation mode its LLM calls, read from the rows it committed."""
    scratch = tempfile.mkdtemp(prefix="stepback-plan-")
    try:
        # planned on this machine whatever the job's cluster: LaMP JSON and a sample in this process (no Ray), a
        # whole dataset on a local Ray (Ray Data stages it) with one engine actor and no GPU requests
        in_process = job.input.format == "lamp" or drawn is not None
        dry = job.model_copy(
            update={
                "executor": "in-process" if in_process else "ray",
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
        work = drawn.work if drawn is not None else None
        if profile_only:
            result = run_profile_job(dry, work, report=False, quiet=quiet)
        else:
            result = run_job(dry, work=work, report=False, quiet=quiet)
        per_user: dict[str, tuple[int, int]] = {}
        calls: dict[str, int] = {}
        for folder in ("profiles", "generations"):
            for f in sorted(glob.glob(os.path.join(scratch, folder, "*.parquet"))):
                cols = ["user_id", "prompt_tokens", "completion_tokens", "llm_calls"]
                t = pq.read_table(f, columns=cols + (["mode"] if folder == "generations" else [])).to_pylist()
                for r in t:
                    tokens = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
                    profile, generation = per_user.get(r["user_id"], (0, 0))
                    if folder == "profiles":
                        per_user[r["user_id"]] = (profile + tokens, generation)
                    else:
                        per_user[r["user_id"]] = (profile, generation + tokens)
                        calls[r["mode"]] = calls.get(r["mode"], 0) + (r["llm_calls"] or 0)
    finally:
        _remove_all_but_logs(scratch)
    return result, per_user, calls


def _totals(passes: dict[str, dict[str, int]], tokens_per_s: float) -> dict[str, Any]:
    prompt = sum(p["prompt_tokens"] for p in passes.values())
    cached = sum(p["cached_prompt_tokens"] for p in passes.values())
    output = sum(p["output_tokens"] for p in passes.values())
    return {
        "passes": passes,
        "llm_calls": sum(p["llm_calls"] for p in passes.values()),
        "prompt_tokens": prompt,
        "expected_output_tokens": output,
        "tokens_per_s": tokens_per_s,
        "gpu_hours": _hours(prompt + output, tokens_per_s),
        "prefix_cache": {**summary(prompt, cached), "gpu_hours": _hours(prompt - cached + output, tokens_per_s)},
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


def _night(passes: dict[str, dict[str, int]], tokens_per_s: float) -> dict[str, Any]:
    t = _totals(passes, tokens_per_s)
    return {
        "users_profiled": passes.get("profile", {}).get("users", 0),
        "llm_calls": t["llm_calls"],
        "prompt_tokens": t["prompt_tokens"],
        "output_tokens": t["expected_output_tokens"],
        "gpu_hours": t["gpu_hours"],
    }


def _hours(tokens: float, tokens_per_s: float) -> float:
    return round(tokens / tokens_per_s / 3600, 4)


def _margin(units: dict[str, tuple[int, int]], target: int, tokens_per_s: float, cost: Any) -> dict[str, Any] | None:
    """The 95 % margin of a total scaled from the planned ``units`` (user -> (profile, generation) tokens) to
    ``target`` users: 1.96 standard errors of the mean cost per user (``cost(profile, generation)``) times
    ``target``, with the finite-population correction (no margin left when every user was planned). None below two
    planned users."""
    n = len(units)
    if n < 2:
        return None
    values = [cost(*c) for c in units.values()]
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    se = target * sd / math.sqrt(n) * math.sqrt(max(0.0, 1 - n / target))
    return {"tokens": round(Z95 * se), "gpu_hours": _hours(Z95 * se, tokens_per_s)}


def _incremental(
    job: JobSpec,
    changed: float | None,
    full: dict[str, dict[str, int]],
    units: dict[str, tuple[int, int]],
    target: int,
    tokens_per_s: float,
) -> dict[str, Any]:
    """A night that profiles again only the users whose history changed (the share ``changed``, or the store's last
    incremental night's), and runs every other pass in full."""
    source = "--changed"
    if changed is None:
        changed, source = _store_changed_share(job)
    if changed is None:
        return {"changed_share": None, "why": source}
    passes = {
        name: ({k: round(v * changed) for k, v in p.items()} if name == "profile" else dict(p))
        for name, p in full.items()
    }
    return {
        "changed_share": changed,
        "changed_share_from": source,
        **_night(passes, tokens_per_s),
        "plus_minus": _margin(units, target, tokens_per_s, lambda p, g: changed * p + g),
        "note": "a changed user is costed as a full profile; with profile_store.incremental a history that only "
        "grew is merged from its old profile and the new items, which costs less",
    }


def _store_changed_share(job: JobSpec) -> tuple[float | None, str]:
    """The share of users the profile store's newest incremental night profiled again (recomputed, incremental or
    new, over its users), and where it was read; or None and why there is none."""
    uri = job.profile_store.uri
    if not uri:
        return None, "no --changed and no profile store: give --changed FRACTION (the share of users whose history "
        "changed in a night)"
    try:  # asked once, not retried: the store is optional to a plan, which says why it could not read it
        root = RunStore(uri, job.storage.model_copy(update={"retries": 0}))
        pointer = read_pointer(root)[0]
        version = pointer["version"] if pointer else None
        while version and root.exists(f"{version}/manifest.json"):  # (older versions: gone with retention)
            manifest = root.read_json(f"{version}/manifest.json")
            if not manifest.get("full_rebuild") and manifest.get("users"):
                origins = manifest.get("origins", {})
                redone = sum(origins.get(k, 0) for k in ("new", "recomputed", "incremental"))
                return round(redone / manifest["users"], 6), f"profile store {uri}: {version}"
            version = manifest.get("previous")
    except StepbackError as e:
        return None, f"profile store not read ({e}); give --changed FRACTION"
    except Exception as e:  # noqa: BLE001 - object storage's own errors (no credentials, say) are not OSErrors
        return None, f"profile store not read ({describe_storage_error(uri, e)}); give --changed FRACTION"
    return None, f"profile store {uri} has no incremental night yet; give --changed FRACTION"
