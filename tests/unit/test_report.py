"""The run report, built from committed files alone: figures, metric intervals and status counts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stepback_ray.config import StorageConfig
from stepback_ray.evaluation.metrics import bootstrap_ci
from stepback_ray.evaluation.report import FIGURES, _intervals, _load, build_report
from stepback_ray.storage import RunStore


def _run_folder(tmp_path, rows_per_file: int = 500, files: int = 4, counted: bool = False):
    """A finished run as the pipeline leaves it: manifest, metrics, generation and profile files. ``counted``:
    the manifest carries the rows per status (as the pipeline writes it) and the files have no status column, so
    a report that counted them again would fail."""
    rng = np.random.default_rng(0)
    modes = ["none", "profile+rag"]
    (tmp_path / "generations").mkdir()
    (tmp_path / "profiles").mkdir()
    scores = {m: [] for m in modes}
    for f in range(files):
        n = rows_per_file
        mode = [modes[i % 2] for i in range(n)]
        score = rng.uniform(0, 1, n)
        status = ["ok"] * n
        status[0] = "error: engine failed: RuntimeError: boom"
        status[1] = "truncated"
        score_col = [None if s.startswith("error") else float(v) for s, v in zip(status, score)]
        for m, v in zip(mode, score_col):
            if v is not None:
                scores[m].append(v)
        cols = {
            "mode": mode,
            "score": pa.array(score_col, pa.float64()),
            "history_items": rng.integers(1, 60, n),
            "status": status,
            "committed_at": 1000.0 + f + np.arange(n) / n,
        }
        if counted:
            del cols["status"]
        pq.write_table(pa.table(cols), tmp_path / "generations" / f"chunk-{f:05d}.parquet")
        pq.write_table(
            pa.table(
                {
                    "committed_at": [900.0 + f],
                    "prompt_tokens": [100],
                    "completion_tokens": [10],
                    "engine_seconds": [0.5],
                }
            ),
            tmp_path / "profiles" / f"chunk-{f:05d}.parquet",
        )
    total = files * rows_per_file
    metrics = {
        "task": "LaMP_5",
        "metric": "rouge",
        "keys": ["rouge-1", "rouge-L"],
        "modes": {
            m: {
                "users": total // 2,
                "queries": total // 2,
                "scored": len(scores[m]),
                "rouge-1": float(np.mean(scores[m])),
                "rouge-L": 0.1,
                "prompt_tokens": 5,
                "completion_tokens": 1,
                "engine_seconds": 1.0,
                "tokens_per_s": 6.0,
                "statuses": {"ok": 1},
            }
            for m in modes
        },
    }
    manifest = {
        "run_id": "r",
        "output": str(tmp_path),
        "counts": {"generation_rows": total, "expected_generation_rows": total},
        "profiles": {"uri": str(tmp_path), "folder": "profiles"},
        "timings": {"total_s": 3.0},
    }
    if counted:
        manifest["counts"]["generation_rows_by_status"] = {"ok": total - 2 * files, "error": files, "truncated": files}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return scores, total


@pytest.mark.parametrize("counted", [False, True], ids=["counted-here", "counted-by-pipeline"])
def test_report_counts_statuses_and_intervals_from_the_committed_files(tmp_path, counted):
    scores, total = _run_folder(tmp_path, counted=counted)
    data = _load(RunStore(str(tmp_path), StorageConfig()))
    assert set(np.unique(data["gens"]["mode"])) == {0, 1}
    assert data["statuses"] == {"ok": total - 8, "error": 4, "truncated": 4}
    assert len(data["gens"]["score"]) == total and data["profiles"]["prompt_tokens"] == 400
    intervals = _intervals(data)
    for mode, vals in scores.items():  # error rows have no score and are left out
        mean, lo, hi = intervals[mode]
        assert mean == pytest.approx(np.mean(vals)) and (lo, hi) == pytest.approx(bootstrap_ci(vals, n_resamples=1000))
    build_report(str(tmp_path))
    page = (tmp_path / "report.html").read_text()
    for fig in FIGURES:
        assert f'src="{fig}"' in page and (tmp_path / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{total} of {total} expected" in page and f"[{intervals['none'][1]:.4f}, " in page


def test_report_of_a_missing_folder_or_one_without_a_run_is_a_one_line_error(tmp_path):
    from tests.support import stepback

    (tmp_path / "empty").mkdir()
    (tmp_path / "profiled").mkdir()
    (tmp_path / "profiled" / "manifest.json").write_text("{}")  # what `stepback profile` leaves: no metrics
    cases = {
        "missing": "no such folder .expected a finished run's output, with manifest.json and metrics.json",
        "empty": "not a finished run: no manifest.json and no metrics.json",
        "profiled": "not a finished run: no metrics.json ",
    }
    for name, pattern in cases.items():
        proc = stepback("report", str(tmp_path / name))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: ")
        import re

        assert re.search(pattern, lines[0]), lines[0]
