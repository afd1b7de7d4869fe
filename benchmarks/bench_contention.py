"""What a local Ray's own processes cost an engine that fills every core: the same engine calls in this process,
alone and beside an idle local Ray (started as the pipeline starts it, plus idle actors: the demo's run has ~15
Ray processes), alternated round by round.

    python -m benchmarks.bench_contention --rounds 3 --write

Why: the demo's engine time is longer in a Ray run than in process for the same engine calls, and the engine
actors' processes see many times the involuntary context switches. Every Ray process wakes many times a second (a
periodic signal check in every worker's main thread, gRPC polls), and on a machine whose engine threads fill every
core each wake takes a core from one of them; the others wait for it at the next barrier. This benchmark takes Ray
Data, the actors' code and the engine's placement out of the question: the engine is not in Ray at all.

Conditions, in turn each round:

- ``alone``: nothing else started;
- ``beside-ray``: a local Ray in a child process (``init_local_ray``, as ``stepback run``), ``--actors`` idle
  actors in it;
- ``beside-ray-sched-idle``: the same, the child started under ``SCHED_IDLE`` (Linux; its processes inherit it):
  they run only on a core nothing else wants, which shows what the wakes cost (not a setting of the pipeline).

Each condition times ``--calls`` engine calls (after a warm-up call) of the demo's shape: 8 prompts of ~1,000
tokens of real LaMP_5 history (the demo's sample) and 24 new tokens; per call the seconds, this process's CPU
seconds and involuntary context switches (``getrusage``). Prints one JSON object; ``--write`` keeps it as
``docs/results/contention/default.json`` and regenerates the results page (``benchmarks.results_page``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.benchdoc import machine, publish

REPO = Path(__file__).resolve().parents[1]

CONDITIONS = ("alone", "beside-ray", "beside-ray-sched-idle")
SAMPLE = REPO / "data" / "samples" / "lamp5_arxiv_dev20_questions.json"

# The child: a local Ray as the pipeline starts it, idle actors, until its stdin closes.
RAY_CHILD = """
import os, sys, time
if sys.argv[2] == "idle":
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
from stepback_ray.pipeline.on_ray import init_local_ray
import ray
init_local_ray()

@ray.remote(num_cpus=0.01)
class Idle:
    def ready(self):
        return os.getpid()

actors = [Idle.remote() for _ in range(int(sys.argv[1]))]
ray.get([a.ready.remote() for a in actors])
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""


def prompts(n: int = 8, chars: int = 4000) -> list[list[dict]]:
    """``n`` chat prompts of ~1,000 tokens: a user's newest history items (titles and abstracts)."""
    users = json.loads(SAMPLE.read_text())[:n]
    return [
        [
            {"role": "system", "content": "Summarize this author's research in a few keywords."},
            {
                "role": "user",
                "content": " ".join(f"{p.get('title', '')}. {p.get('abstract', '')}" for p in u["profile"][:8])[:chars],
            },
        ]
        for u in users
    ]


def timed_calls(engine, batch: list, params, calls: int) -> list[dict]:
    """Each call's seconds and this process's usage over it (the pipeline's own count: ``process_usage``)."""
    from stepback_ray.pipeline.engine_stage import process_usage

    out = []
    for _ in range(calls):
        t0, (c0, n0) = time.perf_counter(), process_usage()
        engine.generate(batch, params)
        t1, (c1, n1) = time.perf_counter(), process_usage()
        out.append(
            {
                "s": round(t1 - t0, 3),
                "cpu_s": round(c1 - c0, 3),
                "preemptions": n1 - n0,
                "preemptions_per_cpu_s": round((n1 - n0) / (c1 - c0), 1),
            }
        )
    return out


class LocalRay:
    """A local Ray with idle actors in a child process (its own session), stopped by closing its stdin; killed by
    its PID if it does not stop."""

    def __init__(self, actors: int, sched_idle: bool):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RAY_CHILD, str(actors), "idle" if sched_idle else ""],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise SystemExit(f"bench_contention: the local Ray did not start (exit {self.proc.poll()})")
        time.sleep(3)  # its start-up work done: only the steady wakes remain

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(rounds: int, calls: int, actors: int) -> dict:
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import SamplingParams, build_engine

    engine = build_engine(
        EngineConfig(kind="transformers", model="packaged:smollm2-135m-instruct", batch_size=64, max_batch_tokens=1536)
    )
    batch, params = prompts(), SamplingParams(max_new_tokens=24, min_new_tokens=24)
    engine.generate(batch[:2], params)  # warm
    runs = []
    for rnd in range(rounds):
        for cond in CONDITIONS if rnd % 2 == 0 else CONDITIONS[::-1]:
            ray = LocalRay(actors, cond.endswith("sched-idle")) if cond != "alone" else None
            try:
                got = timed_calls(engine, batch, params, calls)
            finally:
                if ray is not None:
                    ray.stop()
            runs.append({"condition": cond, "round": rnd + 1, "calls": got})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    engine.close()
    summary = {}
    for cond in CONDITIONS:
        calls_ = [c for r in runs if r["condition"] == cond for c in r["calls"]]
        summary[cond] = {
            "mean_s": round(sum(c["s"] for c in calls_) / len(calls_), 2),
            "preemptions_per_cpu_s": round(sum(c["preemptions"] for c in calls_) / sum(c["cpu_s"] for c in calls_), 1),
        }
    for cond in CONDITIONS[1:]:
        summary[cond]["over_alone"] = round(summary[cond]["mean_s"] / summary["alone"]["mean_s"], 3)
    return {"runs": runs, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2, help="timed engine calls per condition and round")
    ap.add_argument("--actors", type=int, default=8, help="idle actors in the local Ray")
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep the report as docs/results/contention/default.json and regenerate docs/results.md",
    )
    args = ap.parse_args()
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "rounds": args.rounds,
        "calls": args.calls,
        "actors": args.actors,
        **measure(args.rounds, args.calls, args.actors),
        "command": "python -m benchmarks.bench_contention " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(report, indent=1))
    if args.write:
        print(f"kept: {publish('contention/default', report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
