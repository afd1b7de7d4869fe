"""The run report: ``report.html`` and its PNG figures, written next to a run's outputs.

Built only from what the run committed (manifest, metrics, the generation and profile files), so
``stepback report RUN_URI`` rebuilds it for any finished run, local or on object storage. It shows the metrics by
mode with bootstrap intervals, how personal the profiles are (identifiability, grounding), a few example users
side by side (their newest history items, their profile, each mode's output against the gold), the score against
history length, tokens and time per stage, throughput over time, and the rows that failed or were quarantined.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stepback_ray.config import StorageConfig
from stepback_ray.data.rows import status_kind
from stepback_ray.errors import InputError
from stepback_ray.evaluation.figures import FIGURES, draw_figures
from stepback_ray.evaluation.metrics import bootstrap_ci, score_notes
from stepback_ray.evaluation.profile_report import build_profile_report
from stepback_ray.evaluation.report_parts import cell, facts_table, page, profile_section, timings_section
from stepback_ray.storage import RunStore

EXAMPLES = 4
"""Example queries shown side by side (the first query ids of the first committed generation file)."""


def _column(table, name: str) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return table.column(name).to_numpy(zero_copy_only=False).astype(float)


def _load(store: RunStore) -> dict[str, Any]:
    """What the report shows, read one committed file at a time and kept as numeric arrays (a mode code, the
    score, the history length and the commit time per row: ~25 bytes per row, so a million users' rows fit in
    tens of MB) plus running counts; the rows themselves are never held."""
    manifest = store.read_json("manifest.json")
    metrics = store.read_json("metrics.json")
    modes = list(metrics["modes"])
    known = pa.array(modes, pa.string())
    # the pipeline counted the rows per status when it wrote the manifest; a manifest without that count (an
    # older run) has them counted here
    counted = (manifest.get("counts") or {}).get("generation_rows_by_status")
    statuses: dict[str, int] = dict(counted) if counted is not None else {}
    columns = ["mode", "score", "history_items", "committed_at"] + ([] if counted is not None else ["status"])
    parts: dict[str, list[np.ndarray]] = {"mode": [], "score": [], "history_items": [], "committed_at": []}
    for rel in store.list("generations", ".parquet"):
        t = store.read_table(rel, columns=columns)
        mode_code = pc.fill_null(pc.index_in(t.column("mode"), value_set=known), -1)
        parts["mode"].append(mode_code.to_numpy(zero_copy_only=False).astype(np.int16))
        for c in ("score", "history_items", "committed_at"):
            parts[c].append(_column(t, c))
        if counted is None:
            kinds = pc.value_counts(pc.utf8_slice_codeunits(pc.fill_null(t.column("status"), ""), 0, 200))
            for v in kinds.to_pylist():
                key = status_kind(v["values"])
                statuses[key] = statuses.get(key, 0) + v["counts"]
    gens = {c: (np.concatenate(v) if v else np.empty(0)) for c, v in parts.items()}
    profiles = manifest.get("profiles") or {}
    prof = {"committed_at": [], "prompt_tokens": 0.0, "completion_tokens": 0.0, "engine_seconds": 0.0}
    if profiles.get("uri") and profiles.get("folder"):
        pstore = RunStore(profiles["uri"], store.storage)
        for rel in pstore.list(profiles["folder"], ".parquet"):
            t = pstore.read_table(rel, columns=["committed_at", "prompt_tokens", "completion_tokens", "engine_seconds"])
            prof["committed_at"].append(_column(t, "committed_at"))
            for c in ("prompt_tokens", "completion_tokens", "engine_seconds"):
                prof[c] += float(np.nansum(_column(t, c)))
    prof["committed_at"] = np.concatenate(prof["committed_at"]) if prof["committed_at"] else np.empty(0)
    quarantined = 0
    reasons: dict[str, int] = {}
    for r in store.scan("quarantine", ["reason"]):
        quarantined += 1
        key = r["reason"].split(":")[0][:40]
        reasons[key] = reasons.get(key, 0) + 1
    return {
        "manifest": manifest,
        "metrics": metrics,
        "modes": modes,
        "gens": gens,
        "statuses": statuses,
        "profiles": prof,
        "quarantined": quarantined,
        "quarantine_reasons": reasons,
        "examples": _examples(store, profiles),
    }


def _examples(store: RunStore, profiles: dict[str, Any]) -> list[dict[str, Any]]:
    """The first :data:`EXAMPLES` queries of the first generation file, each with every mode's row, and the lead
    user's newest history items and profile from the profile file of the same shard."""
    files = store.list("generations", ".parquet")
    if not files:
        return []
    wanted = ["query_id", "mode", "user_id", "gold", "output", "score", "profile_text", "chunk_id", "status"]
    table = store.read_table(files[0])
    if not set(wanted) <= set(table.column_names):  # not a generation file as the pipeline writes it
        return []
    rows = table.select(wanted).to_pylist()
    by_query: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_query.setdefault(r["query_id"], {})[r["mode"]] = r
    chosen = sorted(by_query)[:EXAMPLES]
    recent: dict[str, list[str]] = {}
    if chosen and profiles.get("uri") and profiles.get("folder"):
        pstore = RunStore(profiles["uri"], store.storage)
        rel = f"{profiles['folder']}/chunk-{next(iter(by_query[chosen[0]].values()))['chunk_id']}.parquet"
        if pstore.exists(rel):
            t = pstore.read_table(rel)
            if "recent_items" in t.column_names:  # older profile files do not have it
                recent = {
                    r["user_id"]: r["recent_items"] or [] for r in t.select(["user_id", "recent_items"]).to_pylist()
                }
    out = []
    for q in chosen:
        modes = by_query[q]
        first = next(iter(modes.values()))
        out.append(
            {
                "query_id": q,
                "user_id": first["user_id"],
                "gold": first["gold"],
                "profile_text": next((r["profile_text"] for r in modes.values() if r["profile_text"]), None),
                "recent": recent.get(first["user_id"], []),
                "modes": modes,
            }
        )
    return out


def _intervals(data: dict[str, Any]) -> dict[str, tuple[float, float, float]]:
    gens = data["gens"]
    out = {}
    for k, mode in enumerate(data["modes"]):
        vals = gens["score"][(gens["mode"] == k) & ~np.isnan(gens["score"])]
        if len(vals):
            lo, hi = bootstrap_ci(vals, n_resamples=1000)
            out[mode] = (float(np.mean(vals)), lo, hi)
    return out


def _html(data: dict[str, Any], intervals: dict[str, tuple[float, float, float]]) -> str:
    m, man = data["metrics"], data["manifest"]
    keys = m["keys"]
    head = "".join(
        f"<th>{html.escape(k)}</th>"
        for k in ["mode", "users", "queries", *keys, "95 % CI of the score", "tokens/s", "statuses"]
    )
    rows = []
    for mode, v in m["modes"].items():
        ci = intervals.get(mode)
        cells = [
            mode,
            v["users"],
            v["queries"],
            *[("-" if v[k] is None else f"{v[k]:.4f}") for k in keys],
            f"[{ci[1]:.4f}, {ci[2]:.4f}]" if ci else "-",
            v["tokens_per_s"] if v["tokens_per_s"] else "-",
            ", ".join(f"{k}: {n}" for k, n in sorted(v["statuses"].items())),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    counts = man.get("counts", {})
    facts = {
        "run": man.get("run_id"),
        "task": m["task"],
        "model": man.get("config", {}).get("engine", {}).get("model"),
        "output": man.get("output"),
        "finished": man.get("finished"),
        "rows": f"{counts.get('generation_rows')} of {counts.get('expected_generation_rows')} expected",
        "quarantined input records": data["quarantined"],
    }
    notes = score_notes(m)
    if notes:
        facts["scores"] = "; ".join(notes)
    if data["quarantine_reasons"]:
        facts["quarantine reasons"] = ", ".join(f"{k}: {n}" for k, n in sorted(data["quarantine_reasons"].items()))
    figs = "".join(f'<figure><img src="{f}" alt="{f}"></figure>' for f in FIGURES)
    body = f"""<h1>stepback-ray run report</h1>
{facts_table(facts)}
<h2>Metrics by mode</h2>
<table><tr>{head}</tr>{"".join(rows)}</table>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
{profile_section(m.get("profiles"))}
{_examples_section(data["examples"], list(m["modes"]))}
{timings_section(man.get("timings"))}
<h2>Figures</h2>
{figs}"""
    return page(f"stepback-ray run {man.get('run_id')}", body)


def _examples_section(examples: list[dict[str, Any]], modes: list[str]) -> str:
    """A few users side by side: what they wrote before, their profile, and what each mode wrote for the query."""
    if not examples:
        return ""
    parts = ["<h2>Examples</h2>"]
    for ex in examples:
        recent = "".join(f"<li>{html.escape(t)}</li>" for t in ex["recent"]) or "<li>-</li>"
        rows = "".join(
            f"<tr><td>{html.escape(m)}</td><td>{cell(r.get('output'))}</td>"
            f"<td>{'-' if r.get('score') is None else format(r['score'], '.3f')}</td><td>{cell(r.get('status'))}"
            "</td></tr>"
            for m in modes
            if (r := ex["modes"].get(m)) is not None
        )
        parts.append(
            f'<div class="example"><table><tr><th>user</th><td>{cell(ex["user_id"])} (query {cell(ex["query_id"])})'
            f"</td></tr><tr><th>newest history items</th><td><ul>{recent}</ul></td></tr>"
            f"<tr><th>profile</th><td><pre>{cell(ex['profile_text'])}</pre></td></tr>"
            f"<tr><th>gold</th><td>{cell(ex['gold'])}</td></tr></table>"
            f"<table><tr><th>mode</th><th>output</th><th>score</th><th>status</th></tr>{rows}</table></div>"
        )
    return "\n".join(parts)


def is_profile_run(store: RunStore) -> bool:
    """``store`` holds a ``stepback profile`` run (finished or failed): its manifest says so, and it has no metrics
    (a profile run scores nothing)."""
    return (
        not store.exists("metrics.json")
        and store.exists("manifest.json")
        and store.read_json("manifest.json").get("command") == "profile"
    )


def check_finished_run(store: RunStore) -> None:
    """A report is built from a finished run: say so in one line when ``store`` is not one (a missing folder, a
    mistyped one, a run that stopped before its manifest)."""
    missing = [name for name in ("manifest.json", "metrics.json") if not store.exists(name)]
    if not missing:
        return
    if not store.exists(""):
        raise InputError(
            store.uri, "no such folder (expected a finished run's output, with manifest.json and metrics.json)"
        )
    raise InputError(
        store.uri,
        f"not a finished run: no {' and no '.join(missing)} (a run writes manifest.json last)",
    )


def build_report(uri: str, storage: StorageConfig | None = None) -> str:
    """Write ``report.html`` and its figures under the run's URI (a ``stepback profile`` run's:
    :mod:`~.profile_report`); return the report's URI."""
    store = RunStore(uri, storage or StorageConfig())
    if is_profile_run(store):
        return build_profile_report(store)
    check_finished_run(store)
    data = _load(store)
    intervals = _intervals(data)
    for name, png in draw_figures(data, intervals).items():
        store.write_bytes(name, png)
    store.write_bytes("report.html", _html(data, intervals).encode())
    return store.uri_of("report.html")
