"""The run report's figures (PNG): scores per mode with their intervals, profile origins, seconds per pass,
throughput and failures, drawn from the data :mod:`~stepback_ray.evaluation.report` loads."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from stepback_ray.evaluation.metrics import score_notes
from stepback_ray.evaluation.report_parts import split_timings

FIGURES = ("metrics.png", "history.png", "stages.png", "throughput.png", "failures.png")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _steps(t: np.ndarray, most: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Sorted commit times and the running count, thinned to at most ``most`` points (a figure needs no more)."""
    t = np.sort(t[~np.isnan(t) & (t > 0)])
    n = np.arange(1, len(t) + 1)
    if len(t) > most:
        keep = np.unique(np.linspace(0, len(t) - 1, most).astype(int))
        t, n = t[keep], n[keep]
    return t, n


def pass_chart_inputs(timings: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """The bars of the seconds-per-phase chart, labelled without ``_s``: (the phases' wall times, the seconds spent
    within a pass: its engines' start and CPU seconds). Seconds only (:func:`~.report_parts.split_timings`): the
    counts beside them (engines started, preemptions) are in the report's timings table, not on this axis."""
    seconds, _ = split_timings(timings)
    wall, within = {}, {}
    for k, v in seconds.items():
        label = k[:-2].replace("_", " ")
        (within if ("engine" in k or "model_load" in k) else wall)[label] = v
    return wall, within


def draw_figures(data: dict[str, Any], intervals: dict[str, tuple[float, float, float]]) -> dict[str, bytes]:
    import matplotlib  # deferred: a second to import, and only a report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, gens, manifest = data["metrics"], data["gens"], data["manifest"]
    score_name = {"rouge": "ROUGE-1", "accuracy_f1": "accuracy", "mae_rmse": "absolute error"}[metrics["metric"]]
    figs: dict[str, bytes] = {}
    modes = list(metrics["modes"])

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    shown = [m for m in modes if m in intervals]
    means = [intervals[m][0] for m in shown]
    err = np.array(
        [[intervals[m][0] - intervals[m][1] for m in shown], [intervals[m][2] - intervals[m][0] for m in shown]]
    )
    ax.bar(shown, means, yerr=err if shown else None, capsize=4, color="#4C72B0")
    if not shown:  # no score to show (a run without golds): the figure says why
        note = (score_notes(metrics) or ["no scores"])[0]
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_ylabel(f"{score_name} (95 % CI)")
    ax.set_title("Score by mode")
    plt.setp(ax.get_xticklabels(), rotation=15)
    fig.tight_layout()
    figs["metrics.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for k, mode in enumerate(modes):
        keep = (gens["mode"] == k) & ~np.isnan(gens["history_items"]) & ~np.isnan(gens["score"])
        if not keep.any():
            continue
        h, s = gens["history_items"][keep], gens["score"][keep]
        edges = np.unique(np.quantile(h, np.linspace(0, 1, 6)))
        if len(edges) < 2:
            ax.plot([h.mean()], [s.mean()], marker="o", label=mode)
            continue
        idx = np.clip(np.digitize(h, edges[1:-1]), 0, len(edges) - 2)
        xs = [h[idx == k].mean() for k in range(len(edges) - 1) if (idx == k).any()]
        ys = [s[idx == k].mean() for k in range(len(edges) - 1) if (idx == k).any()]
        ax.plot(xs, ys, marker="o", label=mode)
    ax.set_xlabel("history items of the user")
    ax.set_ylabel(f"mean {score_name}")
    ax.set_title("Score against history length (quantile bins)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    figs["history.png"] = _png(fig)
    plt.close(fig)

    prof = data["profiles"]
    stages = ["profile"] + [f"gen: {m}" for m in modes]
    prompt = [prof["prompt_tokens"]] + [metrics["modes"][m]["prompt_tokens"] for m in modes]
    output = [prof["completion_tokens"]] + [metrics["modes"][m]["completion_tokens"] for m in modes]
    secs = [prof["engine_seconds"]] + [metrics["modes"][m]["engine_seconds"] for m in modes]
    wall, within = pass_chart_inputs(manifest.get("timings", {}))
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(11.5, 3.4))
    a1.bar(stages, prompt, label="prompt tokens", color="#4C72B0")
    a1.bar(stages, output, bottom=prompt, label="generated tokens", color="#DD8452")
    a1.set_title("Tokens per stage")
    a1.legend(fontsize=7)
    a2.bar(stages, secs, color="#55A868")
    a2.set_title("Engine seconds per stage")
    a3.bar(list(wall), list(wall.values()), color="#8172B3", label="wall time")
    if within:
        a3.bar(list(within), list(within.values()), color="#CCB974", label="within its pass")
        a3.legend(fontsize=7)
    a3.set_ylabel("seconds")
    a3.set_title(f"Seconds per phase (total {manifest.get('timings', {}).get('total_s', 0):.0f} s)")
    for a in (a1, a2, a3):
        plt.setp(a.get_xticklabels(), rotation=25, ha="right", fontsize=7)
    fig.tight_layout()
    figs["stages.png"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    series = [
        (label, *_steps(stamps))
        for label, stamps in (("profiles", prof["committed_at"]), ("generation rows", gens["committed_at"]))
    ]
    starts = [t[0] for _, t, _ in series if len(t)]
    for label, t, n in series:
        if len(t):
            ax.step(t - min(starts), n, where="post", label=label)
    ax.set_xlabel("seconds since the first commit")
    ax.set_ylabel("rows committed")
    ax.set_title("Throughput over time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["throughput.png"] = _png(fig)
    plt.close(fig)

    statuses = dict(data["statuses"])
    if data["quarantined"]:
        statuses["quarantined input"] = data["quarantined"]
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    keys = sorted(statuses)
    ax.barh(keys, [statuses[k] for k in keys], color=["#55A868" if k == "ok" else "#C44E52" for k in keys])
    for i, k in enumerate(keys):
        ax.text(statuses[k], i, f" {statuses[k]}", va="center", fontsize=8)
    ax.set_title("Rows by status (and quarantined input records)")
    fig.tight_layout()
    figs["failures.png"] = _png(fig)
    plt.close(fig)
    return figs
