"""Bad input that needs the staging pass on a local Ray: a folder of Parquet files whose schemas disagree, with a
README beside them (the fast cases are in tests/unit/test_bad_input.py)."""

from __future__ import annotations

from tests.support import lamp5_users
from tests.unit.test_bad_input import _job, _parquet_bytes, _quarantine, _tree, _user_row


def test_a_folder_of_mixed_parquet_schemas_and_a_readme_stages_without_losing_a_row(ray_local, tmp_path):
    from stepback_ray.data.datasets import stage_dataset

    users = lamp5_users(5)
    _tree(
        tmp_path / "in",
        {
            "a.parquet": _parquet_bytes([_user_row(users[0], 101), _user_row(users[1], 102)]),
            "b.parquet": _parquet_bytes([_user_row(users[2], "u3"), _user_row(users[3], "u4")]),
            "c.parquet": _parquet_bytes([{"user_id": "u5", "history": "[]", "queries": users[4]["queries"]}]),
            "README.md": b"# what these files are\n\nusers, one row each\n",
        },
    )
    counts = stage_dataset(_job(tmp_path, "parquet"), shards=2)
    assert counts == {"rows_in": 5, "rows_staged": 4, "rows_quarantined": 1}
    [bad] = _quarantine(tmp_path)
    assert bad["source"].endswith("in/c.parquet:1") and bad["reason"] == "history: expected a list, got str"
