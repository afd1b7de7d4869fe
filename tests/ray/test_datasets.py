"""Dataset inputs through Ray Data: Parquet and JSON Lines, user and item layouts, bad rows quarantined with their
reasons, a staging killed part way redone; the row checks alone: tests/unit/test_datasets.py."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import load_job
from stepback_ray.errors import StepbackError
from stepback_ray.pipeline import run_job, run_profile_job
from tests.support import lamp5_users, write_items_parquet

DRY = ["engine.kind=dry-run", "ray.progress_bars=false"]


def _job(tmp_path, fmt, path, layout, extra=()):
    data = {
        "name": "ds",
        "task": "LaMP_5",
        "input": {"format": fmt, "path": str(path), "layout": layout},
        "output": str(tmp_path / "out"),
        "run_id": "r1",
        "ray": {"num_shards": 4},
    }
    return load_job(None, [*DRY, *extra], data=data)


def test_parquet_user_layout_quarantines_bad_rows_and_generates(ray_local, tmp_path):
    users = lamp5_users(12)
    bad = [
        {"user_id": "../../etc", "history": users[0]["history"], "queries": []},
        {"user_id": "a/b", "history": [], "queries": []},
        {"user_id": "ok-id", "history": [{"id": "x", "title": "only a title"}], "queries": []},
        {"user_id": "huge", "history": [{"id": "h", "title": "t", "abstract": "x" * 200_001}], "queries": []},
        {"user_id": "", "history": [], "queries": []},
        {"user_id": "zz-other", "history": users[1]["history"], "queries": users[0]["queries"]},  # a taken query id
    ]
    table = pa.Table.from_pylist(users + bad)
    pq.write_table(table, tmp_path / "users.parquet")
    result = run_job(
        _job(
            tmp_path,
            "parquet",
            tmp_path / "users.parquet",
            "user",
            ["modes=[none, profile+rag]", "generation.max_new_tokens=8", "executor=in-process"],
        )
    )  # staged by Ray Data; a dataset's passes on Ray: test_faults
    counts = result.manifest["counts"]
    assert counts["rows_in"] == 18 and counts["rows_staged"] == 12 and counts["rows_quarantined"] == 6
    q = pd.read_parquet(tmp_path / "out" / "quarantine")
    reasons = "\n".join(q["reason"])
    assert "user_id: contains a path separator" in reasons and "history[0].abstract: missing" in reasons
    assert "over the limit" in reasons and "user_id: empty" in reasons
    assert f"queries[0].query_id: duplicate {users[0]['queries'][0]['query_id']!r}" in reasons
    from stepback_ray.evaluation.scoring import score_files

    pred = str(tmp_path / "out" / "predictions" / "none.json")
    assert score_files(pred, pred)["rouge-1"] == 1.0  # the run's own predictions: every id once
    gens = pd.read_parquet(tmp_path / "out" / "generations")
    assert len(gens) == 12 * 2 and gens.groupby(["query_id", "mode"]).size().eq(1).all()
    assert result.metrics["modes"]["none"]["scored"] == 12
    files = [p.relative_to(tmp_path) for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert all(str(p).startswith("out/") for p in files)  # nothing written outside the output prefix


def test_a_staging_killed_part_way_is_redone_not_appended_to(ray_local, tmp_path):
    users = lamp5_users(4)
    pq.write_table(pa.Table.from_pylist(users), tmp_path / "users.parquet")
    job = _job(
        tmp_path, "parquet", tmp_path / "users.parquet", "user", ["generation.max_new_tokens=8", "executor=in-process"]
    )  # staging on Ray
    # what a killed staging leaves: the run's spec (written first), a shard file with a copy of a good row, a
    # quarantine file, no _SUCCESS
    from stepback_ray.pipeline import check_resume
    from stepback_ray.storage import RunStore

    check_resume(RunStore(job.output_uri, job.storage), job)
    left = tmp_path / "out" / "_staged" / "shard=0"
    left.mkdir(parents=True)
    rec = {"user_id": users[0]["user_id"], "history": users[0]["history"], "queries": users[0]["queries"]}
    pq.write_table(
        pa.Table.from_pylist([{"user_id": rec["user_id"], "record": json.dumps(rec)}]), left / "leftover.parquet"
    )
    (tmp_path / "out" / "quarantine").mkdir()
    pq.write_table(
        pa.Table.from_pylist([{"reason": "old", "record": "{}", "source": ""}]),
        tmp_path / "out" / "quarantine" / "part-old.parquet",
    )
    result = run_job(job)
    counts = result.manifest["counts"]
    assert counts["rows_in"] == 4 and counts["rows_staged"] == 4 and counts["rows_quarantined"] == 0
    gens = pd.read_parquet(tmp_path / "out" / "generations")
    assert len(gens) == 4 * len(job.modes) and gens.groupby(["query_id", "mode"]).size().eq(1).all()


@pytest.mark.slow  # three staging passes; `make test-slow`
def test_input_with_no_valid_record_or_no_query_fails_instead_of_an_empty_success(ray_local, tmp_path):
    bad = [{"user_id": "../x", "history": [], "queries": []}, {"user_id": "", "history": [], "queries": []}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(StepbackError, match="no valid records .2 quarantined"):
        run_job(_job(tmp_path, "parquet", tmp_path / "bad.parquet", "user"))
    assert len(pd.read_parquet(tmp_path / "out" / "quarantine")) == 2  # the reasons are kept
    users = [{**u, "queries": []} for u in lamp5_users(3)]
    pq.write_table(pa.Table.from_pylist(users), tmp_path / "noq.parquet")
    with pytest.raises(StepbackError, match="no queries to generate for"):
        run_job(_job(tmp_path / "noq", "parquet", tmp_path / "noq.parquet", "user", ["modes=[none]"]))
    with pytest.raises(StepbackError, match="stepback profile"):  # refused before any work
        run_job(_job(tmp_path, "parquet", tmp_path / "noq.parquet", "item"))


@pytest.mark.slow  # JSON Lines run by default in test_faults
def test_jsonl_item_layout_groups_items_and_quarantines_bad_lines(ray_local, tmp_path):
    users = lamp5_users(6)
    lines = [json.dumps({"user_id": u["user_id"], **it}).encode() for u in users for it in u["history"]]
    lines.insert(3, b'{"user_id": "broken", "title": ')  # bad JSON
    lines.insert(7, b'{"user_id": "x", "title": "caf\xe9", "abstract": "a"}')  # invalid UTF-8
    lines.insert(9, b'{"user_id": 42, "title": ["a list"], "abstract": "a"}')  # wrong type
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "part-0.jsonl").write_bytes(b"\n".join(lines[:20]) + b"\n")
    (tmp_path / "items" / "part-1.jsonl").write_bytes(b"\n".join(lines[20:]) + b"\n")
    result = run_profile_job(_job(tmp_path, "jsonl", tmp_path / "items", "item"))
    counts = result.manifest["counts"]
    n_items = sum(len(u["history"]) for u in users)
    assert counts["rows_in"] == n_items + 3 and counts["rows_quarantined"] == 3
    reasons = sorted(pd.read_parquet(tmp_path / "out" / "quarantine")["reason"])
    assert any(r.startswith("bad JSON") for r in reasons) and any(r.startswith("invalid UTF-8") for r in reasons)
    assert any("expected text, got list" in r for r in reasons)
    profiles = pd.read_parquet(tmp_path / "out" / "profiles")
    assert sorted(profiles["user_id"]) == sorted(u["user_id"] for u in users)
    by_user = profiles.set_index("user_id")["items_total"].to_dict()
    assert by_user == {u["user_id"]: len(u["history"]) for u in users}


@pytest.mark.slow  # the item layout runs by default in test_profile_store
def test_item_layout_parquet_profiles_every_user(ray_local, tmp_path):
    users = lamp5_users(8)
    write_items_parquet(tmp_path / "hist" / "part-0.parquet", users)
    result = run_profile_job(_job(tmp_path, "parquet", tmp_path / "hist", "item"))
    assert result.metrics["profiles"]["users"] == 8
    assert result.metrics["profiles"]["origins"]["new"] == 8
