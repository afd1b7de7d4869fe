"""The LaMP reader on the real shared sets, on official-shape fixtures, and on bad input."""

from __future__ import annotations

import json

import pytest

from stepback_ray.data import collect_users, lead_groups, read_lamp
from stepback_ray.errors import InputError
from stepback_ray.tasks import TASKS
from tests.support import FIXTURES, shared_set, write_lamp


def test_reads_lamp5_arxiv_dev():
    q, o = shared_set("lamp5_arxiv/dev")
    queries = read_lamp(q, o, TASKS["LaMP_5"])
    assert len(queries) == 1000 and len({x.query_id for x in queries}) == 1000
    first = queries[0]
    assert first.user_id == "Yijiang Li" and first.task == "LaMP_5" and first.user_ids == [first.user_id]
    assert first.input.startswith("Generate a title for the following abstract of a paper:")
    assert first.gold and {"id", "title", "abstract", "date"} <= set(first.history[0])
    assert all(x.gold for x in queries)


def test_reads_lamp4_huffpost_dev_with_long_histories():
    q, o = shared_set("lamp4_huffpost/dev")
    queries = read_lamp(q, o, TASKS["LaMP_4"])
    assert len(queries) == 104
    lengths = sorted(len(x.history) for x in queries)
    assert lengths[-2:] == [535, 862]  # two writers with very long histories (the data README names 535)
    assert all(x.gold for x in queries)


def test_official_shape_without_user_ids():
    queries = read_lamp(str(FIXTURES / "LaMP_5_questions.json"), str(FIXTURES / "LaMP_5_outputs.json"), TASKS["LaMP_5"])
    assert [q.query_id for q in queries] == ["310", "311", "312"]
    assert [q.user_id for q in queries] == ["q:310", "q:311", "q:312"]  # each question is its own user
    assert queries[0].gold == "Sparse Attention for Long-Document Transformers"
    assert queries[2].history == []
    users = collect_users(queries)
    assert [len(u.history) for u in users] == [3, 1, 0]


def test_user_history_is_union_of_query_profiles(tmp_path):
    qs = [
        {"id": "a", "user_id": "u", "input": "x", "profile": [{"id": "1", "title": "t1", "abstract": "a1"}]},
        {
            "id": "b",
            "user_id": "u",
            "input": "y",
            "profile": [{"id": "1", "title": "t1", "abstract": "a1"}, {"id": "2", "title": "t2", "abstract": "a2"}],
        },
    ]
    q, o = write_lamp(tmp_path, "u", qs, "LaMP_5", {"a": "ga", "b": "gb"})
    queries = read_lamp(q, o, TASKS["LaMP_5"])
    users = collect_users(queries)
    assert len(users) == 1 and [it["id"] for it in users[0].history] == ["1", "2"]
    groups = lead_groups(queries)
    assert [[q.query_id for q in g] for g in groups] == [["a", "b"]]
    assert len(lead_groups(queries, limit=1)) == 1


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope_questions.json: file not found"):
        read_lamp(str(tmp_path / "nope_questions.json"), None, TASKS["LaMP_5"])


def test_not_json(tmp_path):
    p = tmp_path / "bad_questions.json"
    p.write_text("{not json")
    with pytest.raises(InputError, match=r"bad_questions.json: not valid JSON: .* line 1 column 2"):
        read_lamp(str(p), None, TASKS["LaMP_5"])


def test_json_that_is_not_lamp_shaped(tmp_path):
    p = tmp_path / "x_questions.json"
    p.write_text(json.dumps({"data": [1, 2, 3]}))
    with pytest.raises(InputError, match=r"expected a JSON list of questions"):
        read_lamp(str(p), None, TASKS["LaMP_5"])
    p.write_text(json.dumps([{"id": "1", "input": "x"}]))
    with pytest.raises(InputError, match=r"x_questions.json: record '1': field 'profile': missing"):
        read_lamp(str(p), None, TASKS["LaMP_5"])
    p.write_text(json.dumps([{"id": "1", "input": 3, "profile": []}]))
    with pytest.raises(InputError, match=r"record '1': field 'input': missing or not text"):
        read_lamp(str(p), None, TASKS["LaMP_5"])


def test_outputs_file_given_as_questions():
    with pytest.raises(InputError, match=r"this is a LaMP outputs file"):
        read_lamp(str(FIXTURES / "LaMP_5_outputs.json"), None, TASKS["LaMP_5"])


def test_question_without_gold(tmp_path):
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    q, o = write_lamp(tmp_path, "g", qs, "LaMP_5", {"310": "a", "311": "b"})
    with pytest.raises(InputError, match=r"g_outputs.json: record '312': field 'id': question has no gold"):
        read_lamp(q, o, TASKS["LaMP_5"])


def test_gold_for_another_task():
    with pytest.raises(InputError, match=r"golds are for task 'LaMP_4' but the job's task is 'LaMP_5'"):
        read_lamp(str(FIXTURES / "LaMP_5_questions.json"), str(FIXTURES / "LaMP_4_outputs.json"), TASKS["LaMP_5"])


def test_a_rating_gold_that_is_not_a_number_fails_at_read_time(tmp_path):
    qs = json.loads((FIXTURES / "LaMP_3_questions.json").read_text())
    golds = {q["id"]: "4" for q in qs}
    golds[qs[-1]["id"]] = "N/A"
    q, o = write_lamp(tmp_path, "r", qs, "LaMP_3", golds)
    with pytest.raises(InputError, match=rf"record '{qs[-1]['id']}': field 'output': not a number: 'N/A'"):
        read_lamp(q, o, TASKS["LaMP_3"])


def test_history_item_missing_a_field_the_task_needs(tmp_path):
    qs = [{"id": "7", "input": "x", "profile": [{"id": "70", "title": "only a title"}]}]
    q, _ = write_lamp(tmp_path, "m", qs, "LaMP_5", None)
    with pytest.raises(InputError, match=r"record '7': field 'profile\[0\].abstract': missing"):
        read_lamp(q, None, TASKS["LaMP_5"])


def test_a_duplicate_gold_id_is_an_error_not_last_wins(tmp_path):
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    o = tmp_path / "d_outputs.json"
    o.write_text(
        json.dumps(
            {
                "task": "LaMP_5",
                "golds": [
                    {"id": "310", "output": "a"},
                    {"id": "311", "output": "b"},
                    {"id": "312", "output": "c"},
                    {"id": "310", "output": "z"},
                ],
            }
        )
    )
    q = tmp_path / "d_questions.json"
    q.write_text(json.dumps(qs))
    with pytest.raises(InputError, match=r"d_outputs.json: record '310': field 'id': duplicate gold id"):
        read_lamp(str(q), str(o), TASKS["LaMP_5"])


@pytest.mark.parametrize(
    "uid, reason",
    [
        ("user\n", "contains a path separator, '..' or a control character"),
        (" user", "leading or trailing whitespace"),
        ("../etc", "contains a path separator, '..' or a control character"),
        ("", "empty"),
        (["a"], "missing or not text"),  # was taken as no user id (the question's own)
    ],
)
def test_lamp_user_ids_follow_the_dataset_rule(tmp_path, uid, reason):
    """One rule for user ids in every reader (stepback_ray.data.rows.user_id_problem)."""
    import re

    item = {"id": "1", "title": "t", "abstract": "a"}
    for n, q in enumerate(
        [
            {"id": "7", "user_id": uid, "input": "x", "profile": [item]},
            {"id": "7", "input": "x", "authors": [{"user_id": uid, "profile": [item]}]},
        ]
    ):
        path, _ = write_lamp(tmp_path, f"u{n}", [q], "LaMP_5", None)
        field = "user_id" if n == 0 else r"authors\[0\].user_id"
        with pytest.raises(InputError, match=rf"record '7': field '{field}': {re.escape(reason)}$"):
            read_lamp(path, None, TASKS["LaMP_5"])
    path, _ = write_lamp(tmp_path, "ok", [{"id": "7", "user_id": 42, "input": "x", "profile": [item]}], "LaMP_5", None)
    assert read_lamp(path, None, TASKS["LaMP_5"])[0].user_id == "42"


def test_bad_input_fails_before_the_tokenizer_loads(tmp_path, monkeypatch):
    """A job whose input is missing, is not LaMP or lacks a gold says so at once: the input is read before the
    model's tokenizer (seconds of imports) is loaded."""
    from stepback_ray.config import load_job
    from stepback_ray.pipeline import job as job_module
    from stepback_ray.pipeline import run_job
    from tests.support import REPO, write_lamp

    def no_tokenizer(*a, **k):
        raise AssertionError("the tokenizer was loaded before the input was read")

    monkeypatch.setattr(job_module, "PromptFormatter", no_tokenizer)
    missing = tmp_path / "missing_questions.json"
    not_lamp = tmp_path / "x_questions.json"
    not_lamp.write_text(json.dumps({"hello": "world"}))
    qs = json.loads((FIXTURES / "LaMP_5_questions.json").read_text())
    q_nogold, o_nogold = write_lamp(tmp_path, "nogold", qs, "LaMP_5", {"310": "a", "312": "c"})
    for q, o, pattern in [
        (missing, None, "missing_questions.json: file not found"),
        (FIXTURES / "LaMP_5_questions.json", tmp_path / "gone_outputs.json", "gone_outputs.json: file not found"),
        (not_lamp, None, "x_questions.json: expected a JSON list"),
        (q_nogold, o_nogold, "record '311': field 'id': question has no gold output"),
    ]:
        job = load_job(
            REPO / "jobs" / "demo.yaml",
            [f"input.questions={q}", f"input.outputs={o}" if o else "input.outputs=null", f"output={tmp_path / 'out'}"],
        )
        with pytest.raises(InputError, match=pattern):
            run_job(job)
    assert not (tmp_path / "out").exists()  # nothing left behind either
