"""The report of a ``stepback profile`` run: ``report.html`` next to its manifest.

Built from the run's manifest and the profile files it names, so ``stepback report`` rebuilds it as it does a
run's: where the profiles went (the store's version, what it built on), where each user's profile came from
(carried over, recomputed, updated, new), the statuses, a few failed users with their status, the model-free
quality measures, the quality gate's checks, and the seconds of each phase. A failed run's report says why it
failed and shows what the run had measured before it stopped (a version the gate refused has all of it).
"""

from __future__ import annotations

import html
from typing import Any

from stepback_ray.data.rows import status_kind
from stepback_ray.evaluation.report_parts import (
    counted,
    facts_table,
    page,
    profile_section,
    rows_table,
    timings_section,
)
from stepback_ray.storage import RunStore

FAILED_EXAMPLES = 5
"""Users with a failed profile shown by name, the first in chunk order."""

STATUS_CHARS = 300
"""A failed profile's status is cut to this many characters (an engine error's text can run long)."""


def profile_run_stats(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """What the run measured about its profiles: a finished run's ``profiles``, or what a failed run had measured
    before it stopped (``counts.profile_stats``), with where they are (``uri``, ``folder``)."""
    if manifest.get("status") == "failed":
        return (manifest.get("counts") or {}).get("profile_stats")
    return manifest.get("profiles")


def failed_examples(store: RunStore, stats: dict[str, Any] | None, most: int = FAILED_EXAMPLES) -> list[list[Any]]:
    """The first ``most`` users whose profile status is not ``ok`` (chunk order): chunk, user, status."""
    if not stats or not stats.get("uri") or not stats.get("folder"):
        return []
    if not sum(n for k, n in (stats.get("statuses") or {}).items() if k != "ok"):
        return []
    pstore = RunStore(stats["uri"], store.storage)
    out: list[list[Any]] = []
    for rel in pstore.list(stats["folder"], ".parquet"):
        for r in pstore.read_table(rel, columns=["chunk_id", "user_id", "status"]).to_pylist():
            if status_kind(r["status"]) != "ok":
                out.append([r["chunk_id"], r["user_id"], (r["status"] or "")[:STATUS_CHARS]])
                if len(out) >= most:
                    return out
    return out


def _gate_section(gate: dict[str, Any] | None) -> str:
    if not gate:
        return "<h2>Quality gate</h2>\n<p>none configured (profile_store.gate)</p>"
    verdict = "passed" if gate.get("passed") else '<span class="failed">failed</span>'
    rows = [
        [c["check"], "not measurable" if c["value"] is None else c["value"], c["limit"], c["passed"], c["detail"]]
        for c in gate.get("checks", [])
    ]
    return f"<h2>Quality gate: {verdict}</h2>\n" + rows_table(["check", "value", "limit", "passed", "detail"], rows)


def _store_facts(stats: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    if stats.get("store_uri"):
        facts["profile store"] = stats["store_uri"]
        facts["version"] = stats.get("version")
        facts["built on"] = stats.get("previous") or "nothing (an empty store)"
        facts["full rebuild"] = stats.get("full_rebuild")
    facts["users deleted since the base version"] = stats.get("deleted")
    facts["LLM calls"] = stats.get("llm_calls")
    facts["prompt / generated tokens"] = f"{stats.get('prompt_tokens')} / {stats.get('completion_tokens')}"
    facts["engine tokens/s"] = stats.get("tokens_per_s")
    if stats.get("forgotten_during_run"):
        facts["rows of users forgotten during the run"] = stats["forgotten_during_run"]
    for d in stats.get("damaged_base_files", []):
        facts[f"damaged in the base version: {d['file']}"] = f"{d['problem']} (its users were recomputed)"
    return facts


def profile_report_html(manifest: dict[str, Any], examples: list[list[Any]]) -> str:
    """The page, from the run's manifest and the failed users found in its profile files."""
    stats = profile_run_stats(manifest) or {}
    counts = manifest.get("counts") or {}
    facts = {
        "run": manifest.get("run_id"),
        "task": (manifest.get("config") or {}).get("task"),
        "model": (manifest.get("config") or {}).get("engine", {}).get("model"),
        "output": manifest.get("output"),
        "status": manifest.get("status"),
        "finished": manifest.get("finished"),
        "resumed": manifest.get("resumed"),
    }
    read = counted({k: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)})
    if read:
        facts["counts"] = read
    parts = ["<h1>stepback-ray profile run report</h1>", facts_table(facts)]
    if manifest.get("status") == "failed":
        parts.append(f'<p class="failed">The run failed: {html.escape(str(manifest.get("error")))}</p>')
    if stats:
        parts.append(profile_section(stats))
        parts.append(facts_table(_store_facts(stats)))
    if examples:
        failed = sum(n for k, n in (stats.get("statuses") or {}).items() if k != "ok")
        parts.append(f"<h2>Profiles not ok ({failed}; the first {len(examples)})</h2>")
        parts.append(rows_table(["chunk", "user", "status"], examples))
    gate = stats.get("gate") or counts.get("gate")
    if stats.get("store_uri") or gate:
        parts.append(_gate_section(gate))
    parts.append(timings_section(manifest.get("timings")))
    return page(f"stepback-ray profile run {manifest.get('run_id')}", "\n".join(p for p in parts if p))


def build_profile_report(store: RunStore) -> str:
    """Write ``report.html`` of the profile run in ``store``; return its URI."""
    manifest = store.read_json("manifest.json")
    examples = failed_examples(store, profile_run_stats(manifest))
    store.write_bytes("report.html", profile_report_html(manifest, examples).encode())
    return store.uri_of("report.html")
