"""Data governance of the profile store: lineage of generation rows, retention of old versions, the quality gate
and ``stepback promote``. The in-process executor and the dry-run engine: no Ray, no model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job

from .conftest import SAMPLE


def _lamp_job(tmp_path, run_id, modes=("profile",), extra=(), store=None):
    data = {"name": "gov", "task": "LaMP_5", "modes": list(modes), "run_id": run_id,
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": str(tmp_path / "runs" / "{run_id}"),
            "profile_store": {"uri": store or str(tmp_path / "store")},
            "ray": {"num_shards": 4, "progress_bars": False}, "executor": "in-process"}
    return load_job(None, ["engine.kind=dry-run", *extra], data=data)


def test_generation_rows_name_the_store_version_and_profile_they_used(tmp_path):
    result = run_job(_lamp_job(tmp_path, "r1", modes=("none", "profile+rag", "random-profile")))
    store = tmp_path / "store"
    current = json.loads((store / "CURRENT.json").read_text())["version"]
    assert result.manifest["profiles"]["version"] == current
    profiles = pd.read_parquet(store / current / "profiles").set_index("user_id")
    rows = pd.read_parquet(tmp_path / "runs" / "r1" / "generations")
    assert len(rows) == 60
    none = rows[rows["mode"] == "none"]
    assert none["profile_version"].isna().all() and none["profile_fingerprint"].isna().all()
    own = rows[rows["mode"] == "profile+rag"]
    assert (own["profile_version"] == current).all()
    assert list(own["profile_fingerprint"]) == list(profiles.loc[own["user_id"], "fingerprint"])
    donor = rows[rows["mode"] == "random-profile"]  # another user's profile: the donor's fingerprint
    assert (donor["profile_version"] == current).all()
    assert set(donor["profile_fingerprint"]) <= set(profiles["fingerprint"])
    assert (donor["profile_fingerprint"].values != profiles.loc[donor["user_id"], "fingerprint"].values).all()


def test_without_a_store_rows_carry_the_fingerprint_and_no_version(tmp_path):
    job = _lamp_job(tmp_path, "r1").model_copy(update={"profile_store": _lamp_job(tmp_path, "x").profile_store
                                                       .model_copy(update={"uri": None})})
    result = run_job(job)
    assert result.manifest["profiles"]["version"] is None
    rows = pd.read_parquet(tmp_path / "runs" / "r1" / "generations")
    profiles = pd.read_parquet(tmp_path / "runs" / "r1" / "profiles").set_index("user_id")
    assert rows["profile_version"].isna().all()
    assert list(rows["profile_fingerprint"]) == list(profiles.loc[rows["user_id"], "fingerprint"])
