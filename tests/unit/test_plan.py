"""`stepback plan` through the command line (no model loaded, no Ray)."""

from __future__ import annotations

import json

from tests.support import stepback

# A plan against a real run of the same job: tests/ray/test_pipeline.py (the end-to-end test).


def test_plan_command_prints_json():  # a LaMP job is planned in process: seconds, no Ray
    proc = stepback(
        "plan", "jobs/demo.yaml", "--set", "limit=2", "--set", "engine.kind=dry-run", "--tokens-per-s", "500"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["users"] == 2 and out["tokens_per_s"] == 500 and out["gpu_hours"] > 0
