"""The profile store without Ray: a run that failed after committing its profiles resumes, and of two nights opened
at one version one commits (local and S3). Nightly re-profiling over datasets: tests/ray/test_profile_store.py."""

from __future__ import annotations

import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from tests.support import SAMPLE


def _job(tmp_path, run_id, extra=(), engine=("engine.kind=dry-run",)):
    data = {
        "name": "nightly",
        "task": "LaMP_5",
        "input": {"format": "parquet", "path": str(tmp_path / "hist"), "layout": "item"},
        "output": str(tmp_path / "runs" / "{run_id}"),
        "run_id": run_id,
        "profile_store": {"uri": str(tmp_path / "store"), "full_rebuild_every": 3},
        "ray": {"num_shards": 4, "progress_bars": False},
    }
    return load_job(None, [*engine, *extra], data=data)


def test_a_run_that_failed_after_committing_its_profiles_resumes(tmp_path):
    """A ``run`` with a profile store commits the store version before generating; if generation then fails
    (here: its manifest and one generation chunk are gone, as after a crash), the same command resumes it: the
    committed profiles are reused as they are, only the missing chunk is generated."""
    job = load_job(
        None,
        ["engine.kind=dry-run"],
        data={
            "name": "resume",
            "task": "LaMP_5",
            "modes": ["profile"],
            "run_id": "r1",
            "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
            "output": str(tmp_path / "out"),
            "profile_store": {"uri": str(tmp_path / "store")},
            "ray": {"num_shards": 4, "progress_bars": False},
            "executor": "in-process",
        },
    )
    first = run_job(job)
    gens = sorted((tmp_path / "out" / "generations").glob("chunk-*.parquet"))
    gens[0].unlink()
    (tmp_path / "out" / "manifest.json").unlink()
    again = run_job(job)
    assert again.manifest["resumed"] and again.manifest["chunks_committed_this_run"] == {
        "profiles": 0,
        "generations": 1,
    }
    assert again.metrics["profiles"]["version"] == first.metrics["profiles"]["version"]
    same = ("queries", "rouge-1", "rouge-L", "statuses")
    assert {k: again.metrics["modes"]["profile"][k] for k in same} == {
        k: first.metrics["modes"]["profile"][k] for k in same
    }


def test_two_jobs_from_one_version_commit_one_and_fail_the_other_loud_local_and_s3(tmp_path, s3_bucket):
    """CURRENT.json is a compare-and-swap (no Ray: the store functions directly): of two nights that opened the
    store at the same version, the first commit wins and the second names the version that beat it."""
    from stepback_ray.errors import RunFailed
    from stepback_ray.store.versions import commit_version, open_version

    endpoint, bucket, creds = s3_bucket
    for uri in (str(tmp_path / "store"), f"s3://{bucket}/store"):
        extra = [f"profile_store.uri={uri}", *[f"storage.{k}={v}" for k, v in creds.items()]]
        stats = {"users": 3}
        for base in ("empty", "seeded"):  # If-None-Match (no pointer yet), then If-Match on its ETag
            a, b = (_job(tmp_path, f"{base}-{r}", extra) for r in ("a", "b"))
            va, vb = open_version(a, 4), open_version(b, 4)
            commit_version(va, a, 4, stats)
            with pytest.raises(RunFailed, match=f"another job committed {va.version} \\(run {base}-a\\)"):
                commit_version(vb, b, 4, stats)
            assert open_version(_job(tmp_path, f"{base}-c", extra), 4).previous == va.version, uri
