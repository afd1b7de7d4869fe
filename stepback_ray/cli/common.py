"""What the ``stepback`` commands share: the ``--set`` option and argument types checked before any work."""

from __future__ import annotations

import argparse
import math


def add_set(parser: argparse.ArgumentParser, *, storage_only: bool = False) -> None:
    """``--set KEY=VALUE`` (repeatable): a job-spec override, or for commands that take no job, a storage
    setting (``storage.endpoint_url`` and the like) for object storage."""
    if storage_only:
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="storage.KEY=VALUE",
            help="storage settings for object storage, e.g. --set storage.endpoint_url=...",
        )
    else:
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a job-spec key, e.g. --set limit=5 --set output=runs/x (repeatable)",
        )


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


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0 (``--sample``, ``--users``), checked before any work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number above 0")
    return value


def share(text: str) -> float:
    """An argparse type: a share of users above 0 and at most 1 (``--changed``), checked before any work."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a share above 0 and at most 1, e.g. 0.05")
    return value
