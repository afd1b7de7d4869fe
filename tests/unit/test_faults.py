"""Fault drills (benchmarks/fault_drills.py) at test size that need no Ray: an engine error on one prompt, and the
error budget, on the in-process executor. Each drill runs the real pipeline with one kind of fault and reconciles
the committed output with the input: nothing lost, nothing duplicated, every fault accounted for. On a local Ray:
tests/ray/test_faults.py; the slow drills: tests/drills/."""

from __future__ import annotations

import json

from benchmarks import fault_drills as drills


def test_engine_error_on_one_prompt_flags_only_its_rows(tmp_path):
    r = drills.drill_engine_error(tmp_path, "executor=in-process")  # the stage's error rows; on Ray: the drill
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["rows_expected"] == 40
    assert r["failed_rows_are_the_victims"], r
    assert r["rows_by_status"]["error"] == r["faults_injected"] >= 2
    assert r["passed"] is True
    json.dumps(r)  # the drill's record goes into the script's JSON report as it is


def test_over_the_error_budget_the_run_fails_loud_and_a_rerun_retries_the_failed_rows(tmp_path):
    r = drills.drill_error_budget(tmp_path, 5, "executor=in-process")  # the driver's budget; on Ray: the drill
    assert r["exit_codes"] == [3, 0, 3, 0] and r["manifest_status"] == ["failed", "ok", "failed", "ok"], r
    assert r["store_moved_by_failed_run"] is False  # a failed nightly pass leaves CURRENT.json where it was
    assert r["rows_out"] == r["rows_expected"] == 20 and r["duplicates"] == 0
    assert set(r["rows_by_status"]) <= {"ok", "truncated"} and r["faults_injected"] >= 15
    assert r["passed"] is True
