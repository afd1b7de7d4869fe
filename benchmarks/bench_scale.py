"""Scale benchmark: the full pipeline on 10k, 100k and 1M synthetic users, memory watched the whole time.

    python -m benchmarks.bench_scale --users 10000,100000,1000000 --write

For each size it makes (or reuses) a synthetic user dataset (``benchmarks/make_synthetic_users.py``: real items,
real history lengths), then runs the whole job with the dry-run engine: staging with validation, step-back
prompt planning and tokenization, map-reduce planning, BM25 retrieval, generation prompts, parsing, scoring and
writing; everything but the LLM. A sampler thread records the peak resident memory of the driver and of every Ray
worker process (each one, and all of them together) once a second. A sample with the real engine on the demo's 20
users gives the LLM's share of the cost. Memory must stay flat as users grow: the driver never holds the users
(only shard names), stages work one shard at a time, and the summary is streamed from the committed files.
Prints one JSON object; ``--write`` keeps it as ``docs/results/scale/default.json`` and regenerates the results page
(``benchmarks.results_page``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from benchmarks.benchdoc import machine, publish
from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from stepback_ray.pipeline.on_ray import ray_session

REPO = Path(__file__).resolve().parents[1]


class MemorySampler(threading.Thread):
    """Peak RSS of this process, of its largest descendant (a Ray worker), and of the whole process tree, every
    second; and the peak PSS of the tree (proportional set size: a page mapped by k processes counts 1/k in each),
    which, unlike the RSS sum, does not count shared libraries and object-store pages once per process that maps
    them, every ``pss_every`` seconds.

    With ``log`` it also saves its peaks and the time seen so far to that file every ``save_every`` seconds, so a
    run that is killed (a session's end) and resumed later still accounts for the time and memory it had used."""

    def __init__(self, interval: float = 1.0, log: Path | None = None, save_every: float = 15.0, pss_every: int = 10):
        super().__init__(daemon=True)
        self.pss_every = pss_every
        self.interval, self.stop_flag = interval, threading.Event()
        self.driver = self.worker = self.total = self.pss = 0
        self.log, self.save_every, self.started = log, save_every, time.time()

    def run(self) -> None:
        me = psutil.Process()
        saved, ticks = time.time(), 0
        while not self.stop_flag.is_set():
            total, biggest, pss = 0, 0, 0
            # PSS reads /proc/PID/smaps (~10 ms a process here): every pss_every-th sample, or the sampler itself
            # takes a sixth of a core
            full = ticks % self.pss_every == 0
            ticks += 1
            # this driver's own Ray: its GCS, raylet and workers are its descendants (another job's are not)
            for p in [me, *me.children(recursive=True)]:
                try:
                    info = p.memory_full_info() if full else p.memory_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                    continue
                total += info.rss
                pss += getattr(info, "pss", info.rss) if full else 0
                if p.pid != me.pid:
                    biggest = max(biggest, info.rss)
                else:
                    self.driver = max(self.driver, info.rss)
            self.worker = max(self.worker, biggest)
            self.total = max(self.total, total)
            self.pss = max(self.pss, pss)
            if self.log is not None and time.time() - saved >= self.save_every:
                self.save(finished=False)
                saved = time.time()
            self.stop_flag.wait(self.interval)

    def invocation(self, finished: bool) -> dict:
        return {
            "started": self.started,
            "seconds": round(time.time() - self.started, 1),
            "finished": finished,
            "driver": self.driver,
            "worker": self.worker,
            "total": self.total,
            "pss": self.pss,
        }

    def save(self, finished: bool) -> None:
        """Replace this invocation's entry in the log (earlier invocations of the same run are kept)."""
        runs = [r for r in load_log(self.log) if r["started"] != self.started]
        tmp = self.log.with_suffix(".tmp")
        tmp.write_text(json.dumps(runs + [self.invocation(finished)]))
        tmp.replace(self.log)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join()
        if self.log is not None:
            self.save(finished=True)


def load_log(log: Path | None) -> list[dict]:
    return json.loads(log.read_text()) if log is not None and log.exists() else []


def peaks(invocations: list[dict]) -> dict[str, float]:
    """Peak RSS over every invocation of a run, in GiB."""
    gib = 2**30
    return {f"{k}_peak_rss_gib": round(max(r[k] for r in invocations) / gib, 2) for k in ("driver", "worker")} | {
        "all_processes_peak_rss_gib": round(max(r["total"] for r in invocations) / gib, 2),
        "all_processes_peak_pss_gib": round(max(r.get("pss", 0) for r in invocations) / gib, 2),
    }


def dataset(n: int, root: Path) -> Path:
    out = root / f"users-{n}"
    if not (out / "_DONE").exists():
        files = max(1, min(64, n // 10_000))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.make_synthetic_users",
                "--users",
                str(n),
                "--files",
                str(files),
                "--out",
                str(out),
            ],
            check=True,
        )
        (out / "_DONE").write_text("")
    return out


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class SizeFiles:
    """Where the run of one size keeps its outputs and its bookkeeping under the benchmark root."""

    root: Path
    users: int

    @property
    def out(self) -> Path:
        return self.root / f"run-{self.users}"

    @property
    def log(self) -> Path:
        """Time and peaks of every invocation so far (saved while running)."""
        return self.root / f"run-{self.users}.invocations.json"

    @property
    def result(self) -> Path:
        """The size's result, written once it ran to the end."""
        return self.root / f"run-{self.users}.result.json"


def run_size(n: int, root: Path, shards: int, modes: list[str], extra: list[str]) -> dict:
    """One size, run to the end. A run that an earlier invocation started and did not finish (killed) is resumed:
    the pipeline skips the chunks it committed, and the time and peaks of every invocation are added up."""
    data = dataset(n, root)
    files = SizeFiles(root, n)
    out, log, done = files.out, files.log, files.result
    if done.exists() and (out / "manifest.json").exists():
        return json.loads(done.read_text())  # measured to the end before: not run again
    if not (out / "_run_spec.json").exists():
        log.unlink(missing_ok=True)  # a fresh run: no earlier invocations count
    job = load_job(
        None,
        ["ray.progress_bars=false", *extra],
        data={
            "name": f"scale-{n}",
            "task": "LaMP_5",
            "input": {"format": "parquet", "path": str(data), "layout": "user"},
            "modes": modes,
            "output": str(out),
            "run_id": "scale",
            "engine": {"kind": "dry-run"},
            "profile": {"history_token_budget": 2048, "max_item_tokens": 160, "max_new_tokens": 80},
            "ray": {"num_shards": shards},
        },
    )
    sampler = MemorySampler(log=log)
    sampler.start()
    try:
        result = run_job(job)
    finally:
        sampler.stop()
    runs = load_log(log)
    wall = sum(r["seconds"] for r in runs)
    counts = result.manifest["counts"]
    report = {
        "users": n,
        "shards": shards,
        "wall_s": round(wall, 1),
        "users_per_s": round(n / wall, 1),
        "invocations": len(runs),
        **peaks(runs),
        "output_bytes": du(out) - du(out / "_staged") if (out / "_staged").exists() else du(out),
        "staged_bytes": du(out / "_staged") if (out / "_staged").exists() else 0,
        "generation_rows": counts["generation_rows"],
        "rows_quarantined": counts.get("rows_quarantined", 0),
        "prompt_tokens": result.metrics["profiles"]["prompt_tokens"]
        + sum(m["prompt_tokens"] for m in result.metrics["modes"].values()),
        "timings_last_invocation": result.manifest["timings"],
        "config": extra,
    }
    done.write_text(json.dumps(report))
    return report


def progress(n: int, root: Path, shards: int) -> dict | None:
    """Where a size stands without running anything: its result if it finished, else what its invocations so far
    have done (time, peaks, committed chunks per pass); None if it never started."""
    files = SizeFiles(root, n)
    if files.result.exists():
        return json.loads(files.result.read_text())
    out, runs = files.out, load_log(files.log)
    if not runs:
        return None
    return {
        "users": n,
        "shards": shards,
        "finished": False,
        "invocations": len(runs),
        "wall_s": round(sum(r["seconds"] for r in runs), 1),
        **peaks(runs),
        "staged": (out / "_staged" / "_SUCCESS").exists(),
        "profile_chunks_committed": len(list((out / "profiles").glob("chunk-*.parquet"))),
        "generation_chunks_committed": len(list((out / "generations").glob("chunk-*.parquet"))),
    }


def real_sample_result(root: Path) -> Path:
    """Where the real-engine sample's result is kept for ``--status``."""
    return root / "run-real-sample.result.json"


def real_sample(root: Path) -> dict:
    """The demo job (20 users, the real model) from scratch; its result is kept for ``--status``."""
    out = root / "run-real-sample"
    shutil.rmtree(out, ignore_errors=True)  # measured from scratch, not resumed
    job = load_job(REPO / "jobs" / "demo.yaml", ["ray.progress_bars=false", f"output={out}", "run_id=real"])
    t0 = time.time()
    result = run_job(job)
    wall = time.time() - t0
    report = {
        "users": 20,
        "engine": "transformers (SmolLM2-135M, CPU)",
        "wall_s": round(wall, 1),
        "users_per_s": round(20 / wall, 3),
        "timings": result.manifest["timings"],
        "date": dt.date.today().isoformat(),
    }
    real_sample_result(root).write_text(json.dumps(report))
    return report


def last_real_sample(root: Path) -> dict | None:
    path = real_sample_result(root)
    return json.loads(path.read_text()) if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="10000,100000,1000000")
    ap.add_argument("--users-per-shard", type=int, default=1000)
    ap.add_argument("--modes", default="none,profile+rag")
    ap.add_argument("--root", default=str(REPO / "runs" / "scale"))
    ap.add_argument("--no-real-sample", action="store_true")
    ap.add_argument(
        "--cpu-actors",
        type=int,
        default=os.cpu_count() or 1,
        help="prompt-building actors (ray.cpu_stage_actors): with the dry-run engine they are the work",
    )
    ap.add_argument(
        "--object-store-gib",
        type=float,
        default=1.0,
        help="the local Ray's object store (Ray's default, 30 %% of RAM, is shared memory that shows in "
        "the workers' RSS)",
    )
    ap.add_argument("--set", action="append", default=[], help="job-spec override")
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep the report as docs/results/scale/default.json and regenerate docs/results.md",
    )
    ap.add_argument(
        "--status",
        action="store_true",
        help="run nothing: report each size as measured so far (finished, or unfinished with progress)",
    )
    args = ap.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    sizes = []
    first = load_job(
        None,
        data={
            "name": "scale",
            "task": "LaMP_5",
            "input": {"questions": "x"},
            "ray": {"object_store_gib": args.object_store_gib},
        },
    )
    if args.status:
        sizes = [
            p
            for n in (int(x) for x in args.users.split(","))
            if (p := progress(n, root, max(1, n // args.users_per_shard)))
        ]
        report = {
            "date": dt.date.today().isoformat(),
            "machine": machine(),
            "modes": modes,
            "sizes": sizes,
            "command": "python -m benchmarks.bench_scale "
            + " ".join(a for a in sys.argv[1:] if a not in ("--status", "--write")).strip(),
            "real_sample": last_real_sample(root),
        }
        print(json.dumps(report, indent=1))
        if args.write:
            print(f"kept: {publish('scale/default', report)}", file=sys.stderr)
        return
    with ray_session(first):
        for n in (int(x) for x in args.users.split(",")):
            sizes.append(
                run_size(
                    n,
                    root,
                    max(1, n // args.users_per_shard),
                    modes,
                    [f"ray.cpu_stage_actors={args.cpu_actors}", *args.set],
                )
            )
            print(json.dumps(sizes[-1]), file=sys.stderr, flush=True)
        real = None if args.no_real_sample else real_sample(root)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "modes": modes,
        "command": "python -m benchmarks.bench_scale " + " ".join(sys.argv[1:]),
        "sizes": sizes,
        "real_sample": real,
    }
    print(json.dumps(report, indent=1))
    if args.write:
        print(f"kept: {publish('scale/default', report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
