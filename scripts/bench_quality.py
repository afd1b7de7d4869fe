"""Quality benchmark: every generation mode on the shared dev sets, with bootstrap 95 % intervals.

    python scripts/bench_quality.py --users 200 --sets lamp5_arxiv --write docs/benchmarks.md
    python scripts/bench_quality.py --users 40 --sets lamp5_arxiv,psw_title,lamp4_huffpost
    python scripts/bench_quality.py --users 200 --sets lamp5_arxiv --pplug-checkpoint runs/pplug-lamp5/main

Each set is one stepback job with all modes (the profile pass is shared by the modes). Runs go to
``runs/bench_quality/<set>-<users>`` with a fixed run id, so an interrupted benchmark resumes where it stopped.
Per mode it reports the mean ROUGE-1 / ROUGE-L with a percentile bootstrap interval over queries, and the paired
differences that answer the two questions that matter: does personalization help beyond prompt format
(``profile+rag`` - ``random-profile``), and does the best mode beat the input-only baseline (best - ``none``)?
It prints one JSON object and, with ``--write``, replaces its section in the given markdown file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from benchdoc import machine, markers, write_section  # noqa: E402
from stepback_ray.config import load_job  # noqa: E402
from stepback_ray.metrics import bootstrap_ci  # noqa: E402
from stepback_ray.pipeline import ray_session, run_job  # noqa: E402

SETS = {
    "lamp5_arxiv": ("LaMP_5", "lamp5_arxiv/dev"),
    "psw_title": ("PSW_title", "psw_arxiv/title_dev"),
    "psw_abstract": ("PSW_abstract", "psw_arxiv/abstract_dev"),
    "lamp4_huffpost": ("LaMP_4", "lamp4_huffpost/dev"),
}
MODES = ["none", "rag", "profile", "profile+rag", "random-profile"]
START, END = markers("bench_quality")


def paired(a: pd.Series, b: pd.Series, n: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over the same queries, with a paired bootstrap interval."""
    d = (a - b).dropna().to_numpy()
    lo, hi = bootstrap_ci(d, n_resamples=n, seed=seed)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "n": int(len(d))}


def evaluate_set(name: str, users: int, data_root: Path, overrides: list[str], modes: list[str]) -> dict:
    task, prefix = SETS[name]
    job = load_job(REPO / "jobs" / "demo.yaml", [
        f"task={task}", f"input.questions={data_root / (prefix + '_questions.json')}",
        f"input.outputs={data_root / (prefix + '_outputs.json')}", f"limit={users}", f"modes=[{', '.join(modes)}]",
        f"output={REPO / 'runs' / 'bench_quality' / f'{name}-{users}'}", "run_id=bench", "name=bench",
        "ray.progress_bars=false", *overrides])
    result = run_job(job)
    gens = pd.read_parquet(job.output_uri + "/generations", columns=["query_id", "mode", "rouge1", "rougeL"])
    wide1 = gens.pivot(index="query_id", columns="mode", values="rouge1")
    widel = gens.pivot(index="query_id", columns="mode", values="rougeL")
    table = {}
    for m in modes:
        lo1, hi1 = bootstrap_ci(wide1[m].dropna())
        loL, hiL = bootstrap_ci(widel[m].dropna())
        table[m] = {"rouge-1": float(wide1[m].mean()), "rouge-1_ci": [lo1, hi1], "rouge-L": float(widel[m].mean()),
                    "rouge-L_ci": [loL, hiL], "n": int(wide1[m].notna().sum()),
                    "tokens_per_s": result.metrics["modes"][m]["tokens_per_s"]}
    best = max((m for m in modes if m != "none"), key=lambda m: table[m]["rouge-1"])
    diffs = {}
    if "profile+rag" in modes and "random-profile" in modes:
        diffs["profile+rag - random-profile"] = paired(wide1["profile+rag"], wide1["random-profile"])
    if "none" in modes:
        diffs[f"{best} - none"] = paired(wide1[best], wide1["none"])
        for m in ("profile+rag", "pplug", "pplug+profile"):
            if m in modes and m != best:
                diffs[f"{m} - none"] = paired(wide1[m], wide1["none"])
    return {"set": name, "task": task, "users": users, "queries": int(len(wide1)), "modes": table, "best": best,
            "paired_rouge1": diffs, "profiles": result.metrics.get("profiles"),
            "wall_s": result.manifest["timings"]["total_s"]}


def to_markdown(report: dict) -> str:
    lines = [START, "", f"### Quality by mode ({report['date']}, {report['machine']})", "",
             f"Model `{report['model']}`, greedy decoding; ROUGE F-measure, mean over queries with a percentile "
             "bootstrap 95 % interval (2000 resamples). Command: `python scripts/bench_quality.py "
             f"{report['command']}`.", ""]
    for s in report["sets"]:
        lines += [f"**{s['set']}** ({s['task']}, {s['users']} users/papers, {s['queries']} queries, "
                  f"{s['wall_s'] / 60:.0f} min)", "",
                  "| mode | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] | tokens/s |", "|---|---|---|---|"]
        for m, r in s["modes"].items():
            lines.append(f"| {m} | {r['rouge-1']:.4f} [{r['rouge-1_ci'][0]:.4f}, {r['rouge-1_ci'][1]:.4f}] | "
                         f"{r['rouge-L']:.4f} [{r['rouge-L_ci'][0]:.4f}, {r['rouge-L_ci'][1]:.4f}] | "
                         f"{r['tokens_per_s']} |")
        lines += ["", "| paired difference (ROUGE-1) | mean [95 % CI] | above 0? |", "|---|---|---|"]
        for k, d in s["paired_rouge1"].items():
            verdict = "yes" if d["lo"] > 0 else ("no (below 0)" if d["hi"] < 0 else "no (interval spans 0)")
            lines.append(f"| {k} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {verdict} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=200, help="users (LaMP) or papers (PSW) per set")
    ap.add_argument("--sets", default="lamp5_arxiv,psw_title,lamp4_huffpost")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--set", action="append", default=[], help="job-spec override, as for `stepback run`")
    ap.add_argument("--pplug-checkpoint", help="a `stepback train-pplug` output: adds modes pplug, pplug+profile")
    ap.add_argument("--write", help="markdown file whose bench_quality section is replaced")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if args.pplug_checkpoint:
        modes += [m for m in ("pplug", "pplug+profile") if m not in modes]
        args.set.append(f"pplug.checkpoint={Path(args.pplug_checkpoint).resolve()}")
    first = load_job(REPO / "jobs" / "demo.yaml", args.set)
    with ray_session(first):
        sets = [evaluate_set(s, args.users, Path(args.data), args.set, modes) for s in args.sets.split(",")]
    report = {"date": dt.date.today().isoformat(),
              "machine": machine(),
              "model": first.engine.model, "command": " ".join(sys.argv[1:]), "sets": sets}
    print(json.dumps(report, indent=1))
    if args.write:
        write_section(Path(args.write), "bench_quality", "Quality", to_markdown(report))


if __name__ == "__main__":
    main()
