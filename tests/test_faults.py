"""Fault injection: the drills of ``scripts/fault_drills.py`` at test size. Each drill runs the real pipeline
with one kind of fault and reconciles the committed output with the input: nothing lost, nothing duplicated,
every fault accounted for."""

from __future__ import annotations

import json

import pytest

from .conftest import load_script

drills = load_script("fault_drills")


def test_engine_error_on_one_prompt_flags_only_its_rows(tmp_path):
    r = drills.drill_engine_error(tmp_path, "executor=in-process")  # the stage's error rows; on Ray: the drill
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["rows_expected"] == 40
    assert r["failed_rows_are_the_victims"], r
    assert r["rows_by_status"]["error"] == r["faults_injected"] >= 2
    assert r["passed"] is True
    json.dumps(r)  # the drill's record goes into the script's JSON report as it is


def test_malformed_records_are_quarantined_and_the_good_ones_all_come_out(ray_local, tmp_path):
    bad = 10 * len(drills.BAD_KINDS)
    r = drills.drill_malformed_input(tmp_path, good=300, bad=bad)
    assert r["records_in"] == 300 + bad and r["records_staged"] == 300 and r["records_quarantined"] == bad
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == 600 and r["bad_users_in_output"] == 0
    assert r["files_outside_output"] == []
    reasons = " | ".join(r["quarantine_reasons"])
    for expected in (
        "bad JSON",
        "invalid UTF-8",
        "expected text",
        "over the limit",
        "path separator",
        "expected an object",
    ):
        assert expected in reasons, (expected, r["quarantine_reasons"])
    assert sum(r["quarantine_reasons"].values()) == bad
    assert r["passed"] is True
    json.dumps(r)


@pytest.mark.slow  # S3 round trips run by default in test_pipeline
def test_s3_throttling_is_retried_with_backoff(ray_local, tmp_path):
    r = drills.drill_s3_faults(tmp_path, fault_rate=0.1)
    assert r["faults_injected"] > 0
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["manifest_rows"] == 40
    assert r["passed"]


@pytest.mark.slow  # a minute; `make test-slow`
def test_kill_9_of_a_worker_actor_mid_stage_is_restarted_and_retried(ray_local, tmp_path):
    r = drills.drill_worker_kill(tmp_path)
    assert r["faults_injected"] == 1
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["rows_expected"] == 40
    assert r["passed"]


@pytest.mark.slow  # starts and kills a driver process, then reruns it (~100 s)
def test_kill_9_of_the_driver_mid_run_then_rerun_gives_one_row_per_query(tmp_path):
    r = drills.drill_driver_kill(tmp_path)
    assert not r["manifest_before_kill"] and 2 <= r["chunks_committed_before_kill"] < r["generation_chunks"]
    assert r["resumed"] and r["chunks_committed_by_rerun"] == r["generation_chunks"] - r["chunks_committed_before_kill"]
    assert r["rows_out"] == r["rows_expected"] == 20 and r["rows_lost"] == 0 and r["duplicates"] == 0
    assert r["temporary_files_left"] == 0
    assert r["passed"]


def test_a_dead_engine_is_restarted_and_its_blocks_retried_with_no_error_rows(ray_local, tmp_path):
    r = drills.drill_engine_fatal(tmp_path, "dead", after=1, users=6)  # 3 chunks: 2 calls a pass (2 blocks share one)
    assert r["faults_injected"] >= 2 and r["engines_that_failed"] == r["faults_injected"], r
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["rows_expected"] == 12
    assert set(r["rows_by_status"]) <= {"ok", "truncated"} and r["profile_errors"] == 0
    assert r["passed"] is True


@pytest.mark.slow  # three engine lives, each ended at its first call
def test_an_engine_dead_for_good_fails_the_run_with_exit_3_and_writes_no_rows(ray_local, tmp_path):
    r = drills.drill_engine_dead_past_restarts(tmp_path)
    assert r["exit_code"] == 3 and r["manifest_status"] == "failed" and r["generation_files"] == 0, r
    assert r["faults_injected"] == 3  # the first engine and its two restarts
    assert r["passed"] is True


def test_over_the_error_budget_the_run_fails_loud_and_a_rerun_retries_the_failed_rows(tmp_path):
    r = drills.drill_error_budget(tmp_path, 5, "executor=in-process")  # the driver's budget; on Ray: the drill
    assert r["exit_codes"] == [3, 0, 3, 0] and r["manifest_status"] == ["failed", "ok", "failed", "ok"], r
    assert r["store_moved_by_failed_run"] is False  # a failed nightly pass leaves CURRENT.json where it was
    assert r["rows_out"] == r["rows_expected"] == 20 and r["duplicates"] == 0
    assert set(r["rows_by_status"]) <= {"ok", "truncated"} and r["faults_injected"] >= 15
    assert r["passed"] is True


@pytest.mark.slow  # each hang waits out engine.call_timeout_s
def test_a_hung_engine_is_ended_by_the_call_timeout_and_the_run_completes(ray_local, tmp_path):
    r = drills.drill_engine_fatal(tmp_path, "hang")
    assert r["faults_injected"] >= 2 and r["rows_out"] == r["rows_expected"] == 40 and r["duplicates"] == 0, r
    assert r["passed"] is True


@pytest.mark.slow  # a three-node Ray cluster on this machine (its own Ray, not the session's)
def test_losing_the_node_of_the_engine_actor_loses_no_row(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the drill connects to a cluster of its own
    r = drills.drill_node_loss(tmp_path)
    assert r["faults_injected"] == 1 and r["rows_lost"] == 0 and r["duplicates"] == 0, r
    assert r["rows_out"] == r["rows_expected"] == 40 and r["passed"] is True


@pytest.mark.slow  # two drivers, each with its own local Ray
def test_two_drivers_of_one_run_id_leave_every_row_exactly_once(tmp_path):
    r = drills.drill_same_run_twice(tmp_path)
    assert r["exit_codes"] == [0, 0] and r["rows_out"] == r["rows_expected"] == 20 and r["duplicates"] == 0, r
    assert r["passed"] is True
