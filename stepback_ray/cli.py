"""The ``stepback`` command.

    stepback run JOB.yaml [--set key=value ...]     run a job end to end and print its metrics table
    stepback profile JOB.yaml [--set ...]           profile only (the nightly job; with a profile store,
                                                    only users whose history changed are recomputed)
    stepback plan JOB.yaml [--tokens-per-s N]       dry run: users, queries, tokens and GPU-hours, no model
    stepback submit JOB.yaml --address URL          submit a job to a Ray cluster (Ray Jobs) and follow it
    stepback score PRED.json GOLD.json [--task T]   official LaMP metrics of a predictions file, as JSON
    stepback train-pplug JOB.yaml [--set ...]       train the Persona-Plug projector (the LLM stays frozen)
    stepback report RUN_URI                         (re)build a finished run's report.html and figures
    stepback promote --store URI --version V        point a profile store's CURRENT.json at a finished version

Bad input or configuration (a damaged file of a run or store included) ends with one line on stderr (``error:
...``) and exit status 2, never a traceback; work that could not be done (engine errors over
``max_error_fraction``, an engine that kept dying, a full disk, a forget that met damaged files) exits 3; a profile
store version refused by the quality gate (``profile_store.gate``) exits 4; Ctrl-C exits 130 and SIGTERM 143,
both with one line, a run resumable. Only a bug in stepback-ray ends in a traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from stepback_ray.config import load_job, storage_config
from stepback_ray.errors import InputError, StepbackError


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


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0, checked before any work (0 would divide by zero after a whole
    dry run, a negative one print negative GPU-hours, ``nan`` print invalid JSON)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number above 0")
    return value


def _cmd_run(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    from stepback_ray.pipeline import run_job  # deferred: pyarrow, nltk, scipy; a bad spec fails before them

    print(
        f"stepback: running {job.name} ({job.task}, modes {', '.join(job.modes)}) -> {job.output_uri}", file=sys.stderr
    )
    result = run_job(job)
    _say_damage(result.metrics.get("profiles"))
    print(format_table(result.metrics))
    print(f"outputs: {result.output_uri} (total {result.manifest['timings']['total_s']:.1f} s)")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    from stepback_ray.pipeline import run_profile_job  # deferred: pyarrow, nltk, scipy

    store = job.profile_store.uri or "(none: profiles kept in the run output)"
    print(f"stepback: profiling {job.name} ({job.task}) -> store {store}", file=sys.stderr)
    result = run_profile_job(job)
    _say_damage(result.metrics["profiles"])
    print(json.dumps(result.metrics["profiles"], indent=1))
    return 0


def _say_damage(stats: dict[str, Any] | None) -> None:
    """Files of the store's base version found damaged: not carried (the manifest names them too)."""
    for d in (stats or {}).get("damaged_base_files", []):
        print(f"stepback: {d['file']} is damaged ({d['problem']}): its users were recomputed", file=sys.stderr)


def _cmd_plan(args: argparse.Namespace) -> int:
    job = load_job(args.job, [*args.set, "ray.progress_bars=false"])
    from stepback_ray.pipeline.estimate import estimate_job  # deferred: pyarrow, nltk, scipy

    print(json.dumps(estimate_job(job, args.tokens_per_s, args.profile_only), indent=1))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    load_job(args.job, args.set)  # validate here, before anything reaches the cluster
    from stepback_ray.pipeline.submit import submit_job  # deferred: pyarrow (the pipeline package)

    return submit_job(
        args.job, args.set, args.address, pip=args.pip, env=args.env, wait=not args.no_wait, command=args.command
    )


def _cmd_train_pplug(args: argparse.Namespace) -> int:
    job = load_job(args.job, args.set)
    from stepback_ray.pplug.training import train  # deferred: torch

    print(json.dumps(train(job, log=lambda m: print(m, file=sys.stderr, flush=True)), indent=1))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from stepback_ray.evaluation.report import build_report  # deferred: numpy, pyarrow

    print(build_report(args.run, storage_config(args.set)))
    return 0


def _cmd_forget(args: argparse.Namespace) -> int:
    from stepback_ray.store.forget import ForgetIncomplete, forget  # deferred: pyarrow

    ids = list(args.user)
    if args.users_file:
        path = Path(args.users_file)
        if not path.is_file():
            raise InputError(args.users_file, "no such file (one user id per line)")
        ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        record = forget(args.store, ids, args.runs, storage_config(args.set), undo=args.undo)
    except ForgetIncomplete as e:  # the audit record all the same, then the one line (exit 3)
        print(json.dumps(e.record, indent=1))
        raise
    print(json.dumps(record, indent=1))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from stepback_ray.store.gate import describe_failures  # deferred: pyarrow
    from stepback_ray.store.promote import promote  # deferred: pyarrow

    before, after, manifest = promote(args.store, args.version, storage_config(args.set))
    if before == after:
        print(f"{args.store}: {after} is already the current version; nothing moved")
        return 0
    gate = manifest.get("gate")
    note = (
        f" (its quality gate failed: {describe_failures(gate)}; promoted anyway)" if gate and not gate["passed"] else ""
    )
    print(f"{args.store}: CURRENT.json moved from {before or 'nothing'} to {after}{note}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from stepback_ray.evaluation.scoring import score_files  # deferred: numpy

    print(json.dumps(score_files(args.pred, args.gold, args.task)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepback", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job end to end")
    run.add_argument("job", help="job spec (YAML)")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a job-spec key, e.g. --set limit=5 --set output=runs/x (repeatable)",
    )
    run.set_defaults(func=_cmd_run)
    prof = sub.add_parser("profile", help="profile only: the nightly re-profiling job")
    prof.add_argument("job", help="job spec (YAML)")
    prof.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    prof.set_defaults(func=_cmd_profile)
    plan = sub.add_parser("plan", help="dry run: what the job will cost, without loading a model")
    plan.add_argument("job", help="job spec (YAML)")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--tokens-per-s",
        type=positive_float,
        default=2500.0,
        help="engine throughput per GPU, prompt + output tokens (measure with python -m benchmarks.bench_engines)",
    )
    plan.add_argument("--profile-only", action="store_true", help="plan `stepback profile` instead of `run`")
    plan.set_defaults(func=_cmd_plan)
    submit = sub.add_parser("submit", help="submit the job to a Ray cluster through Ray Jobs and follow its logs")
    submit.add_argument("job", help="job spec (YAML), inside the working directory that is uploaded")
    submit.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--pip", action="append", default=[], help="pip requirement for the job's environment")
    submit.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (no secrets: use the cluster's IAM role)",
    )
    submit.add_argument("--command", choices=["run", "profile"], default="run")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.set_defaults(func=_cmd_submit)
    tp = sub.add_parser("train-pplug", help="train the Persona-Plug projector; the checkpoint goes to the output")
    tp.add_argument("job", help="job spec (YAML) with a pplug section")
    tp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    tp.set_defaults(func=_cmd_train_pplug)
    rep = sub.add_parser("report", help="(re)build the report of a finished run")
    rep.add_argument("run", help="the run's output URI")
    rep.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="storage.KEY=VALUE",
        help="storage settings for object storage, e.g. --set storage.endpoint_url=...",
    )
    rep.set_defaults(func=_cmd_report)
    fg = sub.add_parser("forget", help="remove users' profiles, embeddings and outputs everywhere; keep them out")
    fg.add_argument("--store", required=True, help="the profile store's URI")
    fg.add_argument("--user", action="append", default=[], metavar="ID", help="a user id (repeatable)")
    fg.add_argument("--users-file", help="a file of user ids, one per line")
    fg.add_argument(
        "--runs",
        action="append",
        default=[],
        metavar="URI",
        help="a run output to remove their rows from too (repeatable)",
    )
    fg.add_argument("--undo", action="store_true", help="take the ids off the deny-list (deleted data stays deleted)")
    fg.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="storage.KEY=VALUE",
        help="storage settings for object storage, e.g. --set storage.endpoint_url=...",
    )
    fg.set_defaults(func=_cmd_forget)
    pro = sub.add_parser("promote", help="point a profile store's CURRENT.json at a finished version")
    pro.add_argument("--store", required=True, help="the profile store's URI (profile_store.uri)")
    pro.add_argument("--version", required=True, help="versions/date=.../run=<id> (or the run id alone)")
    pro.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="storage.KEY=VALUE",
        help="storage settings for object storage, e.g. --set storage.endpoint_url=...",
    )
    pro.set_defaults(func=_cmd_promote)
    score = sub.add_parser("score", help="official LaMP metrics of an outputs-format predictions file")
    score.add_argument("pred", help='predictions: {"task": ..., "golds": [{"id", "output"}]}')
    score.add_argument("gold", help="golds in the same format (a LaMP *_outputs.json)")
    score.add_argument("--task", help="task name when the files do not say (or to pick LaMP_2_news)")
    score.set_defaults(func=_cmd_score)
    return parser


def _user_error_cause(exc: BaseException) -> StepbackError | None:
    """The :class:`StepbackError` behind an exception re-raised by Ray from a worker, if there is one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StepbackError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else (exc.__cause__ or exc.__context__)
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job, ``kill``, a container stop): ended like Ctrl-C, so a run keeps what
    it committed and resumes with the same run id."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own_signals = threading.current_thread() is threading.main_thread()  # (a handler is set from there only)
    previous = signal.signal(signal.SIGTERM, _terminate) if own_signals else None
    try:
        return args.func(args)
    except StepbackError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except Exception as e:  # noqa: BLE001 - a user error raised inside a Ray worker arrives wrapped
        cause = _user_error_cause(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return getattr(cause, "exit_code", 2)
    except Terminated:
        print("interrupted (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if own_signals:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    raise SystemExit(main())
