"""Bad input found early (issue #41): one line and exit 2 for what a user can fix, a quarantined row for what a
dataset can carry, nothing lost that was valid. Fast: the readers and validators are called directly; the one
staging test uses the session's local Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import load_job
from tests.support import FIXTURES, REPO, lamp5_users

SURROGATE = "bad \ud800 text"  # json.dumps writes it as the escape "\ud800", as a broken exporter does


def _job(tmp_path, fmt="jsonl", path=None, layout="user", extra=()):
    data = {
        "name": "bad",
        "task": "LaMP_5",
        "input": {"format": fmt, "path": str(path or tmp_path / "in"), "layout": layout},
        "output": str(tmp_path / "out"),
        "run_id": "r1",
        "ray": {"num_shards": 2},
    }
    return load_job(None, ["engine.kind=dry-run", "ray.progress_bars=false", *extra], data=data)


def _quarantine(tmp_path) -> list[dict]:
    folder = tmp_path / "out" / "quarantine"
    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


# ------------------------------------------------------------------------------------------ 1. lone surrogates
def _lamp_with(tmp_path, where: str) -> str:
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    if where == "history":
        qs[1]["profile"][0]["title"] = SURROGATE
    else:
        qs[1]["input"] = SURROGATE
    path = tmp_path / "s_questions.json"
    path.write_text(json.dumps(qs))
    assert "\\ud800" in path.read_text()
    return str(path)


@pytest.mark.parametrize("where, field", [("history", "profile[0].title"), ("input", "input")])
def test_a_lone_surrogate_in_lamp_json_is_one_line_naming_the_query(tmp_path, capsys, where, field):
    """A lone surrogate passed every check and crashed the tokenizer (TypeError: TextEncodeInput...), after the
    profiles were committed when it sat in a query's input; now the read stops, exit 2, naming the query."""
    from stepback_ray.cli import main

    qid = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())[1]["id"]
    path = _lamp_with(tmp_path, where)
    args = ["run", str(REPO / "jobs" / "demo.yaml"), "--set", f"output={tmp_path / 'out'}"]
    args += ["--set", "engine.kind=dry-run", "--set", "executor=in-process"]
    args += ["--set", f"input.questions={path}", "--set", "input.outputs=null"]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert f"record '{qid}': field '{field}': lone surrogate '\\ud800' at character 4" in err[0], err[0]
    assert not (tmp_path / "out").exists()  # stopped before anything was written


def test_a_lone_surrogate_in_a_dataset_row_is_quarantined_and_the_other_rows_staged(tmp_path):
    from stepback_ray.data.datasets import ValidateAndShard

    users = lamp5_users(4)
    users[1]["history"][0]["abstract"] = SURROGATE
    users[2]["queries"][0]["input"] = SURROGATE
    users[3]["history"][0] = {"title\udc80": "a key with a surrogate", **users[3]["history"][0]}
    text = "\n".join(json.dumps(u) for u in users).encode()
    assert text.count(b"\\ud800") == 2
    good = ValidateAndShard(_job(tmp_path), shards=2)(pa.Table.from_pylist([{"bytes": text, "path": "in/a.jsonl"}]))
    assert good.column("user_id").to_pylist() == [users[0]["user_id"]]
    reasons = {r["source"]: r["reason"] for r in _quarantine(tmp_path)}
    assert reasons == {
        "in/a.jsonl:2": "history[0].abstract: lone surrogate '\\ud800' at character 4 (not valid Unicode text)",
        "in/a.jsonl:3": "queries[0].input: lone surrogate '\\ud800' at character 4 (not valid Unicode text)",
        "in/a.jsonl:4": "history[0]: field name 'title\\udc80': lone surrogate '\\udc80' at character 5 "
        "(not valid Unicode text)",
    }


def test_a_lone_surrogate_in_a_lamp_gold_or_question_id_is_one_line_too():
    from stepback_ray.data.lamp import attach_golds, parse_questions
    from stepback_ray.errors import InputError
    from stepback_ray.tasks import get_task

    task = get_task("LaMP_5")
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    queries = parse_questions("q.json", qs, task)
    golds = {"task": "LaMP_5", "golds": [{"id": q.query_id, "output": SURROGATE} for q in queries]}
    with pytest.raises(InputError, match=rf"^o.json: record '{queries[0].query_id}': field 'output': lone surrogate"):
        attach_golds("o.json", golds, task, queries)
    qs[0]["id"] = SURROGATE
    with pytest.raises(InputError, match=r"^q.json: record #0: field 'id': lone surrogate '\\ud800' at character 4"):
        parse_questions("q.json", qs, task)


# ---------------------------------------------------------------------------------------- 7. unknown URI scheme
@pytest.mark.parametrize(
    "args",
    [
        ["report", "s4://bucket/run"],
        ["forget", "--store", "s4://bucket/store", "--user", "u1"],
        ["promote", "--store", "s4://bucket/store", "--version", "r1"],
        ["run", "JOB", "--set", "output=s4://bucket/run"],
        ["run", "JOB", "--set", "profile_store.uri=s4://bucket/store"],
        ["run", "JOB", "--set", "input.questions=s4://bucket/q.json"],
    ],
    ids=["report", "forget", "promote", "output", "store", "input"],
)
def test_an_unknown_uri_scheme_is_one_line_naming_the_supported_ones(tmp_path, capsys, args):
    """`s4://x` was `ValueError: Protocol not known: s4` with a traceback, in every command."""
    from stepback_ray.cli import main

    if args[1] == "JOB":
        job = ["run", str(REPO / "jobs" / "demo.yaml"), "--set", "engine.kind=dry-run", "--set", "executor=in-process"]
        args = [*job, "--set", f"output={tmp_path / 'out'}", *args[2:]]
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert "unknown URI scheme 's4://'" in err[0] and "a local path, file:// or s3://" in err[0], err[0]
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------- 14. no golds
@pytest.mark.filterwarnings("error::UserWarning")  # the report's figures have nothing to plot, and say so quietly
def test_a_run_without_golds_says_not_scored_in_the_table_the_metrics_and_the_report(tmp_path, capsys):
    """A run without golds printed '-' for every score without a word."""
    from stepback_ray.cli import main

    out = tmp_path / "out"
    args = ["run", str(REPO / "jobs" / "demo.yaml"), "--set", "engine.kind=dry-run", "--set", "executor=in-process"]
    args += ["--set", "input.outputs=null", "--set", "limit=2", "--set", f"output={out}"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "not scored: no golds" in captured.out, captured.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["not_scored"] == "no golds"
    assert all(m["scored"] == 0 and m["rouge-1"] is None for m in metrics["modes"].values())
    assert "not scored: no golds" in (out / "report.html").read_text()


def test_answers_stopped_at_the_length_cap_are_said_under_the_table(tmp_path, capsys):
    """Abstracts cut at a 32-token cap (a job spec's generation.max_new_tokens below the task's 192) scored low
    with status ok and not a word; the table now says how many answers of each mode stopped at the cap."""
    from stepback_ray.cli import main

    args = ["run", str(REPO / "jobs" / "demo.yaml"), "--set", "engine.kind=dry-run", "--set", "executor=in-process"]
    args += ["--set", "limit=2", "--set", "modes=[none]"]
    assert main([*args, "--set", f"output={tmp_path / 'short'}"]) == 0
    assert "stopped at" not in capsys.readouterr().out  # answers shorter than the cap
    out = tmp_path / "capped"
    assert main([*args, "--set", "engine.dry_run_output_fraction=1.0", "--set", f"output={out}"]) == 0
    line = "none: 2 of 2 answers stopped at generation.max_new_tokens (32 tokens): they may be cut short"
    assert line in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["modes"]["none"]["at_length_cap"] == 2


def test_a_partly_scored_run_says_how_many_queries_its_scores_cover():
    from stepback_ray.cli import format_table

    mode = {"users": 2, "queries": 4, "scored": 3, "rouge-1": 0.5, "rouge-L": 0.4, "tokens_per_s": 10.0}
    table = format_table({"keys": ["rouge-1", "rouge-L"], "modes": {"none": mode}})
    assert "none: scored on 3 of 4 queries (the others have no gold)" in table
    assert "not scored" not in table


# ---------------------------------------------------------------------------------------- 13. hub id, offline


@pytest.mark.parametrize("how", ["no-dns", "HF_HUB_OFFLINE"])
def test_a_hub_model_id_without_network_fails_at_once_saying_how_to_use_a_local_copy(no_network, monkeypatch, how):
    """It spent 49-51 s in the hub client's retries before its one line, which did not say what to do."""
    import time

    from stepback_ray.config import EngineConfig
    from stepback_ray.engines.formatting import PromptFormatter
    from stepback_ray.errors import StepbackError

    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(StepbackError) as e:
        PromptFormatter(EngineConfig(kind="transformers", model="someorg/some-model"))  # (dry-run: test_plan_sample)
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert msg.startswith("model 'someorg/some-model' is a hub id, but the hub cannot be reached (")
    assert "HF_HUB_OFFLINE is set" in msg if how == "HF_HUB_OFFLINE" else "huggingface.co" in msg
    assert "point engine.model at a local copy (a model folder or a .gguf file)" in msg
    assert "packaged:smollm2-135m-instruct" in msg


def test_a_hub_model_id_in_the_local_hub_cache_loads_from_it_offline(no_network, monkeypatch, tmp_path):
    import huggingface_hub.constants

    from stepback_ray.engines.models import resolve_model

    snapshot = tmp_path / "models--someorg--some-model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--someorg--some-model" / "refs").mkdir()
    (tmp_path / "models--someorg--some-model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model("someorg/some-model") == str(snapshot)
    assert resolve_model(str(snapshot)) == str(snapshot)  # a local folder is never looked up


# ----------------------------------------------------- 4, 11. dataset files: one extension rule, schemas per file
def _parquet_bytes(rows: list[dict], invalid_utf8_in_row: int | None = None) -> bytes:
    table = pa.Table.from_pylist(rows)
    if invalid_utf8_in_row:  # a row whose user_id is not UTF-8, as another writer can leave it
        ids = pa.array([r["user_id"].encode() for r in rows] + [b"bad\xff"], pa.binary())
        table = pa.Table.from_pylist([*rows, {**rows[0], "user_id": "x"}])
        table = table.set_column(0, "user_id", pa.Array.from_buffers(pa.string(), len(ids), ids.buffers()))
        assert invalid_utf8_in_row == table.num_rows
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _user_row(u: dict, uid) -> dict:
    return {"user_id": uid, "history": u["history"], "queries": u["queries"]}


def test_parquet_files_whose_schemas_disagree_are_each_read_as_they_are(tmp_path):
    """An integer user_id in one file and text in another crashed the run before staging (ArrowTypeError: Unable
    to merge); each file is now read with its own schema and its values taken as text (a number as text), and a
    row or file that cannot be used is quarantined with the file's name."""
    from stepback_ray.data.datasets import ValidateAndShard

    users = lamp5_users(6)
    files = {
        "in/ints.parquet": _parquet_bytes([_user_row(users[0], 101), _user_row(users[1], 102)]),
        "in/text.parquet": _parquet_bytes([_user_row(users[2], "u3"), _user_row(users[3], "u4")]),
        "in/history-as-text.parquet": _parquet_bytes(
            [{"user_id": "u5", "history": json.dumps(users[4]["history"]), "queries": users[4]["queries"]}]
        ),
        "in/not-parquet.parquet": b"PAR1 this is not a Parquet file",
        "in/bad-utf8.parquet": _parquet_bytes([{"user_id": "u6", "history": []}], invalid_utf8_in_row=2),
    }
    stage = ValidateAndShard(_job(tmp_path, "parquet"), shards=2)
    good = pa.concat_tables(stage(pa.Table.from_pylist([{"bytes": b, "path": p}])) for p, b in files.items())
    assert sorted(good.column("user_id").to_pylist()) == ["101", "102", "u3", "u4", "u6"]
    assert set(good.column("source").to_pylist()) == {""}  # Parquet rows keep no position (the repeated-id rule)
    bad = sorted((r["source"], r["reason"]) for r in _quarantine(tmp_path))
    assert bad[0] == ("in/bad-utf8.parquet:2", "invalid UTF-8 (invalid start byte)")  # as a JSON Lines line
    assert bad[1] == ("in/history-as-text.parquet:1", "history: expected a list, got str")
    assert bad[2][0] == "in/not-parquet.parquet" and bad[2][1].startswith("not a readable Parquet file (")
    assert len(bad) == 3


def _tree(root, names: dict[str, bytes]) -> None:
    for name, data in names.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def test_a_dataset_folder_is_read_by_extension_the_same_way_for_both_formats(tmp_path):
    """The JSON Lines reader read every file of a folder (a README.md became two quarantined records) while the
    Parquet reader skipped it: one rule now, by extension, hidden names skipped, a named file read as named."""
    from stepback_ray.data.datasets import input_files

    line = json.dumps(_user_row(lamp5_users(1)[0], "u1")).encode()
    _tree(
        tmp_path / "in",
        {
            "a.jsonl": line,
            "b.json": line,
            "c.jsonl.gz": __import__("gzip").compress(line),
            "d.ndjson": line,
            "sub/e.jsonl": line,
            "README.md": b"# about\nthese files\n",
            "f.parquet": _parquet_bytes([{"user_id": "u1"}]),
            ".hidden.jsonl": line,
            "_tmp/g.jsonl": line,
            "notes.txt": b"x",
        },
    )
    root = str(tmp_path / "in")
    names = [p[len(root) + 1 :] for p in input_files(_job(tmp_path, "jsonl", root))]
    assert names == ["a.jsonl", "b.json", "c.jsonl.gz", "d.ndjson", "sub/e.jsonl"]
    assert [p[len(root) + 1 :] for p in input_files(_job(tmp_path, "parquet", root))] == ["f.parquet"]
    # a file named directly, or matched by a glob, is read whatever its name
    assert input_files(_job(tmp_path, "jsonl", f"{root}/notes.txt")) == [f"{root}/notes.txt"]
    assert input_files(_job(tmp_path, "jsonl", f"{root}/*.md")) == [f"{root}/README.md"]


def test_a_dataset_folder_without_data_files_is_one_line(tmp_path):
    from stepback_ray.data.datasets import input_files
    from stepback_ray.errors import InputError

    _tree(tmp_path / "in", {"README.md": b"x", "a.csv": b"x"})
    with pytest.raises(InputError) as e:
        input_files(_job(tmp_path, "parquet"))
    assert str(e.value) == (
        f"input.path {tmp_path / 'in'}: no input files: a folder is read by extension (format parquet: "
        "*.parquet) and holds none (2 other files, e.g. README.md, a.csv)"
    )


# ---------------------------------------------------------------------- 12. a dataset input that does not exist
def test_a_missing_dataset_input_written_in_a_job_file_is_one_line_before_anything_is_created(tmp_path, capsys):
    """It was a Ray traceback (FileNotFoundError) after the run folder was created."""
    from stepback_ray.cli import main

    (tmp_path / "jobs").mkdir()
    spec = tmp_path / "jobs" / "ds.yaml"
    spec.write_text(
        "name: ds\ntask: LaMP_5\ninput: {format: parquet, path: ../data/users}\nmodes: [none]\n"
        f"output: {tmp_path / 'out'}\nengine: {{kind: dry-run}}\nexecutor: in-process\n"
    )
    assert main(["run", str(spec)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        f"error: input.path {tmp_path / 'data' / 'users'}: no such file or folder (written '../data/users' in "
        f"{spec}: a relative path in a job file is read from the job file's folder)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_input_given_with_set_names_the_current_directory(tmp_path, capsys, monkeypatch):
    from stepback_ray.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["profile", str(REPO / "jobs" / "demo.yaml"), "--set", "input={format: jsonl, path: x/*.jsonl}"]
    assert main([*args, "--set", f"output={tmp_path / 'out'}", "--set", "limit=null"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [
        f"error: input.path {tmp_path / 'x' / '*.jsonl'}: no file matches (given as 'x/*.jsonl' with --set: "
        "a relative path on the command line is read from the current directory)"
    ]
    assert not (tmp_path / "out").exists()


def test_the_extension_rule_and_a_missing_input_on_object_storage(s3_bucket, tmp_path):
    import s3fs

    from stepback_ray.data.datasets import input_files
    from stepback_ray.errors import InputError

    endpoint, bucket, storage = s3_bucket
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)
    for name in ("in/a.jsonl", "in/sub/b.jsonl.gz", "in/README.md", "in/_SUCCESS"):
        fs.pipe(f"{bucket}/{name}", b"{}\n")
    extra = [f"storage.{k}={v}" for k, v in storage.items()]
    job = _job(tmp_path, "jsonl", f"s3://{bucket}/in", extra=extra)
    assert input_files(job) == [f"{bucket}/in/a.jsonl", f"{bucket}/in/sub/b.jsonl.gz"]
    with pytest.raises(InputError, match=rf"^input.path s3://{bucket}/nothing: no such file or folder$"):
        input_files(_job(tmp_path, "jsonl", f"s3://{bucket}/nothing", extra=extra))
