"""The versions of a profile store as an operator looks at them (``stepback store versions``): each with its run,
its date, its state, what its profiles are (by origin and status), its quality gate's verdict and the engine that
made it.

A version's state:

- ``current``: the version ``CURRENT.json`` points at (also one the gate refused and an operator promoted);
- ``complete``: finished (it has its manifest), not current: an older night, or one rolled back from;
- ``failed at the gate``: finished, refused by the quality gate, never promoted (``stepback promote`` serves it);
- ``in progress``: no manifest yet, building on the current version (a run still going, or one that failed and can
  resume with the same run id);
- ``abandoned``: no manifest, building on a version that is no longer current: it can never commit (retention keeps
  it for an operator to remove).
"""

from __future__ import annotations

from typing import Any

from stepback_ray.storage import RunStore
from stepback_ray.store.gate import describe_failures
from stepback_ray.store.layout import engine_of, list_versions, read_pointer

STATES = ("current", "complete", "failed at the gate", "in progress", "abandoned")


def describe_versions(root: RunStore) -> dict[str, Any]:
    """The store's versions, oldest first by the time they finished (unfinished ones after the finished ones of
    their day), with the version ``CURRENT.json`` points at; a damaged pointer is reported (``pointer_problem``)
    instead of raised, so that an operator can see which version to promote."""
    current, _, problem = read_pointer(root, damaged_ok=True)
    current_version = (current or {}).get("version")
    versions = [_describe(root, v, current_version) for v in list_versions(root)]
    versions.sort(key=lambda d: (d["finished_at"] or f"{d['date']}T~", d["version"]))
    out: dict[str, Any] = {"store": root.uri, "current": current_version, "versions": versions}
    if problem:
        out["pointer_problem"] = f"CURRENT.json is damaged: {problem}"
    return out


def _describe(root: RunStore, version: str, current: str | None) -> dict[str, Any]:
    day = version.split("date=", 1)[-1].split("/", 1)[0]
    run_id = version.rsplit("run=", 1)[-1]
    manifest = root.read_json(f"{version}/manifest.json") if root.exists(f"{version}/manifest.json") else None
    about: dict[str, Any] = {"version": version, "run_id": run_id, "date": day, "current": version == current}
    if manifest is None:
        started = root.read_json(f"{version}/started.json") if root.exists(f"{version}/started.json") else {}
        base = started.get("previous")
        return {
            **about,
            "state": "in progress" if base == current else "abandoned",
            "finished_at": None,
            "builds_on": base,
            "users": None,
            "origins": {},
            "statuses": {},
            "gate": None,
            "engine_kind": None,
            "model": None,
        }
    gate = manifest.get("gate")
    failed = bool(gate) and gate.get("passed") is False
    kind, model = engine_of(manifest)
    return {
        **about,
        "state": "current" if version == current else "failed at the gate" if failed else "complete",
        "finished_at": manifest.get("finished_at"),
        "builds_on": manifest.get("previous"),
        "users": manifest.get("users"),
        "origins": {k: v for k, v in (manifest.get("origins") or {}).items() if v},
        "statuses": manifest.get("statuses") or {},
        "gate": None if not gate else {"passed": bool(gate.get("passed")), "failures": describe_failures(gate) or None},
        "engine_kind": kind,
        "model": model,
        "full_rebuild": manifest.get("full_rebuild"),
    }


def format_versions(listing: dict[str, Any]) -> str:
    """The versions as a plain table (``*`` marks the current one), one line per version."""

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items()) or "-"

    def gate(g: dict[str, Any] | None) -> str:
        return "-" if g is None else "passed" if g["passed"] else "failed"

    header = ("", "run", "date", "state", "engine", "model", "users", "origins", "statuses", "gate")
    rows = [
        (
            "*" if v["current"] else "",
            v["run_id"],
            v["date"],
            v["state"],
            v["engine_kind"] or "-",
            v["model"] or "-",
            "-" if v["users"] is None else str(v["users"]),
            counts(v["origins"]),
            counts(v["statuses"]),
            gate(v["gate"]),
        )
        for v in listing["versions"]
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append(f"current: {listing['current'] or 'none'}")
    if listing.get("pointer_problem"):
        lines.append(listing["pointer_problem"])
    lines += [f"{v['run_id']}: gate failed: {v['gate']['failures']}" for v in listing["versions"] if _failed(v)]
    return "\n".join(lines)


def _failed(v: dict[str, Any]) -> bool:
    return bool(v["gate"]) and not v["gate"]["passed"]
