"""`stepback plan --sample/--users/--changed`: a sample of users drawn by id hash, read without staging, planned in
process and scaled to the input; the incremental-night estimate; the flags' bad values (no Ray here)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import load_job
from tests.support import REPO, lamp5_users


def _users(n: int) -> list[dict]:
    """``n`` users with real LaMP-5 items (abstracts cut to 400 characters: fewer tokens to count), each a part of
    one of the 20 sample users' histories, under ``n`` ids (u00000, ...)."""
    real = lamp5_users(20)
    return [
        {
            "user_id": f"u{i:05d}",
            "history": [
                {**it, "abstract": it["abstract"][:400]}
                for it in real[i % 20]["history"][: 1 + (i * 7) % len(real[i % 20]["history"])]
            ],
            "queries": [{"query_id": f"q{i:05d}", "input": real[i % 20]["queries"][0]["input"], "gold": "t"}],
        }
        for i in range(n)
    ]


def _write_parquet(folder, users: list[dict], files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        pq.write_table(pa.Table.from_pylist(users[f::files]), folder / f"part-{f}.parquet", row_group_size=50)


def _job(tmp_path, path, fmt="parquet", layout="user", *more):
    return load_job(
        REPO / "jobs" / "demo.yaml",
        [
            f"input={json.dumps({'format': fmt, 'path': str(path), 'layout': layout})}",
            f"output={tmp_path / 'never'}",
            "limit=null",
            "engine.kind=dry-run",
            *more,
        ],
    )


def test_the_sample_is_the_users_with_the_smallest_id_hashes_whatever_the_files(tmp_path):
    """Drawn by who the users are: the same users from 1 file or 3 (in another order), from Parquet or JSON Lines,
    and a smaller sample is part of a larger one. Parquet rows are counted from the file metadata; only the drawn
    users' rows are read whole and grouped as a staged shard is."""
    from stepback_ray.data.rows import user_hash
    from stepback_ray.data.sample import sample_dataset

    users = _users(300)
    _write_parquet(tmp_path / "one", users, 1)
    _write_parquet(tmp_path / "three", users[::-1], 3)
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "a.jsonl").write_text("".join(json.dumps(u) + "\n" for u in users))
    expect = sorted((u["user_id"] for u in users), key=user_hash)[:40]
    for folder, fmt in (("one", "parquet"), ("three", "parquet"), ("lines", "jsonl")):
        s = sample_dataset(_job(tmp_path, tmp_path / folder, fmt), 40)
        assert s.drawn == expect, folder
        assert (s.input_rows, s.input_users, s.refused_rows) == (300, 300, 0)
        assert s.rows_from == ("parquet metadata" if fmt == "parquet" else "lines read")
        by_id = {u["user_id"]: u for u in users}
        assert [u.user_id for u in s.users] == sorted(expect)
        assert all(len(u.history) == len(by_id[u.user_id]["history"]) for u in s.users)
        assert sorted(q.query_id for q in s.queries) == sorted(by_id[u]["queries"][0]["query_id"] for u in expect)
    assert sample_dataset(_job(tmp_path, tmp_path / "three"), 10).drawn == expect[:10]


def test_an_item_dataset_is_sampled_by_user_with_every_item_of_the_drawn_users(tmp_path):
    """One row per history item: rows come from the metadata, users are the distinct ids, and a drawn user's items
    are all read, wherever they lie (here: spread over two files); a row staging would quarantine is counted."""
    from stepback_ray.data.sample import sample_dataset

    users = _users(60)
    rows = [{"user_id": u["user_id"], **it} for u in users for it in u["history"]]
    rows.append({"user_id": users[0]["user_id"], "id": "bad", "title": "no abstract"})  # refused: no abstract
    (tmp_path / "items").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[::2]), tmp_path / "items" / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1::2]), tmp_path / "items" / "b.parquet")
    s = sample_dataset(_job(tmp_path, tmp_path / "items", "parquet", "item"), 60)
    assert (s.input_rows, s.input_users) == (len(rows), 60)
    assert sum(len(u.history) for u in s.users) == len(rows) - 1 and s.refused_rows == 1
    assert s.queries == []


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--sample", "0"), ("--sample", "-5"), ("--sample", "x"), ("--users", "0"), ("--changed", "0")]
    + [("--changed", "1.5"), ("--changed", "-0.1"), ("--changed", "nan")],
)
def test_plan_flags_refuse_bad_values_before_any_work(flag, value, capsys):
    from stepback_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", str(REPO / "jobs" / "demo.yaml"), flag, value])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("stepback plan: error:") and flag in last


def test_the_incremental_night_reads_the_share_from_the_stores_last_incremental_night(tmp_path):
    """The current version a full rebuild: the night before it, incremental, says how many users a night redoes."""
    from stepback_ray.pipeline.estimate import _store_changed_share

    store = tmp_path / "store"
    nights = {
        "versions/date=2026-12-01/run=a": {"full_rebuild": False, "users": 200, "previous": None},
        "versions/date=2026-12-02/run=b": {
            "full_rebuild": False,
            "users": 200,
            "previous": "versions/date=2026-12-01/run=a",
        },
        "versions/date=2026-12-03/run=c": {
            "full_rebuild": True,
            "users": 200,
            "previous": "versions/date=2026-12-02/run=b",
        },
    }
    origins = {"new": 4, "recomputed": 6, "incremental": 10, "carried": 180}
    for version, manifest in nights.items():
        (store / version).mkdir(parents=True)
        (store / version / "manifest.json").write_text(json.dumps({**manifest, "origins": origins}))
    pointer = {"version": "versions/date=2026-12-03/run=c", "num_shards": 4}
    (store / "CURRENT.json").write_text(json.dumps(pointer))
    job = _job(tmp_path, tmp_path, "parquet", "user", f"profile_store.uri={store}")
    share, source = _store_changed_share(job)
    assert share == 0.1 and source.endswith("versions/date=2026-12-02/run=b")
    (store / "CURRENT.json").write_text(json.dumps({**pointer, "version": "versions/date=2026-12-01/run=a"}))
    assert _store_changed_share(job)[0] == 0.1
    (store / "versions/date=2026-12-02/run=b/manifest.json").unlink()  # gone with retention: nothing older is read
    (store / "CURRENT.json").write_text(json.dumps(pointer))
    share, why = _store_changed_share(job)
    assert share is None and "no incremental night yet" in why and "--changed" in why
    assert _store_changed_share(_job(tmp_path, tmp_path))[0] is None  # no store, no --changed: said so


def test_profile_only_is_one_flag_on_plan_and_submit(monkeypatch, capsys):
    """`stepback submit --profile-only` submits `stepback profile`, as `stepback plan --profile-only` plans it; the
    old `--command` is gone (one line, exit 2)."""
    from stepback_ray.cli import main
    from stepback_ray.pipeline import submit

    seen = []
    monkeypatch.setattr(submit, "submit_job", lambda *a, **kw: seen.append(kw["command"]) or 0)
    base = ["submit", str(REPO / "jobs" / "nightly_profile.yaml"), "--address", "http://127.0.0.1:1"]
    assert main([*base, "--profile-only"]) == 0 and main(base) == 0
    assert seen == ["profile", "run"]
    with pytest.raises(SystemExit) as e:
        main([*base, "--command", "profile"])
    assert e.value.code == 2 and "unrecognized arguments: --command" in capsys.readouterr().err


def test_a_sample_plan_scales_to_within_its_margin_of_planning_every_user(tmp_path):
    """Profile pass (`stepback plan --profile-only`), 240 users: a sample of 40 scaled up lands within 10 % of the
    plan of all 240 (the same dry run over every user: its margin is 0), and within its own 95 % margin; both say
    how many users they planned and stand for; `--changed` gives the incremental night."""
    from stepback_ray.pipeline.estimate import estimate_job

    _write_parquet(tmp_path / "in", _users(240), 2)
    job = _job(tmp_path, tmp_path / "in")
    every = estimate_job(job, 1000.0, profile_only=True, sample=240)
    part = estimate_job(job, 1000.0, profile_only=True, sample=40, changed=0.1)
    assert every["sample"]["users"] == 240 and every["plus_minus"]["tokens"] == 0 and every["users"] == 240
    assert (
        part["sample"]["users"] == 40
        and part["users"] == 240
        and part["input"]["rows_counted_from"] == ("parquet metadata")
    )
    full = every["prompt_tokens"] + every["expected_output_tokens"]
    scaled = part["prompt_tokens"] + part["expected_output_tokens"]
    assert abs(scaled - full) <= 0.10 * full and abs(scaled - full) <= part["plus_minus"]["tokens"]
    assert part["passes"]["profile"]["users"] == 240 and part["full_rebuild"]["users_profiled"] == 240
    night = part["incremental_night"]
    assert night["changed_share"] == 0.1 and night["users_profiled"] == 24
    assert night["prompt_tokens"] == round(part["passes"]["profile"]["prompt_tokens"] * 0.1)
    assert every["incremental_night"]["changed_share"] is None and "--changed" in every["incremental_night"]["why"]


def test_a_plan_of_a_hub_model_offline_fails_at_once_saying_to_set_engine_tokenizer(no_network, capsys):
    """jobs/nightly_profile.yaml names a hub id: offline, `stepback plan` says in one line, before any input is
    read, that a plan needs only a tokenizer; with `engine.tokenizer` it needs no hub at all (the real engine's
    tokenizer stays the model's: that key is for the dry run only)."""
    import time

    from stepback_ray.cli import main
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines.formatting import PromptFormatter
    from stepback_ray.errors import StepbackError

    t0 = time.time()
    assert main(["plan", str(REPO / "jobs" / "nightly_profile.yaml"), "--profile-only", "--sample", "5"]) == 2
    assert time.time() - t0 < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: engine.model 'Qwen/Qwen2.5-1.5B-Instruct' is a hub id")
    assert "huggingface.co" in err[0] and "set engine.tokenizer to a local one of the same vocabulary" in err[0]
    local = "packaged:smollm2-135m-instruct"
    tools = PromptFormatter(EngineConfig(kind="dry-run", model="Qwen/Qwen2.5-1.5B-Instruct", tokenizer=local))
    assert tools.count_tokens("step-back profiling") == PromptFormatter(EngineConfig(model=local)).count_tokens(
        "step-back profiling"
    )
    with pytest.raises(StepbackError, match="'Qwen/Qwen2.5-1.5B-Instruct' is a hub id"):  # a real engine: the model's
        PromptFormatter(EngineConfig(kind="vllm", model="Qwen/Qwen2.5-1.5B-Instruct", tokenizer=local))


def test_a_lamp_job_is_sampled_by_lead_user_and_scaled_to_its_counted_users_or_to_users():
    """LaMP JSON is read whole (counted exactly: 20 lead users) and the drawn lead users' queries planned, profiles
    and generation alike; `--users` scales the plan to that many users instead."""
    from stepback_ray.pipeline.estimate import estimate_job

    job = load_job(REPO / "jobs" / "demo.yaml", ["engine.kind=dry-run", "output=/nonexistent/never"])
    plan = estimate_job(job, 500.0, sample=4, users=10_000_000)
    assert plan["sample"]["users"] == 4 and plan["sample"]["planned"]["queries"] == 4
    assert plan["input"]["lead_users"] == 20 and plan["input"]["users_counted_from"].startswith("the LaMP JSON")
    assert plan["users"] == 10_000_000 and plan["users_from"] == "--users" and plan["queries"] == 10_000_000
    assert set(plan["passes"]) == {"profile", "generate:none", "generate:profile+rag"}
    planned = plan["sample"]["planned"]["passes"]
    assert planned["generate:none"]["llm_calls"] == 4 and plan["passes"]["generate:none"]["llm_calls"] == 10_000_000
    for name, scaled in plan["passes"].items():
        assert scaled["prompt_tokens"] == round(planned[name]["prompt_tokens"] * 2_500_000), name
    assert plan["passes"]["profile"]["users"] == 10_000_000 and plan["plus_minus"]["tokens"] > 0
    assert plan["incremental_night"]["changed_share"] is None
