"""Fault drills (benchmarks/fault_drills.py) at test size on a local Ray, fast enough for the default suite:
malformed input quarantined, a dead engine restarted. Each drill runs the real pipeline with one kind of fault and
reconciles the committed output with the input: nothing lost, nothing duplicated, every fault accounted for."""

from __future__ import annotations

import json

from benchmarks import fault_drills as drills


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


def test_a_dead_engine_is_restarted_and_its_blocks_retried_with_no_error_rows(ray_local, tmp_path):
    r = drills.drill_engine_fatal(tmp_path, "dead", after=1, users=6)  # 3 chunks: 2 calls a pass (2 blocks share one)
    assert r["faults_injected"] >= 2 and r["engines_that_failed"] == r["faults_injected"], r
    assert r["rows_lost"] == 0 and r["duplicates"] == 0 and r["rows_out"] == r["rows_expected"] == 12
    assert set(r["rows_by_status"]) <= {"ok", "truncated"} and r["profile_errors"] == 0
    assert r["passed"] is True
