"""Dataset inputs: the validation and quarantine of rows (bad rows with their reasons, repeated ids, user ids) on
Arrow tables, staged without Ray; whole jobs over Parquet and JSON Lines through Ray Data:
tests/ray/test_datasets.py."""

from __future__ import annotations

import json
import re

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import load_job
from tests.support import lamp5_users

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


def test_a_user_in_two_rows_is_merged_items_without_ids_keep_their_identity(tmp_path):
    """Items without an id get one from their content (the same in every row and night, none shared by two
    different items); a user exported in two rows is one user with the queries asked once."""
    from stepback_ray.data.datasets import check_record, load_staged
    from stepback_ray.tasks import get_task

    task = get_task("LaMP_5")
    a, b = {"title": "A", "abstract": "first"}, {"title": "B", "abstract": "second"}
    q = [{"query_id": "q1", "input": "Generate a title for: x", "gold": "X"}]
    row1 = check_record({"user_id": "u", "history": [a], "queries": q}, task, "user")
    row2 = check_record({"user_id": "u", "history": [b, a], "queries": q}, task, "user")
    assert row1["history"][0]["id"] == row2["history"][1]["id"] != row2["history"][0]["id"]
    shard = tmp_path / "out" / "_staged" / "shard=0"
    shard.mkdir(parents=True)
    for k, rec in enumerate([row1, row2]):
        pq.write_table(pa.Table.from_pylist([{"user_id": "u", "record": json.dumps(rec)}]), shard / f"p{k}.parquet")
    users, queries = load_staged(_job(tmp_path, "parquet", tmp_path / "in", "user"), "_staged/shard=0")
    assert [len(u.history) for u in users] == [2] and [x.query_id for x in queries] == ["q1"]


def test_a_rating_gold_that_is_not_a_number_is_quarantined_not_scored():
    from stepback_ray.data.records import BadRecord, check_record
    from stepback_ray.tasks import get_task

    rec = {
        "user_id": "u",
        "history": [{"text": "great", "score": "5"}],
        "queries": [{"query_id": "q", "input": "Rate: fine", "gold": "N/A"}],
    }
    with pytest.raises(BadRecord, match=r"queries\[0\].gold: not a number"):
        check_record(rec, get_task("LaMP_3"), "user")
    rec["queries"][0]["gold"] = 4  # a number is a number, text or not
    assert check_record(rec, get_task("LaMP_3"), "user")["queries"][0]["gold"] == "4"


def test_the_same_bad_row_in_two_batches_is_quarantined_twice(tmp_path):
    """Quarantine files are named by a hash of their batch (a retried batch rewrites its own file); two batches
    that each hold the same malformed record must still give two files, or the quarantine undercounts."""
    from stepback_ray.data.datasets import ValidateAndShard, _batch_digest

    stage = ValidateAndShard(_job(tmp_path, "parquet", tmp_path / "in", "user"), shards=4)
    users = lamp5_users(2)
    bad = {"user_id": None, "history": [], "queries": []}
    for u in users:
        stage(pa.Table.from_pylist([bad, {"user_id": u["user_id"], "history": u["history"], "queries": []}]))
    stage(
        pa.Table.from_pylist([bad, {"user_id": users[0]["user_id"], "history": users[0]["history"], "queries": []}])
    )  # a retry of the first batch: same file
    files = sorted((tmp_path / "out" / "quarantine").glob("*.parquet"))
    assert len(files) == 2 and sum(pq.read_metadata(f).num_rows for f in files) == 2
    two = pa.Table.from_pylist([{"user_id": "a"}, {"user_id": "b"}])
    assert _batch_digest(two.slice(0, 1)) != _batch_digest(two.slice(1, 1))  # a slice hashes as what it holds
    assert _batch_digest(two.slice(1, 1)) == _batch_digest(pa.Table.from_pylist([{"user_id": "b"}]))


def _stage_without_ray(job, shards: int, batches: list[pa.Table]) -> None:
    """What the staging pass does, in-process: validate each batch, write the good rows partitioned by shard."""
    import os

    import pyarrow.compute as pc

    from stepback_ray.data.datasets import ValidateAndShard

    stage = ValidateAndShard(job, shards=shards)
    for n, batch in enumerate(batches):
        good = stage(batch)
        for k in sorted(set(good.column("shard").to_pylist())):
            folder = f"{job.output_uri}/_staged/shard={k}"
            os.makedirs(folder, exist_ok=True)
            pq.write_table(
                good.filter(pc.equal(good.column("shard"), k)).drop_columns(["shard"]), f"{folder}/batch-{n}.parquet"
            )


def _jsonl_files(files: dict[str, list[dict]]) -> pa.Table:
    """A batch as the staging pass reads JSON Lines: one row per whole file (bytes and path)."""
    return pa.Table.from_pylist(
        [{"bytes": "\n".join(json.dumps(r) for r in recs).encode(), "path": path} for path, recs in files.items()]
    )


def test_a_repeated_query_id_is_quarantined_the_same_way_whatever_the_shards_and_batches(tmp_path):
    """A query id repeated by another user (another shard) was kept twice, so the run's own predictions failed
    `stepback score` with 'duplicate id'; repeated by the same user (same shard) it was dropped uncounted. Now
    the first row in input order keeps it and every later one is quarantined, counted, with its reason."""
    from stepback_ray.data.datasets import load_staged, quarantine_repeated_queries, staged_chunks
    from stepback_ray.storage import RunStore

    users = lamp5_users(6)
    recs = [{"user_id": u["user_id"], "history": u["history"][:2], "queries": u["queries"]} for u in users]
    taken = users[0]["queries"][0]["query_id"]
    other = {
        "user_id": "someone-else",
        "history": users[1]["history"][:1],
        "queries": [{"query_id": taken, "input": "another question", "gold": "g"}],
    }
    again = dict(recs[2])  # the same user exported twice
    files = {"a.jsonl": [recs[0], other, recs[1]], "b.jsonl": [recs[2], recs[3], recs[4]], "c.jsonl": [recs[5], again]}
    groupings = [
        [["a.jsonl", "b.jsonl", "c.jsonl"]],
        [["c.jsonl"], ["b.jsonl"], ["a.jsonl"]],
        [["b.jsonl", "c.jsonl"], ["a.jsonl"]],
    ]
    for shards in (1, 4, 64):
        for n, grouping in enumerate(groupings):
            root = tmp_path / f"s{shards}-{n}"
            job = _job(root, "jsonl", tmp_path / "in", "user")
            _stage_without_ray(job, shards, [_jsonl_files({f: files[f] for f in group}) for group in grouping])
            assert quarantine_repeated_queries(RunStore(job.output_uri, job.storage)) == 2
            q = pd.read_parquet(root / "out" / "quarantine" / "part-repeated-query-ids.parquet")
            assert sorted(zip(q["source"], q["reason"])) == [
                (
                    "a.jsonl:2",
                    f"queries[0].query_id: duplicate {taken!r}, asked first in the row of user "
                    f"{users[0]['user_id']!r} at a.jsonl:1",
                ),
                (
                    "c.jsonl:2",
                    f"queries[0].query_id: duplicate {users[2]['queries'][0]['query_id']!r}, asked first "
                    f"in the row of user {users[2]['user_id']!r} at b.jsonl:1",
                ),
            ]
            staged = [load_staged(job, c["source"]) for c in staged_chunks(job)]
            asked = sorted(x.query_id for _, qs in staged for x in qs)
            assert asked == sorted(u["queries"][0]["query_id"] for u in users)  # each once
            assert "someone-else" not in {u.user_id for us, _ in staged for u in us}


def test_a_query_id_repeated_within_one_row_is_quarantined():
    from stepback_ray.data.records import BadRecord, check_record
    from stepback_ray.tasks import get_task

    q = {"query_id": "q", "input": "x", "gold": "g"}
    with pytest.raises(BadRecord, match=r"queries\[1\].query_id: duplicate 'q' \(also queries\[0\]\)"):
        check_record({"user_id": "u", "history": [], "queries": [q, dict(q)]}, get_task("LaMP_5"), "user")


def test_among_parquet_rows_the_repeated_query_id_stays_with_the_user_id_that_sorts_first(tmp_path):
    """Parquet rows carry no position here: the rule is the user id (then the record), whatever the batches."""
    from stepback_ray.data.datasets import quarantine_repeated_queries
    from stepback_ray.storage import RunStore

    u = lamp5_users(1)[0]
    mine = {"user_id": "alice", "history": u["history"][:1], "queries": u["queries"]}
    theirs = {"user_id": "bob", "history": u["history"][1:2], "queries": u["queries"]}
    for n, batches in enumerate([[[theirs, mine]], [[theirs], [mine]], [[mine], [theirs]]]):
        job = _job(tmp_path / str(n), "parquet", tmp_path / "in", "user")
        _stage_without_ray(job, 4, [pa.Table.from_pylist(b) for b in batches])
        assert quarantine_repeated_queries(RunStore(job.output_uri, job.storage)) == 1
        q = pd.read_parquet(tmp_path / str(n) / "out" / "quarantine")
        assert list(q["reason"]) == [
            f"queries[0].query_id: duplicate {u['queries'][0]['query_id']!r}, asked first in the row of user 'alice'"
        ]
        assert q["record"][0].startswith('{"user_id": "bob"')  # the record (first 2,000 characters)


@pytest.mark.parametrize(
    "uid, reason",
    [
        ("user\n", "contains a path separator, '..' or a control character"),  # was stripped to 'user'
        ("user\x1f", "contains a path separator, '..' or a control character"),
        ("user\x7f", "contains a path separator, '..' or a control character"),
        (" user", "leading or trailing whitespace"),  # was stripped too: it would become another user's id
        ("a/b", "contains a path separator, '..' or a control character"),
        ("", "empty"),
    ],
)
def test_a_user_id_is_taken_as_written_or_quarantined(uid, reason):
    from stepback_ray.data.records import BadRecord, check_record
    from stepback_ray.tasks import get_task

    with pytest.raises(BadRecord, match=rf"^user_id: {re.escape(reason)}$"):
        check_record({"user_id": uid, "history": [], "queries": []}, get_task("LaMP_5"), "user")
    assert check_record({"user_id": 42, "history": []}, get_task("LaMP_5"), "user")["user_id"] == "42"
