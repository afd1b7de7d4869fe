"""What the run report and the profile report share: the page around them, tables of facts, the profiles'
section (statuses, origins, their model-free quality) and the timings, seconds apart from counts."""

from __future__ import annotations

import html
from typing import Any

STYLE = """body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
th { background: #f3f3f3; }
figure { display: inline-block; margin: 6px; vertical-align: top; }
img { max-width: 520px; border: 1px solid #ddd; }
pre { white-space: pre-wrap; margin: 0; font-size: 13px; }
.example { margin-bottom: 18px; }
.failed { color: #b00; }"""


def cell(v: Any) -> str:
    """A value as escaped table text; None as a dash."""
    return html.escape("-" if v is None else str(v))


def page(title: str, body: str) -> str:
    """A whole HTML page: ``title`` (escaped here) and ``body`` (HTML already)."""
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>\n{STYLE}\n</style></head><body>\n{body}\n</body></html>\n"
    )


def facts_table(facts: dict[str, Any]) -> str:
    """One row per fact: its name, its value."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>" for k, v in facts.items())
    return f"<table>{body}</table>"


def rows_table(header: list[str], rows: list[list[Any]]) -> str:
    """A table with a header row."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def counted(counts: dict[str, int] | None) -> str:
    """``{"ok": 18, "error": 2}`` as ``error: 2, ok: 18`` (zeros left out)."""
    return ", ".join(f"{k}: {n}" for k, n in sorted((counts or {}).items()) if n)


def profile_section(stats: dict[str, Any] | None) -> str:
    """The profile pass: statuses, origins and the model-free measures of how personal the profiles are."""
    if not stats:
        return ""
    q = stats.get("quality") or {}
    facts = {
        "users": stats.get("users"),
        "statuses": counted(stats.get("statuses")),
        "origins": ", ".join(f"{k}: {n}" for k, n in sorted((stats.get("origins") or {}).items())),
    }
    for key, label in (
        ("identifiability", "identifiability (LLM fields)"),
        ("identifiability_with_habits", "identifiability (as prompted, with habits)"),
    ):
        ident = q.get(key) or {}
        if ident.get("top1") is not None:
            facts[label] = (
                f"top-1 {ident['top1']:.3f} (chance {ident['chance_top1']:.3f}), MRR {ident['mrr']:.3f} "
                f"(chance {ident['chance_mrr']:.3f}) over {ident['users']} users"
            )
        elif ident:
            facts[label] = f"not measurable over {ident.get('users')} users (under two, or no searchable word)"
    if (q.get("grounding") or {}).get("keywords_grounded") is not None:
        facts["keywords found in the user's own history"] = f"{q['grounding']['keywords_grounded']:.1%}"
    if q.get("copied_from_example") is not None:
        facts["profiles repeating the worked example"] = f"{q['copied_from_example']:.1%}"
    return f"<h2>Profiles</h2>\n{facts_table(facts)}"


def split_timings(timings: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds, counts) of a manifest's ``timings``: a key ending in ``_s`` holds seconds (the phases' wall times,
    the engines' start costs and CPU seconds); any other number is a count (engines started, preemptions), which
    never belongs on an axis of seconds. ``total_s`` is left out (the reports show it apart)."""
    seconds, counts = {}, {}
    for k, v in timings.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or k == "total_s":
            continue
        (seconds if k.endswith("_s") else counts)[k] = v
    return seconds, counts


def timings_section(timings: dict[str, Any] | None) -> str:
    """Each phase's seconds, then the counts the passes recorded beside them (engines started, preemptions)."""
    if not timings:
        return ""
    seconds, counts = split_timings(timings)
    total = timings.get("total_s")
    parts = ["<h2>Timings</h2>"]
    if total is not None:
        parts.append(f"<p>total {total:.1f} s</p>")
    if seconds:
        rows = [[k[:-2].replace("_", " "), f"{v:.2f}"] for k, v in seconds.items()]
        parts.append(rows_table(["phase", "seconds"], rows))
    if counts:
        parts.append(rows_table(["count", "value"], [[k.replace("_", " "), v] for k, v in counts.items()]))
    return "\n".join(parts)
