"""Data governance of the profile store: lineage of generation rows, retention of old versions, the quality gate
and ``stepback promote``. The in-process executor and the dry-run engine: no Ray, no model."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stepback_ray.config import load_job
from stepback_ray.pipeline import run_job
from tests.support import SAMPLE


def _lamp_job(tmp_path, run_id, modes=("profile",), extra=(), store=None):
    data = {
        "name": "gov",
        "task": "LaMP_5",
        "modes": list(modes),
        "run_id": run_id,
        "input": {"questions": f"{SAMPLE}_questions.json", "outputs": f"{SAMPLE}_outputs.json"},
        "output": str(tmp_path / "runs" / "{run_id}"),
        "profile_store": {"uri": store or str(tmp_path / "store")},
        "ray": {"num_shards": 4, "progress_bars": False},
        "executor": "in-process",
    }
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
    job = _lamp_job(tmp_path, "r1").model_copy(
        update={"profile_store": _lamp_job(tmp_path, "x").profile_store.model_copy(update={"uri": None})}
    )
    result = run_job(job)
    assert result.manifest["profiles"]["version"] is None
    rows = pd.read_parquet(tmp_path / "runs" / "r1" / "generations")
    profiles = pd.read_parquet(tmp_path / "runs" / "r1" / "profiles").set_index("user_id")
    assert rows["profile_version"].isna().all()
    assert list(rows["profile_fingerprint"]) == list(profiles.loc[rows["user_id"], "fingerprint"])


# ------------------------------------------------------------------------------------------------ retention
def _store_job(tmp_path, run_id, uri, creds=(), keep=2):
    data = {
        "name": "nightly",
        "task": "LaMP_5",
        "input": {"format": "parquet", "path": str(tmp_path / "hist"), "layout": "item"},
        "output": str(tmp_path / "runs" / run_id),
        "run_id": run_id,
        "profile_store": {"uri": uri, "keep_versions": keep},
        "ray": {"num_shards": 4, "progress_bars": False},
    }
    return load_job(None, [f"storage.{k}={v}" for k, v in creds], data=data)


def test_retention_keeps_the_newest_versions_the_current_one_and_what_runs_build_on_local_and_s3(tmp_path, s3_bucket):
    """No pipeline: the store functions directly, with a profile file per version to see what is deleted."""
    import pyarrow as pa

    from stepback_ray.storage import RunStore
    from stepback_ray.store.layout import list_versions
    from stepback_ray.store.promote import promote
    from stepback_ray.store.retention import apply_retention
    from stepback_ray.store.versions import commit_version, open_version

    _, bucket, creds = s3_bucket
    for uri in (str(tmp_path / "store"), f"s3://{bucket}/store"):

        def night(run_id, keep=2, uri=uri):
            job = _store_job(tmp_path, run_id, uri, creds.items(), keep)
            sv = open_version(job, 4)
            sv.root.write_table(f"{sv.profiles_dir}/chunk-0.parquet", pa.table({"user_id": ["u"]}))
            return sv, commit_version(sv, job, 4, {"users": 1, "files": [f"{sv.profiles_dir}/chunk-0.parquet"]})

        v = {}
        for n in ("n1", "n2", "n3"):
            sv, report = night(n)
            v[n] = sv.version
        root = RunStore(uri, _store_job(tmp_path, "x", uri, creds.items()).storage)
        assert report["deleted"] == [v["n1"]] and set(list_versions(root)) == {v["n2"], v["n3"]}, uri
        # a run in progress on n3 (started.json, no manifest), and one abandoned on n2 (the store moved on)
        running = open_version(_store_job(tmp_path, "running", uri, creds.items()), 4).version
        abandoned = v["n2"].replace("run=n2", "run=stale")
        root.write_json(f"{abandoned}/started.json", {"run_id": "stale", "previous": v["n2"]})
        sv, report = night("n4")
        v["n4"] = sv.version
        # newest 2 (n4, n3); n2 stays as the base of the abandoned run; both unfinished folders stay
        assert report["deleted"] == [] and report["kept_as_base"] == [v["n2"]], uri
        assert report["abandoned"] == sorted([abandoned, running]) and report["in_progress"] == [], uri
        assert set(list_versions(root)) == {v["n2"], v["n3"], v["n4"], running, abandoned}, uri
        root.remove(abandoned)
        sv, report = night("n5")
        v["n5"] = sv.version
        assert set(report["deleted"]) == {v["n2"]}, uri  # n3 stays: the (now abandoned) run builds on it
        assert set(list_versions(root)) == {v["n3"], v["n4"], v["n5"], running}, uri
        # rolled back to n4 by promote: with keep 1 the current version stays although n5 is newer
        assert promote(uri, "n4", root.storage)[:2] == (v["n5"], v["n4"])
        report = apply_retention(root, 1)
        assert report["deleted"] == [] and report["newest"] == [v["n5"]], uri
        root.remove(running)
        report = apply_retention(root, 1)
        assert set(report["deleted"]) == {v["n3"]} and set(list_versions(root)) == {v["n4"], v["n5"]}, uri
        assert root.exists(f"{v['n4']}/profiles/chunk-0.parquet") and not root.exists(f"{v['n3']}/started.json")


# ------------------------------------------------------------------------------------------ gate and promote
def _write_spec(tmp_path, run_id, extra=None):
    import yaml

    data = {
        "name": "gov",
        "task": "LaMP_5",
        "run_id": run_id,
        "input": {"questions": f"{SAMPLE}_questions.json"},
        "output": str(tmp_path / "runs" / "{run_id}"),
        "engine": {"kind": "dry-run"},
        "profile_store": {"uri": str(tmp_path / "store")},
        "ray": {"num_shards": 4, "progress_bars": False},
        "executor": "in-process",
    }
    for key, value in (extra or {}).items():
        node = data
        *path, last = key.split(".")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    spec = tmp_path / f"{run_id}.yaml"
    spec.write_text(yaml.safe_dump(data))
    return str(spec)


def test_a_failing_gate_keeps_the_live_version_exits_non_zero_and_promote_serves_it(tmp_path, capsys):
    from stepback_ray.cli import main

    store = tmp_path / "store"
    assert main(["profile", _write_spec(tmp_path, "n1")]) == 0
    live = (store / "CURRENT.json").read_bytes()
    n1 = json.loads(live)["version"]
    capsys.readouterr()
    # same histories, other settings: every profile text changes (exemplars are listed in it)
    gated = {
        "profile.exemplars": 2,
        "profile_store.gate.max_changed_without_history_change": 0.5,
        "profile_store.gate.min_ok_share": 0.5,
    }
    assert main(["profile", _write_spec(tmp_path, "n2", gated)]) == 4
    err = capsys.readouterr().err
    assert "quality gate refused" in err and f"CURRENT.json stays on {n1}" in err
    assert "max_changed_without_history_change: 1, needs <= 0.5 (20 of 20 users" in err
    assert "min_ok_share: 0, needs >= 0.5 (0 of 20 profiles ok)" in err  # the dry-run's profiles are partial
    assert (store / "CURRENT.json").read_bytes() == live
    n2 = n1.replace("run=n1", "run=n2")
    manifest = json.loads((store / n2 / "manifest.json").read_text())  # kept, with the gate's figures
    assert manifest["gate"]["passed"] is False and [c["value"] for c in manifest["gate"]["checks"]] == [0.0, 1.0]
    run_manifest = json.loads((tmp_path / "runs" / "n2" / "manifest.json").read_text())
    assert run_manifest["status"] == "failed" and "quality gate refused" in run_manifest["error"]
    # the refused night's report: why it failed, the gate's checks, what it measured, users not ok by name
    report = (tmp_path / "runs" / "n2" / "report.html").read_text()
    assert "The run failed: " in report and 'Quality gate: <span class="failed">failed' in report
    assert "<td>min_ok_share</td><td>0.0</td><td>0.5</td><td>False</td><td>0 of 20 profiles ok</td>" in report
    assert "carried: 0, incremental: 0, new: 0, recomputed: 20" in report and "top-1 " in report
    assert "Profiles not ok (20; the first 5)" in report and report.count("<td>partial</td>") == 5
    # the same night again: refused again, nothing moves
    assert main(["profile", _write_spec(tmp_path, "n2", gated)]) == 4
    assert (store / "CURRENT.json").read_bytes() == live
    capsys.readouterr()
    # promote: an unknown version and an unfinished one are refused in one line; a finished one moves the pointer
    assert main(["promote", "--store", str(store), "--version", "nope"]) == 2
    assert "no version nope in the store" in capsys.readouterr().err
    (store / n1.replace("run=n1", "run=half")).mkdir()
    assert main(["promote", "--store", str(store), "--version", "half"]) == 2
    assert "is incomplete (no manifest.json" in capsys.readouterr().err
    assert (store / "CURRENT.json").read_bytes() == live
    assert main(["promote", "--store", str(store), "--version", n2]) == 0
    out = capsys.readouterr().out
    assert f"CURRENT.json moved from {n1} to {n2}" in out and "promoted anyway" in out
    current = json.loads((store / "CURRENT.json").read_text())
    assert current["version"] == n2 and current["promoted_from"] == n1 and current["users"] == 20
    assert main(["promote", "--store", str(store), "--version", "n1"]) == 0  # and back, by run id
    assert f"moved from {n2} to {n1}" in capsys.readouterr().out
    # once another night has committed on top, the refused night is not resumed (nor its profiles served)
    assert main(["profile", _write_spec(tmp_path, "n3")]) == 0
    err = capsys.readouterr().err
    report = tmp_path / "runs" / "n3" / "report.html"
    assert "profile pass: 4/4 chunks, 20 users, " in err and f"report: {report} (total " in err
    page = report.read_text()
    assert "carried: 20, incremental: 0, new: 0, recomputed: 0" in page and "<p>none configured" in page
    assert "<td>profile pass</td>" in page and "<td>profile engines started</td><td>1</td>" in page
    report.unlink()
    assert main(["report", str(tmp_path / "runs" / "n3")]) == 0 and report.read_text() == page  # rebuilt alike
    capsys.readouterr()
    assert main(["profile", _write_spec(tmp_path, "n2", gated)]) == 2
    assert "was refused by the quality gate and the store has moved on" in capsys.readouterr().err


def test_a_passing_gate_commits_normally(tmp_path):
    from stepback_ray.pipeline import run_profile_job

    run_profile_job(load_job(_write_spec(tmp_path, "n1"), []))
    gated = {
        "profile_store.gate.max_changed_without_history_change": 0.0,
        "profile_store.gate.min_identifiability_top1": 0.05,
        "profile_store.gate.min_ok_share": 0.0,
    }
    stats = run_profile_job(load_job(_write_spec(tmp_path, "n2", gated), [])).metrics["profiles"]
    assert stats["origins"]["carried"] == 20
    assert json.loads((tmp_path / "store" / "CURRENT.json").read_text())["version"] == stats["version"]
    checks = {c["check"]: c for c in stats["gate"]["checks"]}
    assert stats["gate"]["passed"] and checks["max_changed_without_history_change"]["value"] == 0.0
    assert checks["max_changed_without_history_change"]["detail"].startswith("0 of 20 users")
    assert checks["min_identifiability_top1"]["value"] == stats["quality"]["identifiability"]["top1"]


def test_the_lift_gate_scores_a_fixed_sample_against_the_new_version(tmp_path):
    """min_lift: profile+rag against random-profile on the same sampled users every night, generated from the
    version being committed; a version below the limit stays uncommitted (exit 4 at the CLI)."""
    from stepback_ray.pipeline import run_profile_job
    from stepback_ray.store.gate import GateFailed

    lift = ["profile_store.gate.lift_users=8"]
    first = run_profile_job(_lamp_job(tmp_path, "n1", extra=[*lift, "profile_store.gate.min_lift=-1"]))
    stats = first.metrics["profiles"]
    sample = stats["gate_sample"]
    assert sample["users"] == 8 and -1 <= sample["mean"] <= 1 and sample["lo"] <= sample["mean"] <= sample["hi"]
    check = next(c for c in stats["gate"]["checks"] if c["check"] == "min_lift")
    assert check["passed"] and check["value"] == sample["mean"] and "over 8 sample users" in check["detail"]
    rows = pd.read_parquet(tmp_path / "runs" / "n1" / "_gate_sample" / "generations")
    assert sorted(rows["mode"].unique()) == ["profile+rag", "random-profile"] and len(rows) == 16
    assert (rows["profile_version"] == stats["version"]).all()  # the version under the gate, before it is live
    live = (tmp_path / "store" / "CURRENT.json").read_bytes()
    with pytest.raises(GateFailed, match="min_lift: .*needs >= 1 .*over 8 sample users"):
        run_profile_job(_lamp_job(tmp_path, "n2", extra=[*lift, "profile_store.gate.min_lift=1"]))
    assert (tmp_path / "store" / "CURRENT.json").read_bytes() == live
    again = pd.read_parquet(tmp_path / "runs" / "n2" / "_gate_sample" / "generations")
    assert set(again["query_id"]) == set(rows["query_id"])  # the same people, night after night
    with pytest.raises(Exception, match="min_lift scores a sample against golds: set input.outputs"):
        load_job(
            None,
            ["profile_store.gate.min_lift=0"],
            data={"name": "x", "task": "LaMP_5", "input": {"questions": "q.json"}, "profile_store": {"uri": "s"}},
        )


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "profile_store.gate.min_ok_share",
            "1.5",
            "profile_store.gate.min_ok_share: Input should be less than or equal to 1",
        ),
        ("profile_store.gate.min_identifiability_top1", "-0.1", "greater than or equal to 0"),
        ("profile_store.gate.max_changed_without_history_change", "true", "expected a number, got a boolean"),
        ("profile_store.gate.min_lift", "0.01", "min_lift gates a profile store version: set profile_store.uri"),
        ("profile_store.gate.min_lift", "2", "profile_store.gate.min_lift: Input should be less than or equal to 1"),
        ("profile_store.gate.lift_users", "1", "profile_store.gate.lift_users: Input should be greater than or equal"),
        ("profile_store.keep_versions", "0", "profile_store.keep_versions: Input should be greater than or equal to 1"),
        ("profile_store.keep_versions", "2.5", "profile_store.keep_versions"),
    ],
)
def test_bad_gate_and_retention_values_fail_validation_in_one_line(key, value, message):
    from stepback_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as e:
        load_job(None, [f"{key}={value}"], data={"name": "x", "task": "LaMP_5", "input": {"questions": "q.json"}})
    assert "\n" not in str(e.value)
