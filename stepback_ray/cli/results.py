"""The commands that read a run's results: ``report`` and ``score``."""

from __future__ import annotations

import argparse
import json

from stepback_ray.cli.common import add_set
from stepback_ray.config import storage_config


def _cmd_report(args: argparse.Namespace) -> int:
    from stepback_ray.evaluation.report import build_report  # deferred: numpy, pyarrow

    print(build_report(args.run, storage_config(args.set)))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from stepback_ray.evaluation.scoring import score_files  # deferred: numpy

    print(json.dumps(score_files(args.pred, args.gold, args.task)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the result commands to the ``stepback`` parser."""
    rep = sub.add_parser("report", help="(re)build the report of a finished run")
    rep.add_argument("run", help="the run's output URI")
    add_set(rep, storage_only=True)
    rep.set_defaults(func=_cmd_report)
    score = sub.add_parser("score", help="official LaMP metrics of an outputs-format predictions file")
    score.add_argument("pred", help='predictions: {"task": ..., "golds": [{"id", "output"}]}')
    score.add_argument("gold", help="golds in the same format (a LaMP *_outputs.json)")
    score.add_argument("--task", help="task name when the files do not say (or to pick LaMP_2_news)")
    score.set_defaults(func=_cmd_score)
