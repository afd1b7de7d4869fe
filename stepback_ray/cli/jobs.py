"""The commands that take a job spec: ``run``, ``profile``, ``plan``, ``submit`` and ``train-pplug``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from stepback_ray.cli.common import add_set, positive_float, positive_int, share
from stepback_ray.config import load_job
from stepback_ray.engines.formatting import tokenizer_path
from stepback_ray.errors import ConfigError


def format_table(metrics: dict[str, Any]) -> str:
    """The per-mode metrics as a small fixed-width table (the task's official metric keys as columns)."""
    keys = metrics["keys"]
    header = f"{'mode':<16}{'users':>7}{'queries':>9}" + "".join(f"{k:>10}" for k in keys) + f"{'tokens/s':>10}"
    lines = [header, "-" * len(header)]

    def num(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None else "-"

    for mode, m in metrics["modes"].items():
        lines.append(
            f"{mode:<16}{m['users']:>7}{m['queries']:>9}"
            + "".join(f"{num(m[k], '.4f'):>10}" for k in keys)
            + f"{num(m['tokens_per_s'], '.1f'):>10}"
        )
    from stepback_ray.evaluation.metrics import score_notes  # deferred: numpy

    lines += score_notes(metrics)
    prof = metrics.get("profiles")
    if prof:
        lines.append(
            f"profiles: {prof['users']} users {prof['statuses']}, {prof['llm_calls']} LLM calls, "
            f"{num(prof['tokens_per_s'], '.1f')} tokens/s"
        )
    return "\n".join(lines)


def _cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    from stepback_ray.pipeline import run_job  # deferred: pyarrow, nltk, scipy; a bad spec fails before them

    print(
        f"stepback: running {job.name} ({job.task}, modes {', '.join(job.modes)}) -> {job.output_uri}", file=sys.stderr
    )
    result = run_job(job, quiet=not args.verbose)
    _say_damage(result.metrics.get("profiles"))
    print(format_table(result.metrics))
    print(f"outputs: {result.output_uri} (total {result.manifest['timings']['total_s']:.1f} s)")
    print(f"report: {result.report}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    from stepback_ray.pipeline import run_profile_job  # deferred: pyarrow, nltk, scipy

    store = job.profile_store.uri or "(none: profiles kept in the run output)"
    print(f"stepback: profiling {job.name} ({job.task}) -> store {store}", file=sys.stderr)
    result = run_profile_job(job, quiet=not args.verbose)
    _say_damage(result.metrics["profiles"])
    print(json.dumps(result.metrics["profiles"], indent=1))
    # standard output is the statistics as JSON; the report's place goes beside the other lines for a person
    print(f"report: {result.report} (total {result.manifest['timings']['total_s']:.1f} s)", file=sys.stderr)
    return 0


def _say_damage(stats: dict[str, Any] | None) -> None:
    """Files of the store's base version found damaged: not carried (the manifest names them too)."""
    for d in (stats or {}).get("damaged_base_files", []):
        print(f"stepback: {d['file']} is damaged ({d['problem']}): its users were recomputed", file=sys.stderr)


def _cmd_plan(args: argparse.Namespace) -> int:
    job = load_job(args.job, [*args.set, "ray.progress_bars=false"])
    # the tokenizer the dry run counts with, found first: a hub id offline is one line before the pipeline imports
    tokenizer_path(job.engine.model_copy(update={"kind": "dry-run"}))
    from stepback_ray.pipeline.estimate import estimate_job  # deferred: pyarrow, nltk, scipy

    plan = estimate_job(
        job,
        args.tokens_per_s,
        args.profile_only,
        sample=args.sample,
        users=args.users,
        changed=args.changed,
        quiet=not args.verbose,
    )
    print(json.dumps(plan, indent=1))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    asked = [(what, job_id) for what, job_id in (("status", args.status), ("logs", args.logs)) if job_id]
    if asked:
        return _submitted_job(args, asked)
    if not args.job:
        raise ConfigError("submit: give a job spec (YAML) to submit, or --status/--logs JOB_ID for a submitted job")
    load_job(args.job, args.set)  # validate here, before anything reaches the cluster
    from stepback_ray.pipeline.submit import submit_job  # deferred: pyarrow (the pipeline package)

    return submit_job(
        args.job,
        args.set,
        args.address,
        pip=args.pip,
        env=args.env,
        wait=not args.no_wait,
        command="profile" if args.profile_only else "run",
    )


def _submitted_job(args: argparse.Namespace, asked: list[tuple[str, str]]) -> int:
    """``stepback submit --status|--logs JOB_ID``: what the cluster says about a job submitted before."""
    if len(asked) > 1:
        raise ConfigError("submit: --status and --logs ask about a submitted job one at a time: give one of them")
    (what, job_id) = asked[0]
    if args.job:
        raise ConfigError(f"submit --{what} {job_id}: asks about a submitted job; give no job spec ({args.job})")
    from stepback_ray.pipeline.ray_jobs import JobsServer, describe  # deferred: ray, pyarrow (the pipeline package)

    server = JobsServer(args.address)
    if what == "status":
        print(describe(job_id, server.status(job_id)))
    else:
        print(server.logs(job_id), end="")
    return 0


def _cmd_train_pplug(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    if not args.verbose:  # the models' weight-loading bars (transformers reads this when imported, just below)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from stepback_ray.pplug.training import train  # deferred: torch

    print(json.dumps(train(job, log=lambda m: print(m, file=sys.stderr, flush=True)), indent=1))
    return 0


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's and Ray Data's own logs on the console too (by default they go to logs/ray.log in the output, "
        "and the console shows the run's progress lines)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the job commands to the ``stepback`` parser."""
    run = sub.add_parser("run", help="run a job end to end")
    run.add_argument("job", help="job spec (YAML)")
    add_set(run)
    _add_verbose(run)
    run.set_defaults(func=_cmd_run)
    prof = sub.add_parser("profile", help="profile only: the nightly re-profiling job")
    prof.add_argument("job", help="job spec (YAML)")
    add_set(prof)
    _add_verbose(prof)
    prof.set_defaults(func=_cmd_profile)
    plan = sub.add_parser("plan", help="dry run: what the job will cost, without loading a model")
    plan.add_argument("job", help="job spec (YAML)")
    add_set(plan)
    _add_verbose(plan)
    plan.add_argument(
        "--tokens-per-s",
        type=positive_float,
        default=2500.0,
        help="engine throughput per GPU, prompt + output tokens (measure with python -m benchmarks.bench_engines)",
    )
    plan.add_argument("--profile-only", action="store_true", help="plan `stepback profile` instead of `run`")
    plan.add_argument(
        "--sample",
        type=positive_int,
        metavar="N",
        help="dry-run N users drawn by id hash and scale their cost to the input's users (in this process, no Ray; "
        "a dataset is read for its user ids and the drawn users' rows only: of a large Parquet input, from the row "
        "groups that hold 100 rows per drawn user, opened in the order of their users' id hashes)",
    )
    plan.add_argument("--users", type=positive_int, metavar="N", help="scale the estimate to N users, e.g. 10000000")
    plan.add_argument(
        "--changed",
        type=share,
        metavar="FRACTION",
        help="share of users whose history changes in a night, for the incremental-night estimate (default: the "
        "profile store's last incremental night)",
    )
    plan.set_defaults(func=_cmd_plan)
    submit = sub.add_parser(
        "submit",
        help="submit the job to a Ray cluster through Ray Jobs and follow its logs; or ask for a submitted "
        "job's status or logs",
    )
    submit.add_argument(
        "job",
        nargs="?",
        help="job spec (YAML), inside the working directory that is uploaded; none with --status/--logs",
    )
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    add_set(submit)
    submit.add_argument("--pip", action="append", default=[], help="pip requirement for the job's environment")
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (no secrets: use the cluster's IAM role)",
    )
    submit.add_argument(
        "--profile-only", action="store_true", help="run `stepback profile` on the cluster instead of `run`"
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="print the job id and the commands that follow it, and return"
    )
    submit.add_argument("--status", metavar="JOB_ID", help="print a submitted job's status instead of submitting")
    submit.add_argument("--logs", metavar="JOB_ID", help="print a submitted job's logs so far instead of submitting")
    submit.set_defaults(func=_cmd_submit)
    tp = sub.add_parser("train-pplug", help="train the Persona-Plug projector; the checkpoint goes to the output")
    tp.add_argument("job", help="job spec (YAML) with a pplug section")
    add_set(tp)
    tp.add_argument(
        "--verbose", action="store_true", help="the libraries' own progress bars too (the models' weight loading)"
    )
    tp.set_defaults(func=_cmd_train_pplug)
