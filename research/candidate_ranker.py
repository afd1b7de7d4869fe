"""Learning the choice among sampled candidates, read off a finished quality run (no model calls).

    python -m research.candidate_ranker bench-runs/qwen2.5-coder-0.5b-instruct/lamp5_arxiv-200 \\
        --data ../shared/data/lamp5_arxiv/dev_questions.json --write

With ``generation.candidates: 8`` every query keeps one of 8 answers (greedy + 7 sampled) by the hand-made rule of
:mod:`stepback_ray.generation.selection`; the best candidate in hindsight scores far above the kept one, so the
candidates hold more than the rule finds. This study asks whether a small ranker over candidate features, trained on
other users' golds, finds more, and whether it finds more with the profile than without (issue #16:
``profile+rag - rag``).

- **Features** (:data:`FEATURES`) use nothing of the gold: the query's candidates, the task input, and what the
  mode has of a person. One definition serves every mode; what a mode does not have is 0: ``none`` has no person,
  ``rag`` the user's history but no profile, the profile modes both. ``random-profile`` gets the donor's history and
  profile, as its prompt and its selection rule do (the control: the same machinery with another person). The
  donor is the pipeline's own (:func:`stepback_ray.data.rows.donors` over each chunk's users, checked against the
  row's retrieved items); the row's ``profile_text`` column is the user's own profile in every mode, so it is
  not used for the control.
- **Label**: each candidate's ROUGE-1 against the gold. **Ranker**: ridge regression on within-query-centered
  features (standardized) and labels, so it learns which candidate is better *within* a query; the choice is the
  argmax of the predicted score (never an unparseable candidate; ties keep the earlier one, greedy first).
- **Cross-fitting grouped by user**: users are split into K folds; each query's choice comes from a ranker fit on
  the other folds' users only, so no query's own gold reaches its choice. One ranker per mode (each sees only
  that mode's candidates), with the same folds, features and regularization, so ``rag`` and ``profile+rag`` get
  the same learning machinery and their difference is paired over the same queries.

Reported per mode: ROUGE-1 of the greedy candidate, the kept output (the current rule), the learned choice and
the oracle; paired differences with 95 % percentile bootstrap intervals; the key difference again under other
fold seeds and ridge strengths; and the standardized coefficients of a fit on all users. Prints one JSON object;
``--write`` keeps it as ``docs/results/research/candidate_ranker-<run folder>.json``, ``--markdown`` prints its
tables (what docs/experiments.md summarizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from benchmarks.benchdoc import machine, save_record
from research.profile_headroom import paired

REPO = Path(__file__).resolve().parents[1]

SECTION = "candidate_ranker"
ALPHA = 100.0
"""Ridge strength on standardized features (a training fold holds ~1,400 candidates of ~180 queries)."""
FOLDS = 10
ROBUSTNESS_SEEDS = (1, 2, 3, 4)
ROBUSTNESS_ALPHAS = (1.0, 10.0, 1000.0)

BASE = {
    "consensus": "mean ROUGE-1 F to the query's other candidates",
    "greedy": "the greedy candidate (index 0)",
    "rule rank": "rank under the mode's current selection rule, 0 (kept) to 1 (last)",
    "words": "length in words",
    "input precision": "ROUGE-1 precision against the task input (share of its words in the abstract/article)",
    "input recall": "ROUGE-1 recall of the task input",
    "colon": "has a colon",
    "coined name": "has a token with two or more capitals (an acronym or coined name: LLM, AnchorWorld)",
    "coined name from input": "has such a token that the task input holds too",
}
HISTORY = {
    "length gap": "|words - the person's median past title length|",
    "past titles max": "max ROUGE-1 F to the person's newest past titles",
    "past titles mean": "mean ROUGE-1 F to the person's newest past titles",
    "colon x habit": "colon x the person's share of past titles with a colon",
    "coined x habit": "coined name x the person's share of past titles with one",
}
PROFILE = {
    "profile F": "ROUGE-1 F to the LLM fields of the profile the prompt showed",
    "profile precision": "share of the candidate's words in those fields",
}
FEATURES = {**BASE, **HISTORY, **PROFILE}
"""Per-candidate features, by name: what each says. History features are 0 where the mode has no person, profile
features where it shows no profile."""


@lru_cache(maxsize=1)
def _tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=False)


def unigrams(text: str | None) -> Counter:
    """The tokens ROUGE-1 counts: rouge-score's tokenizer without stemming, as
    :func:`stepback_ray.evaluation.metrics.rouge` (tokenized once per text: a query's candidates are compared with
    each other and with dozens of titles)."""
    return Counter(_tokenizer().tokenize(text or ""))


def r1(pred: Counter, ref: Counter) -> tuple[float, float, float]:
    """ROUGE-1 (precision, recall, F) of tokenized texts (equal to rouge-score's on the same strings)."""
    hit = sum((pred & ref).values())
    if not hit:
        return 0.0, 0.0, 0.0
    p, r = hit / sum(pred.values()), hit / sum(ref.values())
    return p, r, 2 * p * r / (p + r)


def coined(text: str) -> set[str]:
    """Tokens with two or more capitals: acronyms and coined names (``LLM``, ``AnchorWorld``), not Title Case."""
    return {t for t in re.findall(r"[A-Za-z0-9]+", text) if sum(ch.isupper() for ch in t) >= 2}


@dataclass
class Person:
    """What a mode has of the person it writes for (the user, or the donor under the control)."""

    titles: list[str]
    """Their newest past outputs of the task's kind (those the selection rule compares with)."""
    fields: str | None
    """The LLM's fields of their profile, where the mode shows one (None: no profile in this mode)."""


@dataclass
class Query:
    """One query under one mode: its candidates' features and labels."""

    query_id: str
    user_id: str
    X: np.ndarray
    """Candidates by :data:`FEATURES`."""
    y: np.ndarray
    """Each candidate's ROUGE-1 against the gold (the label; never a feature)."""
    ok: np.ndarray
    """Which candidates parse (only those can be chosen)."""
    kept: float
    """ROUGE-1 of the output the run kept."""
    rule_matches: bool
    """Whether :func:`stepback_ray.generation.selection.choose` on these candidates gives the kept output (a check)."""


def build_query(task, row: dict, person: Person | None) -> Query:
    """Features and labels of one row (``query_id``, ``user_id``, ``input``, ``gold``, ``candidates``, ``output``,
    ``rouge1``). The selection rule's references are the person's titles and fields in profile modes, as the
    pipeline gives them (:func:`stepback_ray.generation.selection.personal_refs`); none otherwise."""
    from stepback_ray.evaluation.metrics import rouge
    from stepback_ray.generation.selection import PersonalRefs, choose, scores
    from stepback_ray.tasks.habits import words

    cands = [str(c) for c in row["candidates"]]
    parsed = [c if c.strip() else None for c in cands]
    refs = (
        PersonalRefs(person.titles, [person.fields] if person.fields else [])
        if person is not None and person.fields is not None
        else PersonalRefs()
    )
    rule = np.array(scores(task, parsed, refs))
    order = sorted(range(len(cands)), key=lambda i: (-rule[i], i))
    rank = np.empty(len(cands))
    rank[order] = np.arange(len(cands)) / max(1, len(cands) - 1)

    grams = [unigrams(c) for c in cands]
    source = task.query_text(row["input"])
    source_grams, source_coined = unigrams(source), coined(source)
    titles = [unigrams(t) for t in person.titles] if person is not None else []
    median = float(np.median([len(words(t)) for t in person.titles])) if titles else 0.0
    colon_rate = float(np.mean([":" in t for t in person.titles])) if titles else 0.0
    coined_rate = float(np.mean([bool(coined(t)) for t in person.titles])) if titles else 0.0
    field_grams = unigrams(person.fields) if person is not None and person.fields else None
    X = np.zeros((len(cands), len(FEATURES)))
    for i, (c, g) in enumerate(zip(cands, grams)):
        others = [r1(g, h)[2] for j, h in enumerate(grams) if j != i]
        p_in, r_in, _ = r1(g, source_grams)
        names = coined(c)
        f = {
            "consensus": float(np.mean(others)) if others else 0.0,
            "greedy": float(i == 0),
            "rule rank": rank[i],
            "words": len(words(c)),
            "input precision": p_in,
            "input recall": r_in,
            "colon": float(":" in c),
            "coined name": float(bool(names)),
            "coined name from input": float(bool(names & source_coined)),
        }
        if titles:
            to_titles = [r1(g, t)[2] for t in titles]
            f.update(
                {
                    "length gap": abs(len(words(c)) - median),
                    "past titles max": max(to_titles),
                    "past titles mean": float(np.mean(to_titles)),
                    "colon x habit": f["colon"] * colon_rate,
                    "coined x habit": f["coined name"] * coined_rate,
                }
            )
        if field_grams:
            p_f, _, f_f = r1(g, field_grams)
            f.update({"profile F": f_f, "profile precision": p_f})
        X[i] = [f.get(name, 0.0) for name in FEATURES]
    y = np.array([rouge(c, row["gold"])[0] for c in cands])
    return Query(
        row["query_id"],
        row["user_id"],
        X,
        y,
        np.array([p is not None for p in parsed]),
        float(row["rouge1"]),
        cands[choose(task, parsed, refs)] == (row["output"] or ""),
    )


def fit(queries: list[Query], alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on within-query-centered, standardized features and labels: (coefficients per standardized
    feature, the scales). Only the parseable candidates of each query take part."""
    Xc = np.vstack([q.X[q.ok] - q.X[q.ok].mean(0) for q in queries if q.ok.any()])
    yc = np.concatenate([q.y[q.ok] - q.y[q.ok].mean() for q in queries if q.ok.any()])
    scale = Xc.std(0)
    scale[scale == 0] = 1.0
    Z = Xc / scale
    coef = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ yc)
    return coef, scale


def pick(q: Query, coef: np.ndarray, scale: np.ndarray) -> int:
    """The candidate with the highest predicted score among those that parse (the first on ties; 0 if none)."""
    s = np.where(q.ok, q.X @ (coef / scale), -np.inf)
    return int(np.argmax(s)) if q.ok.any() else 0


def folds_of(users: list[str], k: int, seed: int) -> dict[str, int]:
    """Each user's fold: users shuffled with ``seed``, dealt round-robin into ``k`` folds."""
    order = sorted(set(users))
    np.random.default_rng(seed).shuffle(order)
    return {u: i % k for i, u in enumerate(order)}


def crossfit(queries: list[Query], fold: dict[str, int], alpha: float = ALPHA) -> dict[str, int]:
    """Each query's chosen candidate, by a ranker fit on the queries of the other folds' users only."""
    chosen = {}
    for f in sorted(set(fold[q.user_id] for q in queries)):
        train = [q for q in queries if fold[q.user_id] != f]
        coef, scale = fit(train, alpha)
        chosen.update({q.query_id: pick(q, coef, scale) for q in queries if fold[q.user_id] == f})
    return chosen


def load(run: Path, questions: Path) -> tuple[dict[str, list[Query]], dict]:
    """The run's queries per mode, and checks: how often the donor reconstruction explains the control's
    retrieved items, and how often the selection rule reproduces the kept output."""
    import pandas as pd

    from stepback_ray.data.rows import donors, most_recent_first
    from stepback_ray.generation.prompting import mode_uses, uses_donor
    from stepback_ray.generation.selection import MAX_OWN_OUTPUTS
    from stepback_ray.profiling import render_profile
    from stepback_ray.tasks import get_task

    spec = json.loads((run / "_run_spec.json").read_text())
    task = get_task(spec["task"])
    gens = pd.read_parquet(run / "generations")
    profiles = pd.read_parquet(run / "profiles", columns=["user_id", "profile_json"])
    fields = {
        u: render_profile(json.loads(p), task, habits=False)
        for u, p in zip(profiles.user_id, profiles.profile_json)
        if p
    }
    history = {q["user_id"]: q["profile"] for q in json.loads(questions.read_text())}
    donor = {}
    for _, chunk in gens.groupby("chunk_id"):  # the pipeline draws donors among each chunk's users
        donor.update(donors(sorted(set(chunk.user_id)), spec["generation"]["seed"]))
    field = task.habits.field

    def person(user: str, with_profile: bool) -> Person:
        titles = [
            it[field]
            for it in most_recent_first(history.get(user, []))[:MAX_OWN_OUTPUTS]
            if (it.get(field) or "").strip()
        ]
        return Person(titles, fields.get(user, "") if with_profile else None)

    out: dict[str, list[Query]] = {}
    donor_ok = []
    for mode, rows in gens.groupby("mode", sort=False):
        if rows["candidates"].isna().all():
            continue
        profile, retrieval = mode_uses(mode)
        qs = []
        for r in rows.to_dict("records"):
            if r["candidates"] is None or len(r["candidates"]) == 0:
                continue
            who = donor.get(r["user_id"]) if uses_donor(mode) else r["user_id"]
            if uses_donor(mode) and len(r["retrieved_ids"]):
                donor_ok.append(set(r["retrieved_ids"]) <= {it["id"] for it in history.get(who, [])})
            p = person(who, profile) if who is not None and (profile or retrieval) else None
            qs.append(build_query(task, r, p))
        out[mode] = qs
    checks = {
        "donor_explains_retrieved": round(float(np.mean(donor_ok)), 4) if donor_ok else None,
        "rule_reproduces_kept": {m: round(float(np.mean([q.rule_matches for q in qs])), 4) for m, qs in out.items()},
    }
    return out, checks


def learned_scores(by_mode: dict[str, list[Query]], seed: int, alpha: float, k: int) -> dict[str, dict[str, float]]:
    """Per mode, each query's ROUGE-1 under the cross-fit choice (the same folds for every mode)."""
    fold = folds_of([q.user_id for qs in by_mode.values() for q in qs], k, seed)
    out = {}
    for mode, qs in by_mode.items():
        chosen = crossfit(qs, fold, alpha)
        out[mode] = {q.query_id: float(q.y[chosen[q.query_id]]) for q in qs}
    return out


def differences(learned: dict, kept: dict) -> dict[str, dict[str, float]]:
    """The paired differences of the study (those whose modes are in the run)."""
    out = {}
    for name, a, b in [
        ("learned profile+rag - learned rag", learned.get("profile+rag"), learned.get("rag")),
        ("learned profile+rag - learned random-profile", learned.get("profile+rag"), learned.get("random-profile")),
        ("learned rag - kept rag", learned.get("rag"), kept.get("rag")),
        ("learned profile+rag - kept profile+rag", learned.get("profile+rag"), kept.get("profile+rag")),
        ("learned profile - learned none", learned.get("profile"), learned.get("none")),
    ]:
        if a is not None and b is not None:
            out[name] = paired(a, b)
    personal = [m for m in ("rag", "profile", "profile+rag") if m in learned]
    if personal and "none" in learned:
        best = max(personal, key=lambda m: np.mean(list(learned[m].values())))
        out[f"learned {best} (best personalized) - learned none"] = paired(learned[best], learned["none"])
    return out


def study(run: Path, questions: Path, k: int = FOLDS, seed: int = 0, alpha: float = ALPHA) -> dict:
    by_mode, checks = load(run, questions)
    kept = {m: {q.query_id: q.kept for q in qs} for m, qs in by_mode.items()}
    learned = learned_scores(by_mode, seed, alpha, k)

    def mean(d: dict[str, float]) -> float:
        return round(float(np.mean(list(d.values()))), 4)

    modes = {
        m: {
            "queries": len(qs),
            "greedy": mean({q.query_id: q.y[0] for q in qs}),
            "kept": mean(kept[m]),
            "learned": mean(learned[m]),
            "oracle": mean({q.query_id: q.y.max() for q in qs}),
        }
        for m, qs in by_mode.items()
    }
    key = ("profile+rag", "rag")
    robustness = {}
    if all(m in by_mode for m in key):
        variants = [(f"fold seed {s}", s, alpha) for s in ROBUSTNESS_SEEDS]
        variants += [(f"alpha {a:g}", seed, a) for a in ROBUSTNESS_ALPHAS]
        for name, s, a in variants:
            other = learned_scores({m: by_mode[m] for m in key}, s, a, k)
            robustness[name] = paired(other["profile+rag"], other["rag"])
    coefficients = {m: dict(zip(FEATURES, np.round(fit(qs, alpha)[0], 4).tolist())) for m, qs in by_mode.items()}
    return {
        "run": str(run),
        "folds": k,
        "seed": seed,
        "alpha": alpha,
        "candidates": max(len(q.y) for qs in by_mode.values() for q in qs),
        "checks": checks,
        "modes": modes,
        "differences": differences(learned, kept),
        "robustness_profile+rag_minus_rag": robustness,
        "coefficients": coefficients,
        "features": FEATURES,
    }


def section(run: str) -> str:
    """One section per run (``candidate_ranker:<run folder>``)."""
    return f"{SECTION}-{Path(run).name}"


def to_markdown(res: dict, command: str) -> str:
    modes = list(res["modes"])
    n = max(m["queries"] for m in res["modes"].values())
    c = res["checks"]
    lines = [
        f"### Learned candidate choice: {Path(res['run']).name} ({dt.date.today().isoformat()}, {machine()})",
        "",
        f"Read off the rows of `{res['run']}` ({n} queries per mode, {res['candidates']} candidates "
        f"each), no model calls. Command: `python -m research.candidate_ranker {command}`. A ridge ranker "
        f"(alpha {res['alpha']:g}) over {len(res['features'])} gold-free candidate features, fit per mode on "
        f"within-query-centered ROUGE-1; every query's choice comes from a ranker fit on the other "
        f"{res['folds'] - 1} of {res['folds']} user folds (fold seed {res['seed']}). History features come from "
        "the user (`rag`, profile modes) or the donor (`random-profile`), profile features from the profile the "
        f"prompt showed; `none` has neither. Checks: the selection rule reproduces the kept output in "
        + ", ".join(f"`{m}` {v:.0%}" for m, v in c["rule_reproduces_kept"].items())
        + (
            f"; the donor reconstruction explains {c['donor_explains_retrieved']:.0%} of the control's retrieved items."
            if c["donor_explains_retrieved"] is not None
            else "."
        ),
        "",
        "| mode | greedy | kept (current rule) | learned (cross-fit) | best in hindsight |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {m} | {v['greedy']:.4f} | {v['kept']:.4f} | {v['learned']:.4f} | {v['oracle']:.4f} |"
        for m, v in res["modes"].items()
    ]
    lines += ["", "| paired difference (ROUGE-1) | mean [95 % CI] | above 0? |", "|---|---|---|"]
    for k, d in res["differences"].items():
        verdict = "yes" if d["lo"] > 0 else "no (below 0)" if d["hi"] < 0 else "no (interval spans 0)"
        lines.append(f"| {k} | {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] | {verdict} |")
    if res["robustness_profile+rag_minus_rag"]:
        lines += [
            "",
            "`learned profile+rag - learned rag` under other fold seeds and ridge strengths: "
            + "; ".join(
                f"{k} {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
                for k, d in res["robustness_profile+rag_minus_rag"].items()
            )
            + ".",
        ]
    lines += [
        "",
        "Coefficients of a fit on all users (ROUGE-1 per standard deviation of the feature within a "
        "query; 0 where the mode lacks the feature):",
        "",
        "| feature | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    lines += [
        f"| {f} | " + " | ".join(f"{res['coefficients'][m][f]:+.4f}" for m in modes) + " |" for f in res["features"]
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished bench_quality run folder with generations/ (candidates) and profiles/")
    ap.add_argument("--data", required=True, help="the set's *_questions.json (the users' histories)")
    ap.add_argument("--folds", type=int, default=FOLDS)
    ap.add_argument("--seed", type=int, default=0, help="the fold assignment's seed")
    ap.add_argument("--alpha", type=float, default=ALPHA)
    ap.add_argument("--write", action="store_true", help="keep the result in docs/results/research/")
    ap.add_argument("--markdown", action="store_true", help="print the result's tables as markdown (to stderr)")
    args = ap.parse_args()
    res = study(Path(args.run), Path(args.data), args.folds, args.seed, args.alpha)
    print(json.dumps(res, indent=1))
    if args.markdown:
        print(to_markdown(res, " ".join(sys.argv[1:])), file=sys.stderr)
    if args.write:
        record = {**res, "date": dt.date.today().isoformat(), "machine": machine(), "command": " ".join(sys.argv[1:])}
        print(f"kept: {save_record('research/' + section(args.run), record)}", file=sys.stderr)


if __name__ == "__main__":
    main()
