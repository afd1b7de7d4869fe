"""A full disk while Ray Data stages a dataset, on a 256 KiB tmpfs: one line and exit 3, not Ray's traceback; what
the staging wrote is gone, so the same command resumes once there is space. Marked ``slow`` (``make test-drills``):
it mounts a file system (root only; skipped elsewhere) and runs a local Ray."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import lamp5_users


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only: skipped where it cannot be mounted), unmounted afterwards."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow  # mounts a tmpfs, stages twice on a local Ray
def test_a_full_disk_while_staging_is_one_line_exit_3_and_a_rerun_resumes(ray_local, tmp_path, tiny_disk, capsys):
    """Ray Data's workers meet the full disk; the driver says so in one line (exit 3), not with Ray's traceback."""
    from stepback_ray.cli import main

    pq.write_table(pa.Table.from_pylist(lamp5_users(60)), tmp_path / "users.parquet")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        json.dumps(
            {
                "name": "ds",
                "task": "LaMP_5",
                "input": {"format": "parquet", "path": str(tmp_path / "users.parquet"), "layout": "user"},
                "output": str(tiny_disk / "out"),
                "run_id": "r1",
                "modes": ["none"],
                "executor": "in-process",
                "engine": {"kind": "dry-run"},
                "ray": {"progress_bars": False},
            }
        )
    )
    assert main(["run", str(spec)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error")]) == 1 and "Traceback" not in "\n".join(err), err
    assert "no space left on the device" in err[-1] and "_staged" in err[-1], err[-1]

    import subprocess

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)  # space freed: the same again
    assert main(["run", str(spec)]) == 0
    gens = pd.read_parquet(tiny_disk / "out" / "generations")
    assert len(gens) == 60 and gens.query_id.is_unique
