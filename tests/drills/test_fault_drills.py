"""The slow fault drills (benchmarks/fault_drills.py) at test size, marked ``slow``: ``pytest tests/drills`` or
``make test-drills``. Each drill runs the real pipeline with one kind of fault (a killed worker, driver or node, flaky
S3, a dead or hung engine, two drivers of one run) and reconciles the committed output with the input: nothing lost,
nothing duplicated, every fault accounted for."""

from __future__ import annotations

import pytest

from benchmarks import fault_drills as drills


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


@pytest.mark.slow  # three engine lives, each ended at its first call
def test_an_engine_dead_for_good_fails_the_run_with_exit_3_and_writes_no_rows(ray_local, tmp_path):
    r = drills.drill_engine_dead_past_restarts(tmp_path)
    assert r["exit_code"] == 3 and r["manifest_status"] == "failed" and r["generation_files"] == 0, r
    assert r["faults_injected"] == 3  # the first engine and its two restarts
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
