"""`stepback forget` and a dataset input (staged by Ray Data on a local Ray): forgotten users are left out of a run
and counted. The forget itself, without Ray: tests/unit/test_forget.py."""

from __future__ import annotations

import io

import pyarrow.parquet as pq

from stepback_ray.config import StorageConfig, load_job
from stepback_ray.pipeline import run_profile_job
from stepback_ray.storage import RunStore
from stepback_ray.store.forget import forget
from tests.support import lamp5_users, write_items_parquet


def _parquet(uri: str, storage: dict) -> dict[str, bytes]:
    """Every Parquet file under ``uri`` (relative path -> bytes)."""
    s = RunStore(uri, StorageConfig(**storage))
    root = s.root.rstrip("/") + "/"
    if hasattr(s.fs, "invalidate_cache"):
        s.fs.invalidate_cache()
    return {p[len(root) :]: s.fs.cat_file(p) for p in s.fs.find(s.root) if p.endswith(".parquet")}


def _rows(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).to_pylist()


def test_a_dataset_input_leaves_forgotten_users_out_and_counts_them(ray_local, tmp_path):
    users = lamp5_users(6)
    write_items_parquet(tmp_path / "hist" / "part-0.parquet", users)

    def night(run_id):
        return run_profile_job(
            load_job(
                None,
                ["engine.kind=dry-run", "executor=in-process"],
                data={
                    "name": "nightly",
                    "task": "LaMP_5",
                    "run_id": run_id,
                    "input": {"format": "parquet", "path": str(tmp_path / "hist"), "layout": "item"},
                    "output": str(tmp_path / "runs" / run_id),
                    "profile_store": {"uri": str(tmp_path / "store")},
                    "ray": {"num_shards": 4, "progress_bars": False},
                },
            )
        )

    night("n1")
    gone = users[2]["user_id"]
    forget(str(tmp_path / "store"), [gone])
    second = night("n2")
    assert second.manifest["counts"]["forgotten_users"] == 1
    assert second.manifest["counts"]["forgotten_rows"] == len(users[2]["history"])
    assert second.metrics["profiles"]["users"] == 5
    staged = _parquet(str(tmp_path / "runs" / "n2" / "_staged"), {})
    assert staged and not any(r["user_id"] == gone for d in staged.values() for r in _rows(d))
