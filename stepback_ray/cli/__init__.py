"""The ``stepback`` command.

    stepback run JOB.yaml [--set key=value ...]     run a job end to end and print its metrics table
    stepback profile JOB.yaml [--set ...]           profile only (the nightly job; with a profile store,
                                                    only users whose history changed are recomputed)
    stepback plan JOB.yaml [--tokens-per-s N]       dry run: users, queries, tokens and GPU-hours, no model
                   [--sample N] [--users N]         (of N users drawn by id hash, scaled to the input or N users;
                   [--changed FRACTION]              a full rebuild and an incremental night)
    stepback submit JOB.yaml --address URL          submit a job to a Ray cluster (Ray Jobs) and follow it
    stepback submit --status ID --address URL       a submitted job's status (--logs ID: its logs so far)
    stepback score PRED.json GOLD.json [--task T]   official LaMP metrics of a predictions file, as JSON
    stepback train-pplug JOB.yaml [--set ...]       train the Persona-Plug projector (the LLM stays frozen)
    stepback report RUN_URI                         (re)build a finished run's report.html and figures
    stepback promote --store URI --version V        point a profile store's CURRENT.json at a finished version
    stepback forget --store URI --user ID           remove a user everywhere and keep them out (--dry-run: show)
    stepback store versions --store URI [--json]    a store's versions: state, counts, gate, engine, which is current
    stepback store show --store URI --user ID       a user's current profile as JSON
    stepback store verify --store URI [--version V] a version's files against their recorded checksums
    stepback --version                              the installed stepback-ray's version

Bad input or configuration (a damaged file of a run or store included) ends with one line on stderr (``error:
...``) and exit status 2, never a traceback; work that could not be done (engine errors over
``max_error_fraction``, an engine that kept dying, a full disk, a forget that met damaged files) exits 3; a profile
store version refused by the quality gate (``profile_store.gate``) exits 4; Ctrl-C exits 130 and SIGTERM 143,
both with one line, a run resumable. Only a bug in stepback-ray ends in a traceback (exit 1).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from stepback_ray import __version__
from stepback_ray.cli import jobs, results, store
from stepback_ray.cli.common import positive_float
from stepback_ray.cli.jobs import format_table
from stepback_ray.errors import StepbackError

__all__ = ["build_parser", "format_table", "main", "positive_float"]

COMMAND_GROUPS = (jobs, store, results)
"""The modules that declare the commands, in the order ``stepback --help`` lists them; each has ``register``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepback", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"stepback-ray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
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


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler of a command (``stepback``, a benchmark): :class:`Terminated` in the main thread."""
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own_signals = threading.current_thread() is threading.main_thread()  # (a handler is set from there only)
    previous = signal.signal(signal.SIGTERM, raise_terminated) if own_signals else None
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
