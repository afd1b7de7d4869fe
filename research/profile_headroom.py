"""How much a profile *could* add to a title benchmark, read off a finished quality run (no model calls).

    python -m research.profile_headroom bench-runs/qwen2.5-coder-0.5b-instruct/lamp5_arxiv-200 \\
        --data ../shared/data/lamp5_arxiv/dev_questions.json --write

Two questions, answered from the run's committed rows (``generations/`` with every query's sampled candidates,
``profiles/``) and the users' histories:

1. **Where the missed words are.** For each query, the gold title's content words that the ``rag`` answer
   missed, split by where they occur: in the abstract (the model chose other words from it), in the user's past
   titles, in the step-back profile, or nowhere in the prompt's reach. A profile can only raise ROUGE-1 through
   words it holds or through the choice it steers among the abstract's words.
2. **The profile used to choose, not to prompt.** The ``rag`` prompt's candidates (greedy + sampled) re-chosen
   with the selection rule of :mod:`stepback_ray.generation.selection` under different references: consensus alone (what
   ``rag`` keeps), plus the user's own past titles, plus the profile's LLM fields, both, and the same with
   another user's (the donor derangement of the random-profile control). Each against consensus with a paired
   bootstrap interval. This is the profile's effect with the prompt held fixed: it cannot be copied into the
   answer, only pick among answers the model already gives.

Prints one JSON object; ``--write`` keeps it as ``docs/results/research/profile_headroom-<run folder>.json``,
``--markdown`` prints its tables (what docs/experiments.md summarizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from pathlib import Path

from benchmarks.benchdoc import machine, save_record

REPO = Path(__file__).resolve().parents[1]

STOP = set("a an the of for and in on with to via from by at is are as its using towards toward into".split())
SECTION = "profile_headroom"


def words(text: str | None) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", (text or "").lower()) if w not in STOP}


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    import numpy as np

    from stepback_ray.evaluation.metrics import bootstrap_ci

    keys = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in keys])
    lo, hi = bootstrap_ci(d, n_resamples=2000, seed=0)
    return {"mean": round(float(d.mean()), 4), "lo": round(lo, 4), "hi": round(hi, 4), "n": len(keys)}


def headroom(run: Path, questions: Path, mode: str = "rag") -> dict:
    import numpy as np
    import pandas as pd

    from stepback_ray.data.rows import donors, most_recent_first
    from stepback_ray.evaluation.metrics import rouge
    from stepback_ray.generation.selection import MAX_OWN_OUTPUTS, PersonalRefs, scores
    from stepback_ray.profiling import render_profile
    from stepback_ray.tasks import get_task

    gens = pd.read_parquet(run / "generations")
    profiles = pd.read_parquet(run / "profiles", columns=["user_id", "profile_json"])
    task = get_task(str(gens["task"].dropna().iloc[0]) if gens["task"].notna().any() else "LaMP_5")
    fields = {
        u: render_profile(json.loads(p), task, habits=False)
        for u, p in zip(profiles.user_id, profiles.profile_json)
        if p
    }
    history = {q["id"]: q["profile"] for q in json.loads(questions.read_text())}
    rows = gens[gens["mode"] == mode]
    if rows.empty or rows["candidates"].isna().all():
        raise SystemExit(f"{run}: no {mode} rows with candidates (run with generation.candidates > 1)")
    hist_of = {r.user_id: history[r.query_id] for r in rows.itertuples()}
    donor = donors(sorted(hist_of), 0)

    def own(u: str) -> list[str]:
        return [it["title"] for it in most_recent_first(hist_of[u])[:MAX_OWN_OUTPUTS]]

    refs = {
        "consensus": lambda u: PersonalRefs(),
        "own titles": lambda u: PersonalRefs(own(u), []),
        "profile fields": lambda u: PersonalRefs([], [fields.get(u, "")]),
        "own titles + profile": lambda u: PersonalRefs(own(u), [fields.get(u, "")]),
        "another user's titles + profile": lambda u: PersonalRefs(own(donor[u]), [fields.get(donor[u], "")]),
        "another user's profile": lambda u: PersonalRefs([], [fields.get(donor[u], "")]),
    }
    chosen: dict[str, dict[str, float]] = {k: {} for k in refs}
    oracle, missed, length_corr = {}, [], []
    for r in rows.itertuples():
        cands = list(r.candidates)
        # the length habit: does a candidate's closeness to the user's median title length predict its score?
        median = float(np.median([len(it["title"].split()) for it in hist_of[r.user_id]] or [0]))
        closeness = np.array([-abs(len(c.split()) - median) for c in cands])
        got = np.array([rouge(c, r.gold)[0] for c in cands])
        if closeness.std() > 0 and got.std() > 0:
            length_corr.append(float(np.corrcoef(closeness, got)[0, 1]))
        for name, make in refs.items():
            s = scores(task, cands, make(r.user_id))
            chosen[name][r.query_id] = rouge(cands[int(np.argmax(s))], r.gold)[0]
        oracle[r.query_id] = float(got.max())
        gold, out = words(r.gold), words(r.output)
        miss = gold - out
        past = set().union(*[words(it["title"]) for it in hist_of[r.user_id]]) if hist_of[r.user_id] else set()
        prof = words(fields.get(r.user_id))
        abstract = words(r.input)
        missed.append(
            {
                "gold": len(gold),
                "missed": len(miss),
                "in abstract": len(miss & abstract),
                "in past titles only": len((miss - abstract) & past),
                "in profile only": len((miss - abstract - past) & prof),
                "nowhere": len(miss - abstract - past - prof),
                "in profile (anywhere)": len(miss & prof),
            }
        )
    miss_mean = {k: round(float(np.mean([m[k] for m in missed])), 2) for k in missed[0]}
    means = {k: round(float(np.mean(list(v.values()))), 4) for k, v in chosen.items()}
    diffs = {f"{k} - consensus": paired(v, chosen["consensus"]) for k, v in chosen.items() if k != "consensus"}
    diffs["own titles + profile - another user's titles + profile"] = paired(
        chosen["own titles + profile"], chosen["another user's titles + profile"]
    )
    greedy = {r.query_id: rouge(r.candidates[0], r.gold)[0] for r in rows.itertuples()}
    return {
        "run": str(run),
        "mode": mode,
        "queries": len(rows),
        "candidates": int(rows["candidates"].map(len).max()),
        "missed_words": miss_mean,
        "selection_rouge1": means,
        "greedy_rouge1": round(float(np.mean(list(greedy.values()))), 4),
        "oracle_rouge1": round(float(np.mean(list(oracle.values()))), 4),
        "differences": diffs,
        "length_habit_correlation": round(float(np.mean(length_corr)), 4),
        "length_habit_queries": len(length_corr),
    }


def section(run: str) -> str:
    """One section per run (``profile_headroom:<run folder>``)."""
    return f"{SECTION}-{Path(run).name}"


def to_markdown(res: dict, command: str) -> str:
    m = res["missed_words"]
    lines = [
        f"### Profile headroom: {Path(res['run']).name} ({dt.date.today().isoformat()}, {machine()})",
        "",
        f"Read off the rows of `{res['run']}` ({res['queries']} queries, `{res['mode']}` prompts, "
        f"{res['candidates']} candidates each), no model calls. Command: `python -m research.profile_headroom "
        f"{command}`.",
        "",
        f"**Where the gold words the `{res['mode']}` answer missed are** (content words per title, mean): the gold "
        f"has {m['gold']}, the answer misses {m['missed']}: {m['in abstract']} are in the task input (the abstract or "
        f"article: the model chose other words from it), {m['in past titles only']} only in the user's past "
        f"titles, {m['in profile only']} "
        f"only in the profile, {m['nowhere']} nowhere in reach. The profile holds {m['in profile (anywhere)']} of "
        "the missed words in all.",
        "",
        "**The profile used to choose among the same prompt's candidates** (the prompt held fixed; greedy "
        f"{res['greedy_rouge1']:.4f}, best candidate in hindsight {res['oracle_rouge1']:.4f}):",
        "",
        "| references for the choice | ROUGE-1 |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in res["selection_rouge1"].items()]
    lines += ["", "| paired difference (ROUGE-1) | mean [95 % CI] |", "|---|---|"]
    lines += [f"| {k} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |" for k, d in res["differences"].items()]
    lines += [
        "",
        f"Length habit: within a query, a candidate's closeness to the user's median past title length against "
        f"its ROUGE-1, mean Pearson r {res['length_habit_correlation']:+.3f} over {res['length_habit_queries']} "
        "queries whose candidates differ.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished bench_quality run folder with generations/ and profiles/")
    ap.add_argument("--data", required=True, help="the set's *_questions.json (the users' histories)")
    ap.add_argument("--mode", default="rag")
    ap.add_argument("--write", action="store_true", help="keep the result in docs/results/research/")
    ap.add_argument("--markdown", action="store_true", help="print the result's tables as markdown (to stderr)")
    args = ap.parse_args()
    res = headroom(Path(args.run), Path(args.data), args.mode)
    print(json.dumps(res, indent=1))
    if args.markdown:
        print(to_markdown(res, " ".join(sys.argv[1:])), file=sys.stderr)
    if args.write:
        record = {**res, "date": dt.date.today().isoformat(), "machine": machine(), "command": " ".join(sys.argv[1:])}
        print(f"kept: {save_record('research/' + section(args.run), record)}", file=sys.stderr)


if __name__ == "__main__":
    main()
