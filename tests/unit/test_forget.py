"""`stepback forget`: a person's profiles, embeddings and outputs removed from every store version and run output,
everything else left as it was, and the person kept out of later runs (no Ray: the passes run in process; a dataset
input, staged by Ray Data: tests/ray/test_forget.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.cli import main
from stepback_ray.config import StorageConfig, load_job
from stepback_ray.pipeline import run_job, run_profile_job
from stepback_ray.pipeline.schemas import EMBEDDING_SCHEMA
from stepback_ray.storage import RunStore
from stepback_ray.store.forget import DENY_LIST, forget
from tests.support import REPO, SAMPLE

MODES = ["profile+rag", "random-profile", "rag"]


def _job(out: str, store: str, run_id: str, storage: dict, modes=MODES, extra=()):
    return load_job(
        None,
        ["engine.kind=dry-run", *extra],
        data={
            "name": "forget",
            "task": "LaMP_5",
            "modes": modes,
            "run_id": run_id,
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": out,
            "profile_store": {"uri": store},
            "storage": storage,
            "ray": {"num_shards": 4, "progress_bars": False},
            "executor": "in-process",
        },
    )


def _three_versions_and_a_run(base: str, storage: dict) -> tuple[str, str]:
    """A store with three versions (two profile nights, then a run that also generates) and that run's output;
    the last version also holds Persona-Plug item embeddings for a few users."""
    store, run = f"{base}/store", f"{base}/runs/r3"
    run_profile_job(_job(f"{base}/runs/n1", store, "n1", storage, modes=["profile"]))
    run_profile_job(_job(f"{base}/runs/n2", store, "n2", storage, modes=["profile"]))
    result = run_job(_job(run, store, "r3", storage))
    version = result.metrics["profiles"]["version"]
    users = json.loads(Path(f"{SAMPLE}_questions.json").read_text())
    rows = [
        {
            "chunk_id": "00000",
            "user_id": q["user_id"],
            "item_ids": ["a"],
            "vectors": [[0.5, 0.25]],
            "encoder": "test",
            "reused": 0,
        }
        for q in users
    ]
    RunStore(store, StorageConfig(**storage)).write_table(
        f"{version}/embeddings/chunk-00000.parquet", pa.Table.from_pylist(rows, schema=EMBEDDING_SCHEMA)
    )
    return store, run


def _parquet(uri: str, storage: dict) -> dict[str, bytes]:
    """Every Parquet file under ``uri`` (relative path -> bytes)."""
    s = RunStore(uri, StorageConfig(**storage))
    root = s.root.rstrip("/") + "/"
    if hasattr(s.fs, "invalidate_cache"):
        s.fs.invalidate_cache()
    return {p[len(root) :]: s.fs.cat_file(p) for p in s.fs.find(s.root) if p.endswith(".parquet")}


def _rows(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


def _mentions(row: dict, user: str, texts: list[str]) -> bool:
    blob = json.dumps(row, default=str)
    return user in (row.get("user_id"), *(row.get("user_ids") or []), *(row.get("context_user_ids") or [])) or any(
        t in blob for t in texts
    )


def _check_forgotten(base: str, storage: dict, before: dict[str, dict[str, bytes]], user: str, texts: list[str]):
    """The user is in no Parquet file; every other row is as it was; files that held no trace are untouched."""
    removed = {"profiles": 0, "embeddings": 0, "generations": 0}
    for where, files in before.items():
        after = _parquet(where, storage)
        assert set(after) == set(files)
        for rel, data in files.items():
            old, new = _rows(data), _rows(after[rel])
            assert not any(_mentions(r, user, texts) for r in new), rel
            kept = [r for r in old if not _mentions(r, user, texts)]
            assert new == kept, rel
            if len(kept) == len(old):
                assert after[rel] == data, f"{rel} rewritten though it held nothing of {user}"
            kind = next((k for k in removed if f"{k}/" in rel), None)
            if kind:
                removed[kind] += len(old) - len(kept)
    return removed


@pytest.mark.parametrize("where", ["local", "s3"])
def test_forget_removes_a_user_everywhere_and_keeps_them_out(tmp_path, request, where):
    if where == "s3":
        endpoint, bucket, creds = request.getfixturevalue("s3_bucket")
        base, storage = f"s3://{bucket}", creds
    else:
        base, storage = str(tmp_path), {}
    store, run = _three_versions_and_a_run(base, storage)
    gens = [r for d in _parquet(run, storage).values() for r in _rows(d) if "mode" in r]
    user = gens[0]["user_id"]
    own_queries = {r["query_id"] for r in gens if r["user_id"] == user}
    borrowers = [r for r in gens if r["mode"] == "random-profile" and user in r["context_user_ids"]]
    assert borrowers, "the fixture needs another user who borrowed this one's profile"
    s = RunStore(store, StorageConfig(**storage))
    stored = [r for d in _parquet(store, storage).values() for r in _rows(d)]
    others = {r.get("profile_text") for r in stored if r.get("user_id") != user}
    profile_texts = sorted(
        {r["profile_text"] for r in stored if r.get("user_id") == user and r.get("profile_text")} - others
    )  # the dry-run engine's texts repeat across users: only the user's own count
    before = {store: _parquet(store, storage), run: _parquet(run, storage)}
    r = RunStore(run, StorageConfig(**storage))
    # Ray's output may quote an id; a longer id holding it as a prefix is another user's
    log = f"worker: started\nerror in row of user {user}: bad history\nuser {user}x is someone else\nworker: done\n"
    r.write_bytes("logs/ray.log", log.encode())

    audit = forget(store, [user, "nobody-at-all"], [run], StorageConfig(**storage))

    removed = _check_forgotten(base, storage, before, user, profile_texts)
    assert audit["rows_removed"] == {k: v for k, v in removed.items()} | {
        "predictions": removed["generations"],
        "log_lines": 1,
    }
    assert r.read_bytes("logs/ray.log").decode() == (
        f"worker: started\n[line removed by stepback forget]\nuser {user}x is someone else\nworker: done\n"
    )
    assert removed["profiles"] == 3 and removed["embeddings"] == 1  # one row per version; the last embeddings
    assert removed["generations"] == len(own_queries) * len(MODES) + len(borrowers)
    assert audit["not_found"] == ["nobody-at-all"] and audit["versions_scanned"] == 3
    assert s.read_json(DENY_LIST)["users"].keys() == {user, "nobody-at-all"}
    assert s.list("forgotten/audit", ".json")
    for mode in MODES:
        ids = {p["id"] for p in r.read_json(f"predictions/{mode}.json")["golds"]}
        assert ids and not ids & own_queries
    assert r.read_json("metrics.json")["modes"]["rag"]["queries"] == 20 - len(own_queries)
    assert r.read_json("manifest.json")["forgotten"][0]["generation_rows_removed"] == removed["generations"]
    assert r.exists("report.html")

    if where == "s3":  # what follows is the store's logic, the same on both (S3's part is the rewrites and the CAS)
        return
    # a later night and a later run against the store: the user is not profiled, and is counted
    night = run_profile_job(_job(f"{base}/runs/n4", store, "n4", storage, modes=["profile"]))
    assert night.manifest["counts"]["forgotten_users"] == 1
    assert night.manifest["counts"]["forgotten_queries"] == len(own_queries)
    version = night.metrics["profiles"]["version"]
    assert user not in {
        row["user_id"] for rel in s.list(f"{version}/profiles", ".parquet") for row in s.read_table(rel).to_pylist()
    }
    again = run_job(_job(f"{base}/runs/r5", store, "r5", storage))
    assert again.manifest["counts"]["queries"] == 20 - len(own_queries)
    assert again.manifest["counts"]["generation_rows"] == (20 - len(own_queries)) * len(MODES)

    # rerunning the same forget finds nothing more to do; undo lets the user back in (as a new profile)
    assert forget(store, [user], [run], StorageConfig(**storage))["rows_removed"] == {}
    undo = forget(store, [user], storage=StorageConfig(**storage), undo=True)
    assert undo["removed_from_deny_list"] == [user]
    back = run_profile_job(_job(f"{base}/runs/n6", store, "n6", storage, modes=["profile"]))
    assert "forgotten_users" not in back.manifest["counts"] or back.manifest["counts"]["forgotten_users"] == 0
    assert back.metrics["profiles"]["origins"]["new"] == 1


def test_a_forget_killed_part_way_and_rerun_ends_in_the_same_state(tmp_path):
    """kill -9 after the first file is rewritten; the rerun ends where an uninterrupted forget does."""
    store, run = _three_versions_and_a_run(str(tmp_path / "a"), {})
    gens = [r for d in _parquet(run, {}).values() for r in _rows(d) if "mode" in r]
    user = gens[0]["user_id"]
    import shutil

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    clean = forget(str(tmp_path / "b" / "store"), [user], [str(tmp_path / "b" / "runs" / "r3")])
    marker = tmp_path / "first-write-done"
    script = f"""
import time
from stepback_ray import storage
real = storage.RunStore.write_table
def slow(self, rel, table):
    real(self, rel, table)
    open({str(marker)!r}, "w").close()
    time.sleep(60)
storage.RunStore.write_table = slow
from stepback_ray.store.forget import forget
forget({store!r}, [{user!r}], [{run!r}])
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)  # this checkout's stepback_ray
    try:
        deadline = time.time() + 120
        while not marker.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert marker.exists(), "the forget never rewrote a file"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    partial = [r for d in _parquet(store, {}).values() for r in _rows(d) if r.get("user_id") == user]
    assert partial, "killed too late: nothing left to finish"
    again = forget(store, [user], [run])
    assert (
        again["rows_removed"]["profiles"] + again["rows_removed"].get("embeddings", 0)
        < clean["rows_removed"]["profiles"] + clean["rows_removed"]["embeddings"]
    )
    for sub in ("store", "runs/r3"):
        a, b = _parquet(str(tmp_path / "a" / sub), {}), _parquet(str(tmp_path / "b" / sub), {})
        assert a.keys() == b.keys()
        for rel in a:
            drop = {"committed_at"}
            strip = [{k: v for k, v in r.items() if k not in drop} for r in _rows(a[rel])]
            assert strip == [{k: v for k, v in r.items() if k not in drop} for r in _rows(b[rel])], rel
    for mode in MODES:
        assert RunStore(run, StorageConfig()).read_json(f"predictions/{mode}.json") == RunStore(
            str(tmp_path / "b" / "runs" / "r3"), StorageConfig()
        ).read_json(f"predictions/{mode}.json")


@pytest.mark.parametrize("when", ["before its profiles are written", "after its profiles are written"])
def test_a_forget_during_a_nightly_run_is_not_undone_by_its_commit(tmp_path, monkeypatch, when):
    """The night read its input (and the deny-list) before the forget ran. Either the forget's scan of the version
    folders finds the night's files (written before it), or the night's commit re-reads the deny-list and takes
    the user out of the version it makes current (written after): no lost update either way."""
    from stepback_ray.pipeline import in_process

    store = str(tmp_path / "store")
    run_profile_job(_job(str(tmp_path / "runs" / "n1"), store, "n1", {}, modes=["profile"]))
    user = json.loads(Path(f"{SAMPLE}_questions.json").read_text())[0]["user_id"]
    real = in_process.InProcess.run
    before = when.startswith("before")

    def forget_around_the_pass(self, spec, chunks, at, *rest):
        if spec.name == "profile" and before:
            forget(store, [user])
        out = real(self, spec, chunks, at, *rest)
        if spec.name == "profile" and not before:
            forget(store, [user])
        return out

    monkeypatch.setattr(in_process.InProcess, "run", forget_around_the_pass)
    night = run_profile_job(_job(str(tmp_path / "runs" / "n2"), store, "n2", {}, modes=["profile"]))
    assert night.metrics["profiles"].get("forgotten_during_run") == ({"profiles": 1} if before else None)
    s = RunStore(store, StorageConfig())
    current = s.read_json("CURRENT.json")["version"]
    assert current == night.metrics["profiles"]["version"]
    assert user not in {
        r["user_id"] for rel in s.list(f"{current}/profiles", ".parquet") for r in s.read_table(rel).to_pylist()
    }


def test_bad_forget_input_is_one_line(tmp_path, capsys):
    (tmp_path / "not-a-store").mkdir()
    assert main(["forget", "--store", str(tmp_path / "not-a-store"), "--user", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a profile store" in err
    store = str(tmp_path / "store")
    run_profile_job(_job(str(tmp_path / "runs" / "n1"), store, "n1", {}, modes=["profile"]))
    assert main(["forget", "--store", store]) == 2
    assert "no user ids given" in capsys.readouterr().err
    assert main(["forget", "--store", store, "--users-file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    (tmp_path / "ids.txt").write_text("someone-unknown\n\n")
    assert main(["forget", "--store", store, "--users-file", str(tmp_path / "ids.txt")]) == 0
    assert json.loads(capsys.readouterr().out)["not_found"] == ["someone-unknown"]
    assert main(["forget", "--store", store, "--user", "u", "--runs", str(tmp_path / "nowhere")]) == 2
    assert "not a run output" in capsys.readouterr().err
