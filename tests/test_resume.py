"""kill -9 of the driver mid-run, then a rerun of the same run id: exactly one row per query, nothing lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pandas as pd
import psutil

from .conftest import REPO


def _run(out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "stepback_ray", "run", "jobs/demo.yaml", "--set", f"output={out}",
         "--set", "run_id=resume", "--set", "limit=10", "--set", "ray.users_per_chunk=2",
         "--set", "generation.max_new_tokens=12", "--set", "profile.max_new_tokens=32",
         "--set", "profile.history_token_budget=512", "--set", "ray.progress_bars=false",
         # the dry-run engine at 2000 tokens/s: a real run's pace without the model's CPU cost
         "--set", "engine.kind=dry-run", "--set", "engine.dry_run_tokens_per_s=2000", *extra],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _kill_all(proc) -> None:
    """kill -9 the driver and every process of the local Ray it started (a machine losing power), and wait until
    all are gone. Ray's raylet and workers are descendants in sessions of their own, so a process-group kill
    alone can leave a worker that still commits a chunk after the kill: freeze the whole tree first (a stopped
    process cannot fork), then kill it."""
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


def test_kill_driver_mid_run_then_rerun(tmp_path):
    out = tmp_path / "run"
    proc = _run(out)
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until some generation chunks are committed, then pull the plug
        done = list((out / "generations").glob("chunk-*.parquet")) if (out / "generations").exists() else []
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    _kill_all(proc)
    committed_before = sorted(p.name for p in (out / "generations").glob("chunk-*.parquet"))
    assert not (out / "manifest.json").exists()
    assert 2 <= len(committed_before) < 5

    rerun = _run(out)
    _, err = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, err[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed"] is True
    assert manifest["chunks_committed_this_run"]["generations"] == manifest["counts"]["generation_chunks"] - len(
        committed_before)
    gens = pd.read_parquet(out / "generations")
    assert len(gens) == 10 * 2 == manifest["counts"]["generation_rows"]
    assert gens.groupby(["query_id", "mode"]).size().eq(1).all()  # no duplicates, none missing
    assert not list(out.rglob("*.tmp-*"))  # no half-written file survived
