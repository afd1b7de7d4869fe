"""`stepback score` on official-format files."""

from __future__ import annotations

import json

import pytest

from stepback_ray.errors import InputError
from stepback_ray.evaluation.scoring import score_files
from tests.support import stepback


def _write(path, task, outputs):
    path.write_text(json.dumps({"task": task, "golds": [{"id": str(i), "output": o} for i, o in enumerate(outputs)]}))
    return str(path)


def test_score_command_prints_official_keys(tmp_path):
    gold = _write(tmp_path / "g.json", "LaMP_3", ["1", "5", "3", "4"])
    pred = _write(tmp_path / "p.json", "LaMP_3", ["1", "2", "oops", "4.5"])
    proc = stepback("score", pred, gold)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pytest.approx({"MAE": 1.375, "RMSE": (13.25 / 4) ** 0.5})
    gold = _write(tmp_path / "g5.json", "LaMP_5", ["the cat lay on the mat"])
    pred = _write(tmp_path / "p5.json", "LaMP_5", ["the cat sat on the mat"])
    assert json.loads(stepback("score", pred, gold).stdout) == pytest.approx({"rouge-1": 5 / 6, "rouge-L": 5 / 6})


def test_lamp2_label_set_is_taken_from_the_golds(tmp_path):
    gold = _write(tmp_path / "g.json", "LaMP_2", ["politics", "sports"])
    pred = _write(tmp_path / "p.json", "LaMP_2", ["politics", "comedy"])
    assert score_files(pred, gold) == pytest.approx({"accuracy": 0.5, "f1": (1 / 15)})  # news categories
    gold = _write(tmp_path / "g2.json", "LaMP_2", ["comedy", "action"])
    assert score_files(pred, gold)["accuracy"] == pytest.approx(0.0)  # movie tags: 'politics' is not one
    assert score_files(pred, gold, task="LaMP_2")["f1"] == pytest.approx(0.0)


def test_mismatched_ids_and_bad_files_are_one_line_errors(tmp_path):
    gold = _write(tmp_path / "g.json", "LaMP_5", ["a", "b"])
    pred = _write(tmp_path / "p.json", "LaMP_5", ["a"])
    with pytest.raises(InputError, match=r"prediction ids do not match the golds \(1 missing, 0 extra"):
        score_files(pred, gold)
    (tmp_path / "bad.json").write_text("[1, 2]")
    proc = stepback("score", str(tmp_path / "bad.json"), gold)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "bad.json" in proc.stderr


def test_task_is_checked_against_the_files_and_the_golds(tmp_path):
    gold = _write(tmp_path / "g.json", "LaMP_5", ["a title", "another title"])
    pred = _write(tmp_path / "p.json", "LaMP_5", ["a title", "another title"])
    for task in ("LaMP_2", "LaMP_3"):  # was {"accuracy": 1.0, "f1": 0.0}, and a traceback
        with pytest.raises(InputError, match=rf"g.json: field 'task': the file is for task 'LaMP_5', not '{task}'"):
            score_files(pred, gold, task=task)
    # files that name no task: the golds themselves must be answers of --task
    for name in ("g", "p"):
        (tmp_path / f"{name}.json").write_text(json.dumps({"golds": [{"id": "0", "output": "a title"}]}))
    with pytest.raises(InputError, match=r"record '0': field 'output': not a LaMP_2 label: 'a title'"):
        score_files(pred, gold, task="LaMP_2")
    with pytest.raises(InputError, match=r"record '0': field 'output': not a number: 'a title'"):
        score_files(pred, gold, task="LaMP_3")
    # the predictions file must not name another task than the golds
    gold = _write(tmp_path / "g3.json", "LaMP_3", ["1", "5"])
    pred = _write(tmp_path / "p4.json", "LaMP_4", ["1", "5"])
    with pytest.raises(InputError, match=r"p4.json: field 'task': the file is for task 'LaMP_4', not 'LaMP_3'"):
        score_files(pred, gold)
    proc = stepback("score", pred, gold)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
