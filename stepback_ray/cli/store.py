"""The commands that act on a profile store: ``forget``, ``promote`` and ``store`` (``versions``, ``show``,
``verify``: looking at a store without changing it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepback_ray.cli.common import add_set
from stepback_ray.config import storage_config
from stepback_ray.errors import InputError, RunFailed, StepbackError


def _cmd_forget(args: argparse.Namespace) -> int:
    from stepback_ray.store.forget import ForgetIncomplete, forget  # deferred: pyarrow

    ids = list(args.user)
    if args.users_file:
        path = Path(args.users_file)
        if not path.is_file():
            raise InputError(args.users_file, "no such file (one user id per line)")
        ids += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    try:
        record = forget(args.store, ids, args.runs, storage_config(args.set), undo=args.undo, dry_run=args.dry_run)
    except ForgetIncomplete as e:  # the audit record all the same, then the one line (exit 3)
        print(json.dumps(e.record, indent=1))
        raise
    print(json.dumps(record, indent=1))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from stepback_ray.store.gate import describe_failures  # deferred: pyarrow
    from stepback_ray.store.promote import promote  # deferred: pyarrow

    before, after, manifest = promote(args.store, args.version, storage_config(args.set), force=args.force)
    if before == after:
        print(f"{args.store}: {after} is already the current version; nothing moved")
        return 0
    gate = manifest.get("gate")
    note = (
        f" (its quality gate failed: {describe_failures(gate)}; promoted anyway)" if gate and not gate["passed"] else ""
    )
    print(f"{args.store}: CURRENT.json moved from {before or 'nothing'} to {after}{note}")
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    from stepback_ray.store.catalog import describe_versions, format_versions  # deferred: pyarrow
    from stepback_ray.store.reader import open_store  # deferred: pyarrow

    listing = describe_versions(open_store(args.store, storage_config(args.set)))
    print(json.dumps(listing, indent=1) if args.json else format_versions(listing))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from stepback_ray.store.reader import read_profiles  # deferred: pyarrow

    rows = read_profiles(args.store, [args.user], storage=storage_config(args.set)).to_pylist()
    if not rows:
        raise StepbackError(f"{args.store}: no user {args.user!r} in the current version")
    row = rows[0]
    profile = json.loads(row.pop("profile_json")) if row.get("profile_json") else None
    print(json.dumps({**row, "profile": profile}, indent=1, default=str))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from stepback_ray.store.integrity import check_files  # deferred: pyarrow
    from stepback_ray.store.promote import resolve_version  # deferred: pyarrow
    from stepback_ray.store.reader import current_version, open_store  # deferred: pyarrow

    root = open_store(args.store, storage_config(args.set))
    if args.version:
        version = resolve_version(root, args.store, args.version)
        if not root.exists(f"{version}/manifest.json"):
            raise StepbackError(f"{args.store}: {version} is not finished (no manifest.json): nothing to verify yet")
        manifest = root.read_json(f"{version}/manifest.json")
    else:
        pointer, manifest = current_version(root)
        version = pointer["version"]
    checks = check_files(root, version, manifest)
    for c in checks:
        how = "sha256" if c["check"] == "sha256" else "parsed, no checksum recorded"
        how += "" if c["named"] else "; not named in the manifest"
        print(f"{'damaged' if c['problem'] else 'ok':<8} {c['file']} ({c['problem'] or how})")
    damaged = [c["file"] for c in checks if c["problem"]]
    print(f"{version}: {len(checks)} files, {len(checks) - len(damaged)} ok, {len(damaged)} damaged")
    if damaged:
        raise RunFailed(f"{args.store}: {version}: {len(damaged)} damaged file(s): {', '.join(damaged)}")
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
    fg.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be removed (users, files, rows per file); write nothing",
    )
    add_set(fg, storage_only=True)
    fg.set_defaults(func=_cmd_forget)
    pro = sub.add_parser("promote", help="point a profile store's CURRENT.json at a finished version")
    pro.add_argument("--store", required=True, help="the profile store's URI (profile_store.uri)")
    pro.add_argument("--version", required=True, help="versions/date=.../run=<id> (or the run id alone)")
    pro.add_argument(
        "--force", action="store_true", help="also promote a dry-run version over a current version a model made"
    )
    add_set(pro, storage_only=True)
    pro.set_defaults(func=_cmd_promote)
    st = sub.add_parser("store", help="look at a profile store: its versions, a user's profile, its files' checksums")
    store_sub = st.add_subparsers(dest="store_command", required=True)
    ver = store_sub.add_parser("versions", help="every version: run, date, state, counts, gate, engine")
    ver.add_argument("--store", required=True, help="the profile store's URI")
    ver.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_set(ver, storage_only=True)
    ver.set_defaults(func=_cmd_versions)
    show = store_sub.add_parser("show", help="a user's current profile, as JSON")
    show.add_argument("--store", required=True, help="the profile store's URI")
    show.add_argument("--user", required=True, metavar="ID", help="the user id")
    add_set(show, storage_only=True)
    show.set_defaults(func=_cmd_show)
    verify = store_sub.add_parser("verify", help="check a version's files against the checksums its manifest records")
    verify.add_argument("--store", required=True, help="the profile store's URI")
    verify.add_argument("--version", help="versions/date=.../run=<id> or the run id (default: the current version)")
    add_set(verify, storage_only=True)
    verify.set_defaults(func=_cmd_verify)
