"""Reading and inspecting a profile store: ``stepback_ray.read_profiles`` (only the chunk files of the asked users
opened, local and on S3), ``stepback store versions / show / verify``, ``stepback forget --dry-run`` (nothing
written), and the engine kind a version records (``stepback promote`` refuses a dry-run version over a model's).
In process with the dry-run engine: no Ray, no model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stepback_ray.cli import main
from stepback_ray.config import load_job
from stepback_ray.data.rows import shard_of
from stepback_ray.errors import ConfigError, DamagedFile, NotAProfileStore, StepbackError, StorageError, UnknownColumn
from stepback_ray.pipeline import run_job, run_profile_job
from stepback_ray.storage import run_store
from stepback_ray.store.reader import SERVING_COLUMNS, read_profiles
from tests.support import REPO, SAMPLE, free_port

SHARDS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A store with one version (20 users in 4 chunks) and the run that made it (generations of a mode that borrows
    another user's profile: a user's rows are their own and a borrower's), built once; tests that change anything
    work on a copy."""
    base = tmp_path_factory.mktemp("store-reading")
    job = load_job(
        None,
        ["engine.kind=dry-run"],
        data={
            "name": "reading",
            "task": "LaMP_5",
            "modes": ["random-profile"],
            "run_id": "r1",
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": str(base / "runs" / "r1"),
            "profile_store": {"uri": str(base / "store")},
            "ray": {"num_shards": SHARDS, "progress_bars": False},
            "executor": "in-process",
        },
    )
    run_job(job)
    return base


@pytest.fixture
def copy(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "b")
    return tmp_path / "b"


def _current(store: Path) -> str:
    return json.loads((store / "CURRENT.json").read_text())["version"]


def _rows_by_chunk(store: Path) -> dict[str, list[dict]]:
    """The current version's profile rows, by chunk file name, read straight from the files."""
    folder = store / _current(store) / "profiles"
    return {p.name: pq.read_table(p).to_pylist() for p in sorted(folder.glob("chunk-*.parquet"))}


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture
def opened(monkeypatch) -> set[str]:
    """The profile chunk files (by name) that storage is asked for while the test runs: every filesystem a
    ``RunStore`` builds has its reads (``cat_file``, ``cat``, ``open``) counted."""
    seen: set[str] = set()
    real = run_store.filesystem_for

    def counting(uri, storage=None):
        fs, root = real(uri, storage)
        for name in ("cat_file", "cat", "open"):
            method = getattr(fs, name)

            def wrapped(path, *args, _method=method, **kwargs):
                if "/profiles/chunk-" in str(path):
                    seen.add(str(path).rsplit("/", 1)[-1])
                return _method(path, *args, **kwargs)

            monkeypatch.setattr(fs, name, wrapped)
        return fs, root

    monkeypatch.setattr(run_store, "filesystem_for", counting)
    return seen


def _asked(by_chunk: dict[str, list[dict]]) -> tuple[list[str], set[str]]:
    """Two users of one chunk, one of another, and an id nobody has whose shard is a third chunk's: the ids to ask
    for, and the chunk files that can hold them (the three chunks)."""
    names = sorted(by_chunk, key=lambda n: -len(by_chunk[n]))
    a, b, c = names[:3]
    shard_c = int(c[len("chunk-") : -len(".parquet")])
    ghost = next(f"ghost-{i}" for i in range(1000) if shard_of(f"ghost-{i}", SHARDS) == shard_c)
    return [by_chunk[a][0]["user_id"], by_chunk[a][1]["user_id"], by_chunk[b][0]["user_id"], ghost], {a, b, c}


# ------------------------------------------------------------------------------------------------ the reader
def _check_read(uri: str, store: Path, opened: set[str], storage=None) -> None:
    by_chunk = _rows_by_chunk(store)
    ids, chunks = _asked(by_chunk)
    table = read_profiles(uri, ids, storage=storage)
    assert opened == chunks, "only the chunk files of the asked users' shards are opened"
    assert table.column_names == list(SERVING_COLUMNS)
    version = _current(store)
    stored = {r["user_id"]: r for rows in by_chunk.values() for r in rows}
    got = {r["user_id"]: r for r in table.to_pylist()}
    assert set(got) == set(ids[:3]), "an id the store does not hold is simply absent"
    for uid, row in got.items():
        assert row == {**{c: stored[uid][c] for c in SERVING_COLUMNS if c != "version"}, "version": version}

    opened.clear()  # every user: every chunk file, once
    everyone = read_profiles(uri, storage=storage)
    assert everyone.num_rows == len(stored) == 20 and opened == set(by_chunk)
    opened.clear()  # one user, the debugging columns asked for by name
    one = read_profiles(uri, ids[2], columns=["user_id", "prompt", "raw_output", "partials_json"], storage=storage)
    assert one.to_pylist() == [{c: stored[ids[2]][c] for c in one.column_names}] and len(opened) == 1
    opened.clear()  # nobody asked: no file opened, an empty table of the serving columns
    none = read_profiles(uri, [], storage=storage)
    assert none.num_rows == 0 and none.column_names == list(SERVING_COLUMNS) and not opened


def test_read_profiles_opens_only_the_asked_users_chunks_local(built, opened):
    store = built / "store"
    _check_read(str(store), store, opened)


def test_read_profiles_opens_only_the_asked_users_chunks_on_s3(built, s3_bucket, opened, capsys):
    import s3fs

    endpoint, bucket, creds = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=creds["key"], secret=creds["secret"], skip_instance_cache=True)
    store = built / "store"
    for path in store.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{bucket}/store/{path.relative_to(store)}", path.read_bytes())
    uri = f"s3://{bucket}/store"
    _check_read(uri, store, opened, storage=creds)
    # the same through the command line, storage settings by --set
    user = next(iter(_rows_by_chunk(store).values()))[0]["user_id"]
    sets = [x for k, v in creds.items() for x in ("--set", f"storage.{k}={v}")]
    assert main(["store", "show", "--store", uri, "--user", user, *sets]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["user_id"] == user and shown["version"] == _current(store) and isinstance(shown["profile"], dict)


def test_read_profiles_says_in_one_line_what_it_cannot_read(built, copy, tmp_path):
    store = str(built / "store")
    with pytest.raises(UnknownColumn, match=r"no column 'nope' in the profiles \(they have: chunk_id, user_id"):
        read_profiles(store, columns=["user_id", "nope"])
    with pytest.raises(NotAProfileStore, match="not a profile store"):
        read_profiles(str(tmp_path / "nothing-here"))
    (copy / "store" / "CURRENT.json").unlink()  # versions, none current yet
    with pytest.raises(NotAProfileStore, match="has no current version yet"):
        read_profiles(str(copy / "store"))
    with pytest.raises(ConfigError, match="storage.endpoint: Extra inputs"):
        read_profiles(store, storage={"endpoint": "http://127.0.0.1:1"})
    nobody_listens = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "retries": 0, "key": "k", "secret": "s"}
    with pytest.raises(StorageError, match="s3://bucket/store: storage endpoint unreachable"):
        read_profiles("s3://bucket/store", storage=nobody_listens)


def test_import_stepback_ray_stays_light_and_exports_the_reader():
    code = "import sys, stepback_ray\nassert 'pyarrow' not in sys.modules, 'import stepback_ray brought pyarrow'\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    import stepback_ray
    from stepback_ray import read_profiles as exported

    assert exported is read_profiles and "read_profiles" in dir(stepback_ray)
    with pytest.raises(AttributeError):
        stepback_ray.no_such_thing  # noqa: B018


# ------------------------------------------------------------------------------------------------ stepback store
def _fabricate(store: Path, run_id: str, **manifest_changes) -> str:
    """A copy of the current version under another run id, its manifest naming its own files, with changes."""
    old = _current(store)
    new = old.replace("run=r1", f"run={run_id}")
    shutil.copytree(store / old, store / new)
    manifest = json.loads((store / new / "manifest.json").read_text().replace(old, new))
    manifest["finished_at"] = manifest["finished_at"].replace("Z", "1Z")  # just after the original
    for key, value in manifest_changes.items():
        node = manifest
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
    (store / new / "manifest.json").write_text(json.dumps(manifest))
    return new


def test_store_versions_lists_every_state_with_counts_gate_and_engine(copy, capsys):
    store = copy / "store"
    current = _current(store)
    gate = {"passed": False, "checks": [{"check": "min_ok_share", "value": 0.0, "limit": 0.5, "passed": False}]}
    gate["checks"][0]["detail"] = "0 of 20 profiles ok"
    _fabricate(store, "gated", gate=gate)
    _fabricate(store, "older")
    for run_id, base in (("live", current), ("stale", current.replace("run=r1", "run=gone"))):
        folder = store / current.replace("run=r1", f"run={run_id}")
        folder.mkdir()
        (folder / "started.json").write_text(json.dumps({"run_id": run_id, "previous": base}))

    assert main(["store", "versions", "--store", str(store), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    states = {v["run_id"]: v["state"] for v in listing["versions"]}
    assert states == {
        "r1": "current",
        "gated": "failed at the gate",
        "older": "complete",
        "live": "in progress",
        "stale": "abandoned",
    }
    assert listing["current"] == current
    r1 = next(v for v in listing["versions"] if v["run_id"] == "r1")
    assert r1["current"] and r1["users"] == 20 and r1["origins"] == {"new": 20} and r1["engine_kind"] == "dry-run"
    assert sum(r1["statuses"].values()) == 20 and r1["gate"] is None
    gated = next(v for v in listing["versions"] if v["run_id"] == "gated")
    assert gated["gate"] == {"passed": False, "failures": "min_ok_share: 0, needs >= 0.5 (0 of 20 profiles ok)"}

    assert main(["store", "versions", "--store", str(store)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "date", "state", "engine", "model", "users", "origins", "statuses", "gate"]
    line = next(ln for ln in table if " r1 " in f" {ln} ")
    assert line.startswith("*") and "current" in line and "dry-run" in line and "new 20" in line
    assert any("failed at the gate" in ln and ln.rstrip().endswith("failed") for ln in table)
    assert f"current: {current}" in table and "gated: gate failed: min_ok_share: 0" in table[-1]

    assert main(["store", "versions", "--store", str(copy / "nothing")]) == 2
    assert "not a profile store" in _one_error_line(capsys.readouterr().err)


def test_store_show_prints_a_users_profile_and_one_line_for_an_unknown_user(built, capsys):
    store = built / "store"
    row = next(iter(_rows_by_chunk(store).values()))[0]
    assert main(["store", "show", "--store", str(store), "--user", row["user_id"]]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["profile"] == json.loads(row["profile_json"]) and shown["profile_text"] == row["profile_text"]
    assert set(shown) == set(SERVING_COLUMNS) - {"profile_json"} | {"profile"}
    assert main(["store", "show", "--store", str(store), "--user", "nobody"]) == 2
    assert "no user 'nobody' in the current version" in _one_error_line(capsys.readouterr().err)


def test_store_verify_checks_every_file_and_names_the_damaged_ones(copy, capsys):
    store = copy / "store"
    version = _current(store)
    assert main(["store", "verify", "--store", str(store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([ln for ln in out if ln.startswith("ok ")]) == 4 and out[-1] == f"{version}: 4 files, 4 ok, 0 damaged"
    chunk = sorted((store / version / "profiles").glob("chunk-*.parquet"))[1]
    damaged_user = pq.read_table(chunk, columns=["user_id"]).column("user_id")[0].as_py()
    chunk.write_bytes(chunk.read_bytes()[:-1] + b"!")
    assert main(["store", "verify", "--store", str(store), "--version", "r1"]) == 3
    captured = capsys.readouterr()
    assert f"damaged  {version}/profiles/{chunk.name} (its sha256 differs" in captured.out
    assert captured.out.splitlines()[-1] == f"{version}: 4 files, 3 ok, 1 damaged"
    err = _one_error_line(captured.err)
    assert err.endswith(f"1 damaged file(s): {version}/profiles/{chunk.name}")
    # the reader refuses the damaged file rather than serve it
    with pytest.raises(DamagedFile, match="sha256 differs"):
        read_profiles(str(store), [damaged_user])
    (store / version.replace("run=r1", "run=half")).mkdir()
    assert main(["store", "verify", "--store", str(store), "--version", "half"]) == 2
    assert "is not finished (no manifest.json)" in _one_error_line(capsys.readouterr().err)
    assert main(["store", "verify", "--store", str(store), "--version", "nope"]) == 2
    assert "no version nope" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------------------ engine kind
def test_a_version_records_its_engine_and_promote_refuses_a_dry_run_over_a_model(copy, capsys):
    store = copy / "store"
    dry = _current(store)
    pointer = json.loads((store / "CURRENT.json").read_text())
    manifest = json.loads((store / dry / "manifest.json").read_text())
    assert pointer["engine_kind"] == manifest["pointer"]["engine_kind"] == "dry-run"
    # a version a model made (its manifest as a vLLM night writes it)
    model = _fabricate(
        store, "vllm1", **{"pointer.engine_kind": "vllm", "pointer.model": "some/model", "config.engine.kind": "vllm"}
    )
    assert main(["promote", "--store", str(store), "--version", "vllm1"]) == 0
    assert json.loads((store / "CURRENT.json").read_text())["engine_kind"] == "vllm"
    capsys.readouterr()
    live = (store / "CURRENT.json").read_bytes()
    assert main(["promote", "--store", str(store), "--version", "r1"]) == 2
    err = _one_error_line(capsys.readouterr().err)
    assert "made by the dry-run engine" in err and "by the vllm engine (some/model)" in err and "--force" in err
    assert (store / "CURRENT.json").read_bytes() == live
    # a pointer written before kinds were recorded: the current version's manifest says what made it
    old_pointer = json.loads(live)
    del old_pointer["engine_kind"]
    (store / "CURRENT.json").write_text(json.dumps(old_pointer))
    assert main(["promote", "--store", str(store), "--version", "r1"]) == 2
    assert "by the vllm engine" in capsys.readouterr().err
    assert main(["promote", "--store", str(store), "--version", "r1", "--force"]) == 0
    assert _current(store) == dry and model != dry
    capsys.readouterr()
    assert main(["store", "versions", "--store", str(store), "--json"]) == 0
    kinds = {v["run_id"]: v["engine_kind"] for v in json.loads(capsys.readouterr().out)["versions"]}
    assert kinds == {"r1": "dry-run", "vllm1": "vllm"}


# ------------------------------------------------------------------------------------------------ forget --dry-run
def _every_byte(folder: Path) -> dict[str, str]:
    """Every path under ``folder``: a file's sha256, a folder as such (a new empty folder counts as a change)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
        for p in folder.rglob("*")
    }


def test_forget_dry_run_reports_what_would_go_and_writes_nothing(copy, capsys):
    store, run = copy / "store", copy / "runs" / "r1"
    gens = [r for p in sorted((run / "generations").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    user = next(r["user_id"] for r in gens if r["mode"] == "random-profile")
    before = _every_byte(copy)
    assert (
        main(["forget", "--store", str(store), "--user", user, "--user", "nobody", "--runs", str(run), "--dry-run"])
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert _every_byte(copy) == before, "a dry run wrote something"
    assert not (store / "forgotten").exists(), "no deny-list, no audit record"

    def holds(r: dict) -> bool:
        return user in (r["user_id"], *(r.get("user_ids") or []), *(r.get("context_user_ids") or []))

    expected = {}
    for p in sorted(copy.rglob("*.parquet")):
        n = sum(holds(r) for r in pq.read_table(p).to_pylist())
        if n:
            expected[str(p)] = n
    assert record["rows_by_file"] == expected
    assert record["rows_to_remove"]["profiles"] == 1 and record["rows_to_remove"]["generations"] == 2
    assert record["not_found"] == ["nobody"] and record["already_on_deny_list"] == []
    assert (
        set(expected) <= set(record["files_to_rewrite"])
        and str(run / "predictions" / "random-profile.json") in (record["files_to_rewrite"])
    )
    assert record["action"].startswith("forget (dry run")
    # the dry run names exactly what the forget then does
    real = json.loads(json.dumps(record))
    assert main(["forget", "--store", str(store), "--user", user, "--user", "nobody", "--runs", str(run)]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["files_rewritten"] == real["files_to_rewrite"] and done["rows_removed"] == real["rows_to_remove"]
    assert done["rows_by_file"] == real["rows_by_file"]
    # undo, dry: the deny-list stays as it is
    deny = (store / "forgotten" / "deny-list.json").read_bytes()
    assert main(["forget", "--store", str(store), "--user", user, "--undo", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["removed_from_deny_list"] == [user]
    assert (store / "forgotten" / "deny-list.json").read_bytes() == deny


def test_a_dry_run_night_does_not_replace_a_models_profiles(copy):
    """A capacity test on the dry-run engine pointed at a store a model made: its version stays uncommitted (one
    line saying how to serve it anyway) and CURRENT.json keeps the model's version."""
    store = copy / "store"
    _fabricate(store, "vllm1", **{"pointer.engine_kind": "vllm", "pointer.model": "m/x", "config.engine.kind": "vllm"})
    assert main(["promote", "--store", str(store), "--version", "vllm1"]) == 0
    live = (store / "CURRENT.json").read_bytes()
    job = load_job(
        None,
        ["engine.kind=dry-run"],
        data={
            "name": "night",
            "task": "LaMP_5",
            "run_id": "night2",
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": str(copy / "runs" / "night2"),
            "profile_store": {"uri": str(store)},
            "ray": {"num_shards": SHARDS, "progress_bars": False},
            "executor": "in-process",
        },
    )
    with pytest.raises(StepbackError) as e:
        run_profile_job(job)
    line = str(e.value)
    assert "placeholder profiles" in line and "vllm engine (m/x)" in line and "left uncommitted" in line
    assert "--force" in line and "\n" not in line
    assert (store / "CURRENT.json").read_bytes() == live
