"""A profile store and a run output that meet damage, a full disk, a signal or a changed input (issue #41): every
case one line naming the file, with an exit code that says what happened (README, "Exit codes"), and nothing lost
that was committed. The in-process executor and the dry-run engine (no Ray, no model) unless a test says so."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stepback_ray.cli import main
from stepback_ray.storage import run_store as storage
from tests.support import REPO, SAMPLE, free_port, lamp5_users, write_items_parquet


# ------------------------------------------------------------------------------------------------ helpers
def _spec(tmp_path: Path, run_id: str, extra: dict | None = None, output: str | None = None) -> str:
    """A job spec file: LaMP_5 sample, dry-run engine, in process, 4 shards, the store under ``tmp_path``."""
    data = {
        "name": "integrity",
        "task": "LaMP_5",
        "modes": ["profile"],
        "run_id": run_id,
        "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
        "output": output or str(tmp_path / "runs" / run_id),
        "engine": {"kind": "dry-run"},
        "profile_store": {"uri": str(tmp_path / "store")},
        "ray": {"num_shards": 4, "progress_bars": False},
        "executor": "in-process",
    }
    for key, value in (extra or {}).items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    spec = tmp_path / f"{run_id}.yaml"
    spec.write_text(yaml.safe_dump(data))
    return str(spec)


@pytest.fixture(scope="module")
def first_night(tmp_path_factory):
    """A store after one night (n1, 20 users in 4 chunks), built once and copied by each test that needs it."""
    base = tmp_path_factory.mktemp("first-night")
    assert main(["profile", _spec(base, "n1")]) == 0
    return base


@pytest.fixture
def store_of_one_night(first_night, tmp_path):
    shutil.copytree(first_night / "store", tmp_path / "store")
    return tmp_path / "store"


def _current(store: Path) -> str:
    return json.loads((store / "CURRENT.json").read_text())["version"]


def _users(path: Path) -> list[str]:
    return pq.read_table(path, columns=["user_id"]).column("user_id").to_pylist()


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def flip_a_bit_in_profile_text(path: Path) -> None:
    """One bit flipped inside the ``profile_text`` column chunk, where the file still reads but a profile text has
    changed (zstd keeps literals as they are: a bit flipped there decompresses to another character, silently),
    the case a reader cannot notice; a flip that breaks the file is the fallback."""
    data = path.read_bytes()
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    group = md.row_group(0)
    col = next(group.column(c) for c in range(md.num_columns) if group.column(c).path_in_schema == "profile_text")
    start = col.dictionary_page_offset or col.data_page_offset
    texts = pq.read_table(io.BytesIO(data)).column("profile_text").to_pylist()
    for off in range(start + col.total_compressed_size - 1, start, -1):
        flipped = bytearray(data)
        flipped[off] ^= 0x01
        try:
            if pq.read_table(io.BytesIO(bytes(flipped))).column("profile_text").to_pylist() != texts:
                path.write_bytes(bytes(flipped))
                return
        except Exception:  # noqa: BLE001 - this flip breaks the file; look for a silent one
            continue
    flipped = bytearray(data)
    flipped[start + col.total_compressed_size // 2] ^= 0x01
    path.write_bytes(bytes(flipped))


# ------------------------------------------------------------------------ 3: checksums, carry-over, promote
def test_a_bit_flipped_in_the_current_version_is_not_carried_and_promote_refuses_that_version(
    store_of_one_night, tmp_path, capsys
):
    store = store_of_one_night
    v1 = _current(store)
    manifest = json.loads((store / v1 / "manifest.json").read_text())
    files = sorted(str(p.relative_to(store)) for p in (store / v1 / "profiles").glob("*.parquet"))
    assert sorted(manifest["checksums"]) == files  # every committed file, with the sha256 of its bytes
    for rel in files:
        assert manifest["checksums"][rel] == "sha256:" + hashlib.sha256((store / rel).read_bytes()).hexdigest()
    damaged = store / v1 / "profiles" / "chunk-00001.parquet"
    hit = set(_users(damaged))
    flip_a_bit_in_profile_text(damaged)
    capsys.readouterr()

    assert main(["profile", _spec(tmp_path, "n2")]) == 0
    captured = capsys.readouterr()
    stats = json.loads(captured.out)
    named = f"{store}/{v1}/profiles/chunk-00001.parquet"
    assert [d["file"] for d in stats["damaged_base_files"]] == [named]
    assert "sha256" in stats["damaged_base_files"][0]["problem"]
    assert named in captured.err and "recomputed" in captured.err  # said, not only recorded
    v2 = _current(store)
    assert v2 != v1
    new = json.loads((store / v2 / "manifest.json").read_text())
    assert [d["file"] for d in new["damaged_base_files"]] == [named]
    rows = pq.read_table(store / v2 / "profiles").to_pylist()
    assert len(rows) == 20  # 0 rows lost
    origins = {r["user_id"]: r["origin"] for r in rows}
    assert {u for u, o in origins.items() if o != "carried"} == hit
    assert {origins[u] for u in hit} == {"recomputed"}
    assert stats["origins"]["carried"] == 20 - len(hit) and stats["origins"]["recomputed"] == len(hit)
    assert all(any("chunk-00001.parquet" in n for n in r["notes"]) for r in rows if r["user_id"] in hit)

    live = (store / "CURRENT.json").read_bytes()
    assert main(["promote", "--store", str(store), "--version", "n1"]) == 2  # back to the damaged version: refused
    line = _one_error_line(capsys.readouterr().err)
    assert named in line and "sha256" in line and "cannot be promoted" in line
    assert (store / "CURRENT.json").read_bytes() == live


def test_a_version_written_before_checksums_is_carried_and_promoted_as_before(store_of_one_night, tmp_path, capsys):
    store = store_of_one_night
    v1 = _current(store)
    path = store / v1 / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.pop("checksums")
    path.write_text(json.dumps(manifest))
    assert main(["profile", _spec(tmp_path, "n2")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["origins"]["carried"] == 20 and not stats.get("damaged_base_files")
    assert main(["promote", "--store", str(store), "--version", "n1"]) == 0
    assert _current(store) == v1
    # without checksums a file that no longer parses is still found: truncated, it is refused by promote
    chunk = store / v1 / "profiles" / "chunk-00002.parquet"
    chunk.write_bytes(chunk.read_bytes()[:-100])
    capsys.readouterr()
    v2 = next(v for v in (store / "versions").glob("*/run=n2"))
    assert main(["promote", "--store", str(store), "--version", str(v2.relative_to(store))]) == 0
    assert main(["promote", "--store", str(store), "--version", "n1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{store}/{v1}/profiles/chunk-00002.parquet" in line and "not a readable Parquet file" in line


# ------------------------------------------------------------------------------ 5: a damaged CURRENT.json
@pytest.mark.parametrize(
    "content, problem",
    [
        (b'{"version": "versions/date=2026', "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "not a store pointer"),
        (b'{"version": "versions/x", "users": 3}', "not a store pointer (no 'num_shards')"),
    ],
    ids=["truncated", "empty", "a-list", "no-num_shards"],
)
def test_a_damaged_pointer_is_one_line_naming_it_and_promote_repairs_it(
    store_of_one_night, tmp_path, capsys, content, problem
):
    store = store_of_one_night
    v1 = _current(store)
    pointer = store / "CURRENT.json"
    pointer.write_bytes(content)
    capsys.readouterr()
    assert main(["profile", _spec(tmp_path, "n2")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{pointer}: {problem}" in line and "stepback promote" in line
    deny = store / "forgotten" / "deny-list.json"
    assert main(["forget", "--store", str(store), "--user", "someone"]) == 2  # before anything changes
    line = _one_error_line(capsys.readouterr().err)
    assert f"{pointer}: {problem}" in line and not deny.exists()
    assert main(["promote", "--store", str(store), "--version", "n1"]) == 0  # a verified version over the damage
    assert "moved from a damaged CURRENT.json" in capsys.readouterr().out
    assert _current(store) == v1 and json.loads(pointer.read_text())["num_shards"] == 4
    assert main(["profile", _spec(tmp_path, "n2")]) == 0
    assert json.loads(capsys.readouterr().out)["origins"]["carried"] == 20


def test_a_truncated_chunk_of_a_run_output_is_one_line_naming_it(tmp_path, capsys):
    spec = _spec(tmp_path, "r1", {"modes": ["none"], "profile_store": {"uri": None}})
    assert main(["run", spec]) == 0
    chunk = tmp_path / "runs" / "r1" / "generations" / "chunk-00001.parquet"
    chunk.write_bytes(chunk.read_bytes()[:-50])
    capsys.readouterr()
    assert main(["run", spec]) == 2  # the rerun reads its committed chunks
    line = _one_error_line(capsys.readouterr().err)
    assert f"error: {chunk}: not a readable Parquet file (" in line


# ----------------------------------------------------------------------- 2: a forget past a damaged file
def test_a_forget_past_a_damaged_file_scrubs_every_other_file_and_says_it_is_incomplete(
    store_of_one_night, tmp_path, capsys
):
    store = store_of_one_night
    v1 = _current(store)
    user = _users(store / v1 / "profiles" / "chunk-00000.parquet")[0]
    broken = store / v1 / "profiles" / "chunk-00003.parquet"  # an unrelated chunk, truncated
    broken.write_bytes(broken.read_bytes()[:200])
    capsys.readouterr()
    assert main(["forget", "--store", str(store), "--user", user]) == 3
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    named = f"{store}/{v1}/profiles/chunk-00003.parquet"
    assert "forget incomplete" in line and named in line and "not a readable Parquet file" in line
    record = json.loads(captured.out)
    assert record["incomplete"] is True and [d["file"] for d in record["damaged_files"]] == [named]
    assert record["rows_removed"] == {"profiles": 1} and record["not_found"] == []
    audits = list((store / "forgotten" / "audit").glob("*.json"))
    assert len(audits) == 1 and json.loads(audits[0].read_text()) == record
    assert user in json.loads((store / "forgotten" / "deny-list.json").read_text())["users"]
    for chunk in (store / v1 / "profiles").glob("*.parquet"):
        if chunk != broken:
            assert user not in _users(chunk)
    # the rewritten file's new checksum is recorded: the version still verifies, the next night carries it
    manifest = json.loads((store / v1 / "manifest.json").read_text())
    rel = f"{v1}/profiles/chunk-00000.parquet"
    digest = hashlib.sha256((store / rel).read_bytes()).hexdigest()
    assert manifest["checksums"][rel] == "sha256:" + digest and not manifest.get("checksums_pending")
    broken.unlink()  # the operator removes (or restores) the damaged file; the forget then completes
    assert main(["forget", "--store", str(store), "--user", user]) == 0
    assert json.loads(capsys.readouterr().out)["incomplete"] is False


def test_a_forget_past_a_damaged_run_file_owes_the_run_its_predictions_until_a_forget_can_rebuild_them(
    tmp_path, capsys
):
    assert main(["run", _spec(tmp_path, "r1")]) == 0  # profiles in the store, generations in the run output
    run = tmp_path / "runs" / "r1"
    user, query = next((r["user_id"], r["query_id"]) for r in pq.read_table(run / "generations").to_pylist())
    damaged = next(p for p in sorted((run / "generations").glob("*.parquet")) if user not in _users(p))
    damaged.write_bytes(damaged.read_bytes()[:100])
    capsys.readouterr()
    args = ["forget", "--store", str(tmp_path / "store"), "--user", user, "--runs", str(run)]
    assert main(args) == 3
    record = json.loads(capsys.readouterr().out)
    assert record["rows_removed"]["generations"] == 1 and "predictions" not in record["rows_removed"]
    assert [d["file"] for d in record["damaged_files"]] == [str(damaged), f"{run}/predictions/"]
    assert (run / "_forget_rebuild_owed.json").exists()
    damaged.unlink()
    assert main(args) == 0  # nothing of the user is left to remove, but the predictions are owed: rebuilt now
    assert json.loads(capsys.readouterr().out)["rows_removed"] == {}
    assert query not in {g["id"] for g in json.loads((run / "predictions" / "profile.json").read_text())["golds"]}
    assert not (run / "_forget_rebuild_owed.json").exists()


# ----------------------------------------------------------------------------------------- 6: disk full
def _disk_full_at(monkeypatch, marker: str) -> list[str]:
    """Writes through the run store whose path holds ``marker`` fill the disk: part of the bytes land, then ENOSPC."""
    hits: list[str] = []

    class Full(io.FileIO):
        def write(self, b):
            super().write(bytes(b)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(file, mode="r", *args, **kwargs):
        if marker in str(file) and "w" in mode:
            hits.append(str(file))
            return Full(file, "w")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(storage, "open", fake_open, raising=False)
    return hits


@pytest.mark.parametrize("marker", ["generations/chunk-00002", "predictions/"])
def test_a_full_disk_is_one_line_exit_3_keeps_what_was_committed_and_a_rerun_completes(
    tmp_path, monkeypatch, capsys, marker
):
    out = tmp_path / "runs" / "r1"
    spec = _spec(tmp_path, "r1", {"modes": ["none", "profile"], "profile_store": {"uri": None}})
    hits = _disk_full_at(monkeypatch, marker)
    assert main(["run", spec]) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert hits and f"{out}/{marker}" in line and "no space left on the device" in line
    assert not (out / "manifest.json").exists()  # nothing presented as finished
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # nor half-written
    for chunk in (out / "generations").glob("*.parquet"):
        pq.read_table(chunk)  # what was committed reads
    monkeypatch.undo()  # space freed
    assert main(["run", spec]) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------------------------------------ 8: SIGTERM
def test_sigterm_is_handled_like_sigint_exit_143_and_the_run_resumes(tmp_path, capsys):
    store = tmp_path / "store"
    slow = _spec(tmp_path, "n1", {"engine.dry_run_tokens_per_s": 30000})
    before = signal.getsignal(signal.SIGTERM)

    def terminate_after_the_first_chunk():
        deadline = time.time() + 60
        while time.time() < deadline and not list(store.glob("versions/*/*/profiles/chunk-*.parquet")):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_after_the_first_chunk, daemon=True)
    killer.start()
    assert main(["profile", slow]) == 143
    killer.join()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler goes with the command
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    assert not (store / "CURRENT.json").exists()
    assert main(["profile", _spec(tmp_path, "n1")]) == 0  # the same run id resumes
    stats = json.loads(capsys.readouterr().out)
    assert stats["users"] == 20 and stats["chunks_committed_this_run"] < 4


@pytest.mark.slow  # a local Ray started and stopped twice; `make test-slow`
def test_sigterm_during_a_run_on_ray_exits_143_in_one_line_and_the_rerun_completes(tmp_path):
    """On Ray the driver's SIGTERM handler is Ray's (``sys.exit(15)`` and a C-level stack dump) unless the run puts
    the command's back after ``ray.init``."""
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "stepback_ray", "profile"]
    slow = _spec(tmp_path, "n1", {"engine.dry_run_tokens_per_s": 3000, "executor": "ray"})
    proc = subprocess.Popen([*cmd, slow], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if list(store.glob("versions/*/*/profiles/chunk-*.parquet")):
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "*** SIGTERM" not in err
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM)"
    again = subprocess.run([*cmd, _spec(tmp_path, "n1", {"executor": "ray"})], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["users"] == 20


# ---------------------------------------------------------------------- 9: a local run beside a Ray cluster
@pytest.mark.slow  # starts a Ray head (~10 s) and a local Ray beside it
def test_a_local_run_starts_its_own_ray_beside_a_running_cluster(tmp_path):
    """``ray start --head`` on this machine (its own temp folder: RAY_TMPDIR, so no other session's Ray sees it); a
    run without ``ray.address`` starts a local Ray of its own instead of attaching to it."""
    tmp = tempfile.mkdtemp(prefix="sbr", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": tmp}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=1", "--include-dashboard=false"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        address_file = Path(tmp) / "ray" / "ray_current_cluster"
        deadline = time.time() + 90
        while time.time() < deadline and not address_file.exists():
            time.sleep(0.2)
        assert address_file.exists(), "the Ray head did not start"
        probe = (
            "import ray\n"
            "from stepback_ray.config import load_job\n"
            "from stepback_ray.pipeline.on_ray import ray_session\n"
            "job = load_job(None, [], data={'name': 'x', 'task': 'LaMP_5', 'input': {'questions': 'q.json'}})\n"
            "with ray_session(job):\n"
            "    print('gcs', ray.get_runtime_context().gcs_address)\n"
        )
        proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        cluster = address_file.read_text().strip()
        own = next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("gcs "))
        assert own != cluster
    finally:
        _stop_own_ray(head, tmp)


def _stop_own_ray(head: subprocess.Popen, tmp: str) -> None:
    """Stop the Ray head this test started, and only it: its process group, then any process left that names
    its own temp folder."""
    import psutil

    try:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(tmp in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------- 10: an input changed since staging
def test_a_rerun_whose_lamp_input_changed_is_refused_naming_the_file(tmp_path, capsys):
    questions = tmp_path / "q_questions.json"
    shutil.copy(f"{SAMPLE}_questions.json", questions)
    spec = _spec(tmp_path, "r1", {"input.questions": str(questions), "input.outputs": None})
    assert main(["profile", spec]) == 0
    capsys.readouterr()
    before = questions.stat().st_size
    qs = json.loads(questions.read_text())
    extra = [{**q, "id": f"{q['id']}-new", "user_id": f"{q['user_id']}-new"} for q in qs[:2]]
    questions.write_text(json.dumps(qs + extra))  # two new users since the run read its input
    assert main(["profile", spec]) == 2
    line = _one_error_line(capsys.readouterr().err)
    after = questions.stat().st_size
    assert f"input changed since this run staged it: {questions} (size {before} -> {after})" in line
    assert "use a new run_id or output" in line


def test_a_dataset_folder_or_glob_that_changed_since_staging_is_named(tmp_path):
    """The same check on a dataset input (what a rerun compares, without staging it again): a new file in the
    folder, a file rewritten in place with the same size, a glob that matches one file more; a file copied again
    with its first bytes (a new modification time only) is no change."""
    from stepback_ray.config import load_job
    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline.input_identity import check_input
    from stepback_ray.storage import RunStore

    write_items_parquet(tmp_path / "hist" / "part-0.parquet", lamp5_users(4))
    for path in (str(tmp_path / "hist"), str(tmp_path / "hist" / "part-*.parquet")):
        job = load_job(
            None,
            [],
            data={
                "name": "x",
                "task": "LaMP_5",
                "input": {"format": "parquet", "path": path, "layout": "item"},
                "output": str(tmp_path / "runs" / "x"),
            },
        )
        out = RunStore(job.output_uri, job.storage)
        out.remove("_input.json")
        check_input(out, job, resumed=False)  # the first run records it
        check_input(out, job, resumed=True)  # unchanged: the rerun goes on
        new = tmp_path / "hist" / "part-1.parquet"
        write_items_parquet(new, lamp5_users(6)[4:])
        with pytest.raises(StepbackError, match=rf"input changed since this run staged it: {new} \(new file\)"):
            check_input(out, job, resumed=True)
        new.unlink()
    first = tmp_path / "hist" / "part-0.parquet"
    data = first.read_bytes()
    time.sleep(0.01)
    first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the same size, written again
    with pytest.raises(StepbackError, match=rf"{first} \(modified: .*Z -> .*Z\); use a new run_id or output"):
        check_input(out, job, resumed=True)
    time.sleep(0.01)
    first.write_bytes(data)  # the first bytes again, with a new modification time: a re-synced copy
    check_input(out, job, resumed=True)


def test_a_local_file_over_the_digest_size_is_known_by_its_modification_time(tmp_path, monkeypatch):
    from stepback_ray.config import load_job
    from stepback_ray.errors import StepbackError
    from stepback_ray.pipeline import input_identity
    from stepback_ray.storage import RunStore

    monkeypatch.setattr(input_identity, "DIGEST_MAX_BYTES", 16)
    part = tmp_path / "hist" / "part-0.parquet"
    write_items_parquet(part, lamp5_users(2))
    job = load_job(
        None,
        [],
        data={
            "name": "x",
            "task": "LaMP_5",
            "input": {"format": "parquet", "path": str(part), "layout": "item"},
            "output": str(tmp_path / "runs" / "x"),
        },
    )
    out = RunStore(job.output_uri, job.storage)
    input_identity.check_input(out, job, resumed=False)
    assert "sha256" not in out.read_json("_input.json")[str(part)]
    time.sleep(0.01)
    part.write_bytes(part.read_bytes())
    with pytest.raises(StepbackError, match=r"\(modified: "):
        input_identity.check_input(out, job, resumed=True)
