"""The commands that act on a profile store: ``forget`` and ``promote``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepback_ray.cli.common import add_set
from stepback_ray.config import storage_config
from stepback_ray.errors import InputError


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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the store commands to the ``stepback`` parser."""
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
    add_set(fg, storage_only=True)
    fg.set_defaults(func=_cmd_forget)
    pro = sub.add_parser("promote", help="point a profile store's CURRENT.json at a finished version")
    pro.add_argument("--store", required=True, help="the profile store's URI (profile_store.uri)")
    pro.add_argument("--version", required=True, help="versions/date=.../run=<id> (or the run id alone)")
    add_set(pro, storage_only=True)
    pro.set_defaults(func=_cmd_promote)
