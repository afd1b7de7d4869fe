"""Fault drills: inject the failures a nightly batch job meets, then count what came out.

    python -m benchmarks.fault_drills --write            # every drill, full size
    python -m benchmarks.fault_drills --drills malformed-input --good 1000 --bad 100

Each drill runs the real pipeline (local Ray, the dry-run engine so the LLM's cost does not hide the pipeline's
behaviour) with one kind of fault, then reconciles the committed output against the input: rows lost,
duplicated, quarantined, failed. A drill passes when nothing is lost or duplicated and every fault is accounted
for (retried, restarted, resumed, flagged or quarantined). The drills:

- ``worker-kill``: kill -9 of the generation engine actor while it works; Ray restarts it and retries its task.
- ``driver-kill``: kill -9 of the driver and the whole local Ray it started, mid-run; the same run id is rerun.
- ``s3-faults``: a local S3 (moto) that answers a share of all requests with ``503 SlowDown``; input and output
  both live there; retried with backoff (botocore, then the store's own retries).
- ``node-loss``: a head and two one-GPU worker nodes (Ray's own test cluster); the node running the generation
  engine actor is removed mid-pass; the actor is restarted on the other node and its blocks retried.
- ``engine-error``: the engine fails on one prompt; its rows are flagged ``error``, the rest of the batch is kept.
- ``engine-dead`` / ``engine-hang``: every engine call after the N-th is fatal (EngineDeadError) or never returns
  (ended by ``engine.call_timeout_s``); the actor ends itself, Ray restarts it and retries the block: 0 error rows.
- ``engine-dead-for-good``: dead from the first call; past ``engine.max_restarts`` the run exits 3, no rows.
- ``error-budget``: every prompt rejected, over ``max_error_fraction``: exit 3, ``status: failed``, the profile
  store's pointer unmoved; the same run ids rerun without the fault retry exactly the failed rows.
- ``same-run-twice``: two drivers of the same run id and output at once; both finish, every row exactly once.
- ``store-race``: two nightly profile jobs from one store version, on a local store and on S3 (moto): one
  commits, the other exits 3 naming the version that beat it.
- ``malformed-input``: bad records mixed into a JSON Lines dataset (bad JSON, wrong types, huge items, invalid
  UTF-8, ids with ``../`` or ``/``, records that are not objects); the good ones all come out, every bad one is
  quarantined with its reason, counts reconcile, nothing is written outside the output prefix.

Prints one JSON object; ``--write`` keeps each drill's record as ``docs/results/drills/<drill>.json`` and
regenerates the results page (``benchmarks.results_page``), whose table shows every drill's latest record. The tests
run the same
drills at a smaller size (``tests/unit/test_faults.py``, ``tests/ray/test_faults.py``, ``tests/drills/``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil

from benchmarks.benchdoc import machine
from stepback_ray.config import load_job
from stepback_ray.pipeline.on_ray import init_local_ray

REPO = Path(__file__).resolve().parents[1]

SAMPLE = REPO / "data" / "samples" / "lamp5_arxiv_dev20"
SHARED = Path(os.environ.get("STEPBACK_SHARED_DATA", REPO.parent / "shared" / "data"))
DRY = ["engine.kind=dry-run", "ray.progress_bars=false"]
ENGINE_ACTOR = "ray::EngineHost"
"""The process title of a run's engine actor (``ray.keep_engines``: one kept across the passes, so the drills that
kill it once a generation chunk is committed kill the one serving the generation pass)."""


def demo_job(out: Path | str, *extra: str):
    """The demo job on its committed 20-user sample, with the dry-run engine."""
    return load_job(REPO / "jobs" / "demo.yaml", [*DRY, f"output={out}", "run_id=drill", *extra])


def reconcile(gens: pd.DataFrame, expected_ids: set[str], modes: list[str]) -> dict[str, Any]:
    """Rows lost (an expected (query, mode) with no row), duplicated (more than one) and by status."""
    sizes = gens.groupby(["query_id", "mode"]).size()
    present = set(sizes.index)
    expected = {(q, m) for q in expected_ids for m in modes}
    return {
        "rows_expected": len(expected),
        "rows_out": int(len(gens)),
        "rows_lost": len(expected - present),
        "rows_unexpected": len(present - expected),
        "duplicates": int((sizes > 1).sum()),
        "rows_by_status": {k: int(v) for k, v in gens["status"].str.split(":").str[0].value_counts().items()},
    }


def sample_query_ids(limit: int | None = None) -> set[str]:
    """The sample's query ids (of its first ``limit`` users, as ``limit=`` takes them)."""
    return {q["id"] for q in json.loads(Path(f"{SAMPLE}_questions.json").read_text())[:limit]}


def _passed(r: dict[str, Any]) -> bool:
    return r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_unexpected"] == 0


# ------------------------------------------------------------------------------------------------ worker kill
class ActorKiller(threading.Thread):
    """Kills (SIGKILL) the process of a Ray actor whose title contains ``title`` once ``ready()`` is true."""

    def __init__(self, title: str, ready, kills: int = 1):
        super().__init__(daemon=True)
        self.title, self.ready, self.kills = title, ready, kills
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and len(self.killed) < self.kills:
            if self.ready():
                # only this driver's own Ray (its raylet and workers are its descendants), never another run's
                for p in psutil.Process().children(recursive=True):
                    try:
                        cmd = " ".join(p.cmdline())
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if self.title in cmd and p.pid not in self.killed:
                        try:
                            os.kill(p.pid, signal.SIGKILL)
                            self.killed.append(p.pid)
                        except ProcessLookupError:
                            pass
                        break
            self.stop.wait(0.2)


def drill_worker_kill(root: Path, kills: int = 1) -> dict[str, Any]:
    """kill -9 of the engine actor mid-stage, ``kills`` times: the run still completes, exactly once per row."""
    from stepback_ray.pipeline import run_job

    out = root / "worker-kill"
    gen_dir = out / "generations"
    job = demo_job(out, "ray.users_per_chunk=2", "engine.dry_run_tokens_per_s=3000")
    killer = ActorKiller(ENGINE_ACTOR, lambda: gen_dir.exists() and any(gen_dir.glob("chunk-*.parquet")), kills)
    killer.start()
    t0 = time.time()
    result = run_job(job)
    killer.stop.set()
    gens = pd.read_parquet(gen_dir)
    r = {
        "drill": "worker-kill",
        "faults_injected": len(killer.killed),
        "fault": "kill -9 of the generation engine actor while it holds a block",
        **reconcile(gens, sample_query_ids(), job.modes),
        "wall_s": round(time.time() - t0, 1),
        "generation_chunks": result.manifest["counts"]["generation_chunks"],
    }
    r["passed"] = _passed(r) and r["faults_injected"] == kills
    return r


# ------------------------------------------------------------------------------------------------ driver kill
def kill_tree(proc: subprocess.Popen) -> int:
    """kill -9 a driver and every process of the local Ray it started (a machine losing power); wait until all
    are gone. Ray's raylet and workers run in sessions of their own, so a process-group kill alone can leave a
    worker that commits a chunk after the kill: the tree is frozen first (a stopped process cannot fork)."""
    frozen: dict[int, psutil.Process] = {}
    todo = [psutil.Process(proc.pid)]
    while todo:
        p = todo.pop()
        if p.pid in frozen:
            continue
        try:
            p.suspend()
            frozen[p.pid] = p
            todo += p.children()
        except psutil.NoSuchProcess:
            pass
    for p in frozen.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(list(frozen.values()), timeout=30)
    return len(frozen)


def _driver(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stepback_ray",
            "run",
            "jobs/demo.yaml",
            *sum(
                [
                    ["--set", s]
                    for s in [
                        *DRY,
                        f"output={out}",
                        "run_id=resume",
                        "limit=10",
                        "ray.users_per_chunk=2",
                        "generation.max_new_tokens=12",
                        "profile.max_new_tokens=32",
                        "profile.history_token_budget=512",
                        "engine.dry_run_tokens_per_s=2000",
                    ]
                ],
                [],
            ),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def drill_driver_kill(root: Path) -> dict[str, Any]:
    """kill -9 of the driver (and its local Ray) once two generation chunks are committed; rerun the run id."""
    out = root / "driver-kill"
    gen_dir = out / "generations"
    t0 = time.time()
    proc = _driver(out)
    deadline = time.time() + 900
    while not (gen_dir.exists() and len(list(gen_dir.glob("chunk-*.parquet"))) >= 2):
        if proc.poll() is not None:
            raise RuntimeError(f"the driver ended before the kill: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise RuntimeError("no generation chunk was committed in 15 minutes")
        time.sleep(0.2)
    processes = kill_tree(proc)
    committed_before = sorted(p.name for p in gen_dir.glob("chunk-*.parquet"))
    manifest_before = (out / "manifest.json").exists()
    rerun = _driver(out)
    _, err = rerun.communicate(timeout=1800)
    if rerun.returncode != 0:
        raise RuntimeError(f"the rerun failed: {err[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    gens = pd.read_parquet(gen_dir)
    expected = {q["id"] for q in json.loads(Path(f"{SAMPLE}_questions.json").read_text())[:10]}
    r = {
        "drill": "driver-kill",
        "faults_injected": 1,
        "fault": f"kill -9 of the driver and its {processes - 1} Ray "
        "processes mid-run, then a rerun of the same run id",
        **reconcile(gens, expected, manifest["config"]["modes"]),
        "wall_s": round(time.time() - t0, 1),
        "chunks_committed_before_kill": len(committed_before),
        "manifest_before_kill": manifest_before,
        "resumed": manifest["resumed"],
        "chunks_committed_by_rerun": manifest["chunks_committed_this_run"]["generations"],
        "generation_chunks": manifest["counts"]["generation_chunks"],
        "temporary_files_left": len(list(out.rglob("*.tmp-*"))),
    }
    r["passed"] = (
        _passed(r)
        and not manifest_before
        and r["resumed"]
        and r["temporary_files_left"] == 0
        and r["chunks_committed_by_rerun"] == r["generation_chunks"] - len(committed_before)
    )
    return r


def drill_same_run_twice(root: Path) -> dict[str, Any]:
    """Two drivers of the same run id and output at once (a scheduler that fired twice): chunk files are whole
    and keyed, a chunk committed twice is merged by row key, so both finish and every row is there exactly once."""
    out = root / "same-run-twice"
    t0 = time.time()
    first = _driver(out)
    time.sleep(5)  # the second one finds the first one's run spec and committed chunks part-way
    second = _driver(out)
    codes = [p.wait(timeout=1800) for p in (first, second)]
    errs = [p.stderr.read()[-1000:] for p in (first, second)]
    gens = pd.read_parquet(out / "generations")
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {q["id"] for q in json.loads(Path(f"{SAMPLE}_questions.json").read_text())[:10]}
    r = {
        "drill": "same-run-twice",
        "faults_injected": 1,
        "fault": "a second driver of the same run id and output started 5 s after the first",
        **reconcile(gens, expected, manifest["config"]["modes"]),
        "exit_codes": codes,
        "wall_s": round(time.time() - t0, 1),
        "temporary_files_left": len(list(out.rglob("*.tmp-*"))),
    }
    if any(codes):
        r["stderr"] = errs
    r["passed"] = bool(_passed(r) and codes == [0, 0] and r["temporary_files_left"] == 0)
    return r


# ------------------------------------------------------------------------------------------------ S3 faults
class FlakyS3:
    """A moto S3 server on 127.0.0.1 that answers a share of requests with ``503 SlowDown`` (before touching
    any state, as S3 throttling does), counting them."""

    BODY = (
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>"
    )

    def __init__(self, fault_rate: float, seed: int = 0):
        self.fault_rate, self.rng, self.lock = fault_rate, random.Random(seed), threading.Lock()
        self.requests = self.faults = 0

    def _app(self, app):
        def wrapped(environ, start_response):
            with self.lock:
                self.requests += 1
                fail = self.rng.random() < self.fault_rate
                self.faults += fail
            if fail:  # (an answer to HEAD has no body, as S3's)
                body = b"" if environ["REQUEST_METHOD"] == "HEAD" else self.BODY
                start_response(
                    "503 Slow Down", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))]
                )
                return [body]
            return app(environ, start_response)

        return wrapped

    def __enter__(self) -> str:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        self.server = make_server(
            "127.0.0.1",
            0,
            self._app(DomainDispatcherApplication(create_backend_app)),
            threaded=True,
            request_handler=MotoRequestHandler,
        )
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join()


def drill_s3_faults(root: Path, fault_rate: float = 0.1) -> dict[str, Any]:
    """Input and output on a flaky S3: the run completes, exactly once per row, every fault absorbed."""
    import pyarrow.parquet as pq
    import s3fs

    from stepback_ray.pipeline import run_job

    flaky = FlakyS3(0.0)
    with flaky as endpoint:
        creds = {"key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **creds)
        fs.mkdir("drill")
        fs.put(f"{SAMPLE}_questions.json", "drill/in/q.json")
        fs.put(f"{SAMPLE}_outputs.json", "drill/in/o.json")
        flaky.fault_rate = fault_rate
        before = flaky.requests
        job = demo_job(
            "s3://drill/runs/r",
            *[f"storage.{k}={v}" for k, v in {"endpoint_url": endpoint, **creds}.items()],
            "input.questions=s3://drill/in/q.json",
            "input.outputs=s3://drill/in/o.json",
            "ray.users_per_chunk=4",
        )
        t0 = time.time()
        run_job(job)
        wall = time.time() - t0
        faults, requests = flaky.faults, flaky.requests - before
        flaky.fault_rate = 0.0
        fs.invalidate_cache()
        gens = pq.ParquetDataset(fs.ls("drill/runs/r/generations"), filesystem=fs).read().to_pandas()
        manifest = json.loads(fs.cat("drill/runs/r/manifest.json"))
    r = {
        "drill": "s3-faults",
        "faults_injected": faults,
        "fault": f"503 SlowDown on {fault_rate:.0%} of S3 requests ({faults} of {requests}), input and output on S3",
        **reconcile(gens, sample_query_ids(), job.modes),
        "wall_s": round(wall, 1),
        "manifest_rows": manifest["counts"]["generation_rows"],
    }
    r["passed"] = _passed(r) and faults > 0
    return r


# ------------------------------------------------------------------------------------------------ engine error
def _metrics_match_predictions(out: Path, run_metrics: dict[str, Any], job) -> bool:
    from stepback_ray.evaluation.scoring import score_files

    golds = f"{SAMPLE}_outputs.json"
    for mode, m in run_metrics["modes"].items():
        scored = score_files(str(out / "predictions" / f"{mode}.json"), golds, job.task)
        if any(abs(scored[k] - m[k]) > 1e-9 for k in scored) or m["scored"] != m["queries"]:
            return False
    return True


def drill_engine_error(root: Path, *extra: str) -> dict[str, Any]:
    """The engine fails on every prompt that holds one query's input: those rows are flagged, the rest kept.
    ``extra``: job-spec overrides (the test tier runs it with ``executor=in-process``)."""
    from stepback_ray.pipeline import run_job

    questions = json.loads(Path(f"{SAMPLE}_questions.json").read_text())
    victim = questions[3]
    marker = victim["input"][:60]
    # 2 of 40 rows fail: over the default 1 % budget, so the budget is raised (the error-budget drill tests it)
    job = demo_job(
        root / "engine-error", f"engine.dry_run_fail_marker={json.dumps(marker)}", "max_error_fraction=0.5", *extra
    )
    t0 = time.time()
    result = run_job(job)
    gens = pd.read_parquet(root / "engine-error" / "generations")
    failed = gens[gens["status"].str.startswith("error")]
    holds_marker = gens[gens["prompt"].fillna("").str.contains(marker, regex=False)]
    r = {
        "drill": "engine-error",
        "faults_injected": len(holds_marker),
        "fault": "the engine raises on every prompt that holds one query's input (its own rows, and a co-author's "
        "whose retrieved history holds the same paper), inside batched calls",
        **reconcile(gens, {q["id"] for q in questions}, job.modes),
        "wall_s": round(time.time() - t0, 1),
        "failed_rows_are_the_victims": bool(set(failed.index) == set(holds_marker.index)),
        # failed rows count as empty answers: the run's metrics are what `stepback score` gives its predictions
        "metrics_match_predictions": _metrics_match_predictions(root / "engine-error", result.metrics, job),
    }
    r["passed"] = bool(
        _passed(r)
        and r["failed_rows_are_the_victims"]
        and r["metrics_match_predictions"]
        and len(failed) >= len(job.modes)
        and (failed["query_id"] == victim["id"]).sum() == len(job.modes)
    )
    return r


# ------------------------------------------------------------------------------------------------ bad input
BAD_KINDS = ("bad JSON", "wrong type", "huge item", "invalid UTF-8", "id with ../", "id with /", "not an object")


def _good_users(n: int) -> list[dict[str, Any]]:
    """``n`` users with real histories and queries (lamp5_arxiv, cycled under fresh ids when n is larger)."""
    src = SHARED / "lamp5_arxiv" / "dev_questions.json"
    src = src if src.is_file() else Path(f"{SAMPLE}_questions.json")
    questions = json.loads(src.read_text())
    golds = {
        g["id"]: g["output"] for g in json.loads(Path(str(src).replace("_questions", "_outputs")).read_text())["golds"]
    }
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        out.append(
            {
                "user_id": f"good-{i:06d}",
                "history": q["profile"],
                "queries": [{"query_id": f"q-{i:06d}", "input": q["input"], "gold": golds[q["id"]]}],
            }
        )
    return out


def _bad_line(i: int, template: dict[str, Any]) -> tuple[str, bytes]:
    kind = BAD_KINDS[i % len(BAD_KINDS)]
    rec = json.loads(json.dumps(template))
    rec["user_id"] = f"bad-{i:06d}"
    rec["queries"][0]["query_id"] = f"bad-q-{i:06d}"
    if kind == "bad JSON":
        return kind, json.dumps(rec).encode()[:-7]
    if kind == "wrong type":
        rec["history"][0]["title"] = ["a", "list"] if i % 2 else {"an": "object"}
    elif kind == "huge item":
        rec["history"][0]["abstract"] = "lorem ipsum " * 20_000
    elif kind == "invalid UTF-8":
        return kind, json.dumps(rec).encode().replace(b'"title": "', b'"title": "\xff\xfe', 1)
    elif kind == "id with ../":
        rec["user_id"] = f"../../../tmp/escape-{i}"
    elif kind == "id with /":
        rec["user_id"] = f"users/{i}"
    elif kind == "not an object":
        return kind, json.dumps([rec["user_id"], rec["history"]]).encode()
    return kind, json.dumps(rec).encode()


def drill_malformed_input(root: Path, good: int = 10_000, bad: int = 1_000, seed: int = 0) -> dict[str, Any]:
    """``bad`` malformed records shuffled into ``good`` users (JSON Lines, one user a line)."""
    from stepback_ray.pipeline import run_job

    base = root / "malformed"
    data, out = base / "input", base / "out"
    data.mkdir(parents=True, exist_ok=True)
    users = _good_users(good)
    lines = [(None, json.dumps(u).encode()) for u in users] + [_bad_line(i, users[i % len(users)]) for i in range(bad)]
    random.Random(seed).shuffle(lines)
    per_file = -(-len(lines) // 8)
    for f in range(8):
        (data / f"part-{f}.jsonl").write_bytes(
            b"\n".join(line for _, line in lines[f * per_file : (f + 1) * per_file]) + b"\n"
        )
    before = {p for p in Path(root.anchor).glob("tmp/escape-*")}
    job = load_job(
        None,
        [*DRY, "modes=[none, profile+rag]", "generation.max_new_tokens=8", "profile.max_new_tokens=24"],
        data={
            "name": "malformed",
            "task": "LaMP_5",
            "input": {"format": "jsonl", "path": str(data), "layout": "user"},
            "output": str(out),
            "run_id": "drill",
            "ray": {"num_shards": max(1, good // 500)},
        },
    )
    t0 = time.time()
    result = run_job(job)
    wall = time.time() - t0
    gens = pd.read_parquet(out / "generations")
    quarantine = pd.read_parquet(out / "quarantine")
    counts = result.manifest["counts"]
    outside = [str(p) for p in base.rglob("*") if p.is_file() and data not in p.parents and out not in p.parents]
    outside += [str(p) for p in Path(root.anchor).glob("tmp/escape-*") if p not in before]
    reasons: dict[str, int] = {}
    for reason in quarantine["reason"]:
        key = re.sub(r"\[\d+\]", "[N]", re.sub(r"\d{2,}", "N", reason.split(" (")[0]))[:90]
        reasons[key] = reasons.get(key, 0) + 1
    r = {
        "drill": "malformed-input",
        "faults_injected": bad,
        "fault": f"{bad:,} malformed records ({', '.join(BAD_KINDS)}) shuffled into {good:,} good users",
        **reconcile(gens, {u["queries"][0]["query_id"] for u in users}, job.modes),
        "wall_s": round(wall, 1),
        "records_in": counts["rows_in"],
        "records_staged": counts["rows_staged"],
        "records_quarantined": counts["rows_quarantined"],
        "quarantine_reasons": reasons,
        "bad_users_in_output": int(gens["user_id"].str.startswith("bad-").sum()),
        "files_outside_output": outside,
    }
    r["passed"] = (
        _passed(r)
        and r["records_quarantined"] == bad
        and r["records_staged"] == good
        and r["records_in"] == good + bad
        and not outside
        and r["bad_users_in_output"] == 0
    )
    return r


# ------------------------------------------------------------------------------------------------ fatal engines
def _faults(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def drill_engine_fatal(root: Path, kind: str = "dead", after: int = 2, users: int = 20) -> dict[str, Any]:
    """Every engine call after the ``after``-th on an engine instance is fatal: ``dead`` raises vLLM's
    EngineDeadError, ``hang`` never returns (ended by ``engine.call_timeout_s``). The actor ends itself, Ray
    restarts it with a new engine and retries the block: the run completes with 0 error rows. An engine call here
    may serve two blocks (``ray.engine_coalesce``: the actor's blocks in flight share a call), so the 10 chunks of
    20 users take about 5 calls a pass."""
    from stepback_ray.pipeline import run_job

    out, log = root / f"engine-{kind}", root / f"engine-{kind}.faults"
    knob = "engine.dry_run_fatal_after" if kind == "dead" else "engine.dry_run_hang_after"
    job = demo_job(
        out,
        f"{knob}={after}",
        f"engine.dry_run_fault_log={log}",
        "engine.max_restarts=30",
        "engine.call_timeout_s=2",
        "ray.users_per_chunk=2",
        f"limit={users}",
    )
    t0 = time.time()
    result = run_job(job)
    gens = pd.read_parquet(out / "generations")
    faults = _faults(log)
    r = {
        "drill": f"engine-{kind}",
        "faults_injected": len(faults),
        "fault": (
            f"every engine call after the {after}th of an engine instance "
            + ("raises EngineDeadError" if kind == "dead" else "hangs (engine.call_timeout_s = 2)")
        ),
        "engines_that_failed": len({f.split()[1] for f in faults}),
        **reconcile(gens, sample_query_ids(users), job.modes),
        "wall_s": round(time.time() - t0, 1),
        "profile_errors": result.metrics["profiles"]["statuses"].get("error", 0),
    }
    r["passed"] = bool(
        _passed(r)
        and r["faults_injected"] >= 2
        and set(r["rows_by_status"]) <= {"ok", "truncated"}
        and r["profile_errors"] == 0
    )
    return r


def drill_engine_hang(root: Path) -> dict[str, Any]:
    return drill_engine_fatal(root, "hang")


def drill_engine_dead_past_restarts(root: Path) -> dict[str, Any]:
    """An engine that is dead from its first call, with ``engine.max_restarts`` = 2: the run fails within seconds
    with exit status 3 and ``status: failed``, nothing committed as rows."""
    from stepback_ray import cli

    out, log = root / "engine-dead-for-good", root / "engine-dead-for-good.faults"
    t0 = time.time()
    code = cli.main(
        [
            "run",
            str(REPO / "jobs" / "demo.yaml"),
            *[
                a
                for o in [
                    *DRY,
                    f"output={out}",
                    "run_id=drill",
                    "engine.dry_run_fatal_after=0",
                    "engine.max_restarts=2",
                    f"engine.dry_run_fault_log={log}",
                    "modes=[none]",
                ]
                for a in ("--set", o)
            ],
        ]
    )
    manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
    gens = list((out / "generations").glob("*.parquet")) if (out / "generations").exists() else []
    r = {
        "drill": "engine-dead-for-good",
        "faults_injected": len(_faults(log)),
        "fault": "the engine is dead from its first call; engine.max_restarts = 2",
        "rows_expected": 0,
        "rows_out": 0,
        "rows_lost": 0,
        "rows_unexpected": 0,
        "duplicates": 0,
        "rows_by_status": {},
        "exit_code": code,
        "manifest_status": manifest.get("status"),
        "generation_files": len(gens),
        "wall_s": round(time.time() - t0, 1),
    }
    r["passed"] = bool(code == 3 and r["manifest_status"] == "failed" and not gens and r["faults_injected"] == 3)
    return r


def drill_error_budget(root: Path, users: int = 20, *extra: str) -> dict[str, Any]:
    """The engine rejects every prompt (a per-prompt error, e.g. a tokenizer fault): the profile pass of a nightly
    store and a run's generation pass are over ``max_error_fraction``: exit 3, ``status: failed``, the store's
    ``CURRENT.json`` unmoved; the same run ids rerun without the fault retry exactly the failed rows."""
    from stepback_ray import cli

    def run(name: str, *more: str) -> tuple[int, dict[str, Any]]:
        out = root / name
        args = [*DRY, f"output={out}", "run_id=drill", f"limit={users}", *more, *extra]
        code = cli.main(["run", str(REPO / "jobs" / "demo.yaml"), *[a for o in args for a in ("--set", o)]])
        return code, json.loads((out / "manifest.json").read_text())

    store = root / "budget-store"
    fault = "engine.dry_run_fail_marker=<|im_start|>"  # in every rendered chat prompt
    t0 = time.time()
    prof_code, prof_failed = run("budget-profiles", fault, f"profile_store.uri={store}")
    store_moved = (store / "CURRENT.json").exists()
    prof_rerun_code, prof_ok = run("budget-profiles", f"profile_store.uri={store}")
    gen_code, gen_failed = run("budget-generations", fault, "modes=[none, rag]")
    gen_rerun_code, gen_ok = run("budget-generations", "modes=[none, rag]")
    ids = sample_query_ids(users)
    parts = [
        reconcile(pd.read_parquet(root / "budget-profiles" / "generations"), ids, ["none", "profile+rag"]),
        reconcile(pd.read_parquet(root / "budget-generations" / "generations"), ids, ["none", "rag"]),
    ]
    counts = {
        k: sum(p[k] for p in parts) for k in ("rows_expected", "rows_out", "rows_lost", "rows_unexpected", "duplicates")
    }
    by_status: dict[str, int] = {}
    for p in parts:
        for k, v in p["rows_by_status"].items():
            by_status[k] = by_status.get(k, 0) + v
    r = {
        "drill": "error-budget",
        "faults_injected": gen_failed["counts"].get("generation_rows_by_status", {}).get("error", 0)
        + prof_failed["counts"].get("profiles_by_status", {}).get("error", 0),
        "fault": "the engine rejects every prompt: profile pass (with a store) and generation pass over "
        "max_error_fraction = 0.01, then the same run ids rerun without the fault",
        **counts,
        "rows_by_status": by_status,
        "exit_codes": [prof_code, prof_rerun_code, gen_code, gen_rerun_code],
        "manifest_status": [
            prof_failed.get("status"),
            prof_ok.get("status"),
            gen_failed.get("status"),
            gen_ok.get("status"),
        ],
        "store_moved_by_failed_run": store_moved,
        "generation_chunks_retried": gen_ok["chunks_committed_this_run"]["generations"],
        "wall_s": round(time.time() - t0, 1),
    }
    r["passed"] = bool(
        _passed(r)
        and r["rows_out"] == r["rows_expected"]
        and r["exit_codes"] == [3, 0, 3, 0]
        and r["manifest_status"] == ["failed", "ok", "failed", "ok"]
        and not store_moved
        and set(r["rows_by_status"]) <= {"ok", "truncated"}
    )
    return r


# ------------------------------------------------------------------------------------------------ node loss
def _node_of(pid: int, nodes: list) -> Any:
    """The cluster node (``ray.cluster_utils.Cluster`` node) whose raylet started process ``pid``."""
    raylets = {n.all_processes["raylet"][0].process.pid: n for n in nodes}
    p = psutil.Process(pid)
    while p is not None:
        if p.pid in raylets:
            return raylets[p.pid]
        p = p.parent()
    return None


def drill_node_loss(root: Path) -> dict[str, Any]:
    """A Ray cluster of a head and two worker nodes that declare one GPU each (``ray.cluster_utils.Cluster``, all
    on this machine); engine actors ask for a GPU, so they run on the workers. Once a generation chunk is
    committed, the worker node holding the generation engine actor is removed (spot loss): Ray restarts the actor
    on the surviving node and retries its blocks; 0 rows lost, 0 duplicates."""
    import ray
    from ray.cluster_utils import Cluster

    from stepback_ray.pipeline import run_job

    out = root / "node-loss"
    gen_dir = out / "generations"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    removed: list[str] = []
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        job = demo_job(
            out,
            f"ray.address={cluster.address}",
            "storage.shared_filesystem=true",
            "ray.engine_actor_gpus=1",
            "ray.users_per_chunk=2",
            "engine.dry_run_tokens_per_s=1500",
        )

        def lose_the_engine_node() -> None:
            deadline = time.time() + 900
            while time.time() < deadline and not removed:
                if gen_dir.exists() and any(gen_dir.glob("chunk-*.parquet")):
                    for p in psutil.process_iter(["pid", "cmdline"]):
                        if ENGINE_ACTOR in " ".join(p.info["cmdline"] or []):
                            node = _node_of(p.info["pid"], workers)
                            if node is not None:
                                cluster.remove_node(node, allow_graceful=False)
                                removed.append(node.node_id)
                                return
                time.sleep(0.2)

        killer = threading.Thread(target=lose_the_engine_node, daemon=True)
        killer.start()
        t0 = time.time()
        result = run_job(job)
        killer.join(timeout=5)
        gens = pd.read_parquet(gen_dir)
        alive = sum(1 for n in ray.nodes() if n["Alive"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    r = {
        "drill": "node-loss",
        "faults_injected": len(removed),
        "fault": "the worker node (1 of 2, one GPU each) running the generation engine actor removed mid-pass",
        **reconcile(gens, sample_query_ids(), job.modes),
        "wall_s": round(time.time() - t0, 1),
        "nodes_alive_after": alive,
        "generation_chunks": result.manifest["counts"]["generation_chunks"],
    }
    r["passed"] = bool(_passed(r) and r["faults_injected"] == 1 and set(r["rows_by_status"]) <= {"ok", "truncated"})
    return r


# ------------------------------------------------------------------------------------------------ store race
def _profile_driver(out: Path, store: str, run_id: str, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stepback_ray",
            "profile",
            "jobs/demo.yaml",
            *sum(
                [
                    ["--set", s]
                    for s in [
                        *DRY,
                        f"output={out}",
                        f"run_id={run_id}",
                        f"profile_store.uri={store}",
                        "limit=8",
                        "ray.users_per_chunk=2",
                        "engine.dry_run_tokens_per_s=3000",
                        *extra,
                    ]
                ],
                [],
            ),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _race(root: Path, store: str, name: str, extra: list[str], read_current) -> dict[str, Any]:
    """Two nightly profile jobs started from the same store version (5 s apart, so both read CURRENT.json before
    either commits): exactly one commits, the other exits 3 naming the version that beat it."""
    procs = {}
    for run_id in ("night-a", "night-b"):
        procs[run_id] = _profile_driver(root / f"{name}-{run_id}", store, run_id, extra)
        time.sleep(5)
    done = {k: (p.wait(timeout=1800), p.stderr.read()) for k, p in procs.items()}
    codes = {k: c for k, (c, _) in done.items()}
    try:
        current = read_current()
    except (FileNotFoundError, OSError):
        current = {}  # nobody committed
    winner = next((k for k, c in codes.items() if c == 0), None)
    loser = next((k for k, c in codes.items() if c != 0), None)
    last_line = done[loser][1].strip().splitlines()[-1] if loser else ""
    return {
        "exit_codes": sorted(codes.values()),
        "winner": winner,
        "current_run": current.get("run_id"),
        "loser_says": last_line[:300],
        **(
            {} if winner and loser else {"stderr_tails": {k: e.strip().splitlines()[-3:] for k, (_, e) in done.items()}}
        ),
        "ok": bool(
            sorted(codes.values()) == [0, 3]
            and current.get("run_id") == winner
            and last_line.startswith("error: ")
            and "another job committed" in last_line
            and winner in last_line
        ),
    }


def drill_store_race(root: Path) -> dict[str, Any]:
    """Two nightly jobs racing on one profile store, on a local path and on S3 (moto): CURRENT.json is a
    compare-and-swap, so one job commits and the other fails loud; nothing of the winner is lost."""
    import s3fs

    t0 = time.time()
    local = root / "race-store"
    results = {
        "local": _race(root, str(local), "race-local", [], lambda: json.loads((local / "CURRENT.json").read_text()))
    }
    with FlakyS3(0.0) as endpoint:
        creds = {"key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True, **creds)
        fs.mkdir("race")
        opts = [f"storage.{k}={v}" for k, v in {"endpoint_url": endpoint, **creds}.items()]
        seed = _profile_driver(root / "race-s3-seed", "s3://race/store", "seed", opts)  # If-Match, not only If-None
        if seed.wait(timeout=1800) != 0:
            raise RuntimeError(f"the seed night failed: {seed.stderr.read()[-2000:]}")

        def current() -> dict[str, Any]:
            fs.invalidate_cache()
            return json.loads(fs.cat("race/store/CURRENT.json"))

        results["s3"] = _race(root, "s3://race/store", "race-s3", opts, current)
    r = {
        "drill": "store-race",
        "faults_injected": 2,
        "fault": "two nightly profile jobs started 5 s apart from one store version, on a local store and on S3",
        "rows_expected": 0,
        "rows_out": 0,
        "rows_lost": 0,
        "rows_unexpected": 0,
        "duplicates": 0,
        "rows_by_status": {},
        **{f"{k}_{f}": v[f] for k, v in results.items() for f in v},
        "wall_s": round(time.time() - t0, 1),
    }
    r["passed"] = bool(all(v["ok"] for v in results.values()))
    return r


DRILLS = {
    "worker-kill": drill_worker_kill,
    "driver-kill": drill_driver_kill,
    "s3-faults": drill_s3_faults,
    "engine-error": drill_engine_error,
    "engine-dead": drill_engine_fatal,
    "engine-hang": drill_engine_hang,
    "engine-dead-for-good": drill_engine_dead_past_restarts,
    "error-budget": drill_error_budget,
    "store-race": drill_store_race,
    "node-loss": drill_node_loss,
    "same-run-twice": drill_same_run_twice,
    "malformed-input": drill_malformed_input,
}


def _plain(value: Any) -> Any:
    """numpy scalars (counts read back with pandas) as plain JSON values."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_record(folder: Path, record: dict[str, Any], command: str) -> None:
    """One drill's record, dated, as ``<folder>/<drill>.json`` (the table is built from all of them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['drill']}.json").write_text(
        json.dumps(
            {**record, "date": dt.date.today().isoformat(), "machine": machine(), "command": command},
            indent=1,
            default=_plain,
        )
        + "\n"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drills", default=",".join(DRILLS))
    ap.add_argument("--good", type=int, default=10_000, help="malformed-input: good users")
    ap.add_argument("--bad", type=int, default=1_000, help="malformed-input: malformed records")
    ap.add_argument("--s3-fault-rate", type=float, default=0.1)
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep each drill's record in --results and regenerate docs/results.md",
    )
    ap.add_argument(
        "--results", default=str(REPO / "docs" / "results" / "drills"), help="where each drill's record is kept"
    )
    args = ap.parse_args()
    import ray

    root = Path(tempfile.mkdtemp(prefix="stepback-drills-"))
    results = []
    try:
        for name in args.drills.split(","):
            if name in ("driver-kill", "store-race", "node-loss", "same-run-twice"):  # these start their own Ray
                results.append(DRILLS[name](root))
            else:
                init_local_ray()
                try:
                    kwargs = {
                        "malformed-input": {"good": args.good, "bad": args.bad},
                        "s3-faults": {"fault_rate": args.s3_fault_rate},
                    }.get(name, {})
                    results.append(DRILLS[name](root, **kwargs))
                finally:
                    ray.shutdown()
            print(json.dumps(results[-1], default=_plain), file=sys.stderr, flush=True)
            if args.write:  # kept at once: a later drill that crashes does not lose this one
                save_record(Path(args.results), results[-1], " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "command": " ".join(sys.argv[1:]),
        "drills": results,
    }
    print(json.dumps(report, indent=1, default=_plain))
    if args.write:  # each drill's latest record is kept, so drills can be rerun one at a time
        from benchmarks.results_page import write

        write()
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
