"""Object-storage failures are one-line errors: unreachable endpoint, missing bucket, wrong credentials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from benchmarks import fault_drills
from stepback_ray.config import StorageConfig
from stepback_ray.errors import InputError, StorageError
from stepback_ray.storage import RunStore, read_bytes
from tests.support import free_port, stepback


def test_unreachable_endpoint():
    # a closed port is retried like any lost connection (storage.retries); one retry keeps this test short
    storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{free_port()}", key="k", secret="s", retries=1)
    t0 = time.time()
    with pytest.raises(StorageError, match=r"s3://b/run: storage endpoint unreachable"):
        RunStore("s3://b/run", storage).ensure_writable()
    assert time.time() - t0 < 10


def test_only_a_cut_off_body_is_retried_above_botocore_on_s3(s3_bucket):
    """On S3, retried_call retries a response body cut off mid-read (botocore cannot), and nothing botocore has
    already retried: a throttling error it gives up on is raised at once."""
    from stepback_ray.storage import filesystem_for, retried_call

    endpoint, bucket, creds = s3_bucket
    fs, _ = filesystem_for(f"s3://{bucket}/x", StorageConfig(**creds, retries=2))
    calls = []

    def flaky(error: Exception):
        def call():
            calls.append(1)
            if len(calls) == 1:
                raise error
            return "read"

        return call

    assert (
        retried_call(fs, StorageConfig(**creds, retries=2), flaky(OSError("IncompleteRead(12 bytes read)"))) == "read"
        and len(calls) == 2
    )
    calls.clear()
    with pytest.raises(OSError, match="reduce your request rate"):
        retried_call(fs, StorageConfig(**creds, retries=2), flaky(OSError("SlowDown: reduce your request rate")))
    assert len(calls) == 1


@pytest.mark.parametrize("retries", [0, 1])
def test_a_throttled_request_is_sent_exactly_retries_plus_one_times(tmp_path, retries):
    """One retry policy (storage.py): a request S3 keeps throttling reaches the server ``storage.retries + 1``
    times, through the run store and through the bare filesystem Ray Data reads with. Layered (our retries over
    s3fs's loop over botocore's legacy retries) it reached it up to 6 x 5 x 5 times."""
    import s3fs

    from stepback_ray.storage import filesystem_for

    flaky = fault_drills.FlakyS3(0.0)
    with flaky as endpoint:
        creds = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        bucket = f"throttled-{retries}-{uuid.uuid4().hex[:8]}"  # (moto's state is shared by the process)
        s3fs.S3FileSystem(skip_instance_cache=True, **creds).mkdir(bucket)
        store = RunStore(f"s3://{bucket}/run", StorageConfig(**creds, retries=retries))
        store.write_bytes("a.json", b"{}")
        fs, path = filesystem_for(f"s3://{bucket}/run/a.json", StorageConfig(**creds, retries=retries))
        flaky.fault_rate = 1.0  # every request from here on: 503 SlowDown
        for call in (
            lambda: store.write_bytes("b.json", b"{}"),
            lambda: store.read_bytes("a.json"),
            lambda: fs.cat_file(path),
        ):
            before = flaky.requests
            with pytest.raises(Exception, match="SlowDown|reduce your request rate|Service Unavailable"):
                call()
            assert flaky.requests - before == retries + 1


def test_missing_bucket_and_missing_key(s3_bucket):
    endpoint, bucket, creds = s3_bucket
    storage = StorageConfig(**creds)
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-xyz/run: bucket does not exist"):
        RunStore("s3://no-such-bucket-xyz/run", storage).ensure_writable()
    with pytest.raises(InputError, match=rf"s3://{bucket}/missing.json: file not found"):
        read_bytes(f"s3://{bucket}/missing.json", storage)


@pytest.mark.parametrize("size", [1000, 12 * 2**20], ids=["one-put", "multipart"])
def test_a_streamed_object_appears_whole_or_not_at_all(s3_bucket, size):
    endpoint, bucket, creds = s3_bucket
    store = RunStore(f"s3://{bucket}/run", StorageConfig(**creds))
    with pytest.raises(RuntimeError, match="boom"):
        with store.writer("predictions/none.json") as f:
            f.write(b"x" * size)  # over s3fs's 5 MiB block: parts are already uploaded
            raise RuntimeError("boom")
    assert not store.exists("predictions/none.json")
    with store.writer("predictions/none.json") as f:
        f.write(b"y" * size)
    assert store.read_bytes("predictions/none.json") == b"y" * size


@pytest.fixture(scope="module")
def authenticating_s3():
    """A moto S3 server that checks credentials (no IAM user exists, so every key is wrong)."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def test_wrong_credentials(authenticating_s3):
    storage = StorageConfig(endpoint_url=authenticating_s3, key="AKIAWRONG", secret="wrong")
    with pytest.raises(StorageError, match=r"access denied \(check the credentials / AWS profile\)"):
        RunStore("s3://bucket/run", storage).ensure_writable()


def test_cli_reports_storage_errors_in_one_line(tmp_path):
    proc = stepback(
        "run",
        "jobs/demo.yaml",
        "--set",
        "output=s3://b/x",
        "--set",
        f"storage.endpoint_url=http://127.0.0.1:{free_port()}",
        "--set",
        "storage.key=k",
        "--set",
        "storage.secret=s",
        "--set",
        "storage.retries=1",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "storage endpoint unreachable" in err[0]
    assert "storage.secret" not in proc.stderr and " s\n" not in proc.stderr


# ---------------------------------------------------------------------------------------------- local outputs
def test_a_local_output_that_is_a_file_or_not_writable_says_so(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StorageError, match=rf"^{tmp_path / 'afile'}: the output is a file, not a folder$"):
        RunStore(str(tmp_path / "afile"), StorageConfig()).ensure_writable()  # was a raw [Errno 17]
    with pytest.raises(StorageError, match=rf"afile/run: {tmp_path / 'afile'} is a file, not a folder$"):
        RunStore(str(tmp_path / "afile" / "run"), StorageConfig()).ensure_writable()

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0] if args else None)

    monkeypatch.setattr(os, "makedirs", denied)  # (tests run as root here, where chmod denies nothing)
    with pytest.raises(StorageError, match=r"ro/run: not writable \(permission denied\)$"):
        RunStore(str(tmp_path / "ro" / "run"), StorageConfig()).ensure_writable()  # was "check the credentials"
    from stepback_ray.storage import describe_storage_error

    assert (
        describe_storage_error("/data/x.json", PermissionError(13, "Permission denied"))
        == "/data/x.json: permission denied (not writable or not readable by this user)"
    )
    assert "credentials" in describe_storage_error("s3://b/x", PermissionError(13, "Permission denied"))


def test_the_write_probe_leaves_no_folder_behind(tmp_path):
    RunStore(str(tmp_path / "a" / "b" / "run"), StorageConfig()).ensure_writable()
    assert list(tmp_path.iterdir()) == []


def test_an_output_holding_other_files_is_refused_unless_it_is_a_run(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for name in ("notes.txt", "data.csv"):
        (junk / name).write_text("x")
    with pytest.raises(
        StorageError,
        match=r"junk: the output holds files but no run \(2 entries, e.g. data.csv, "
        r"notes.txt; no _run_spec.json\); choose a new or empty output",
    ):
        RunStore(str(junk), StorageConfig()).ensure_writable(run_marker="_run_spec.json")
    RunStore(str(junk), StorageConfig()).ensure_writable()  # without a marker (a training output): not checked
    (junk / "_run_spec.json").write_text("{}")  # a run's own output: resumable, the spec is compared later
    RunStore(str(junk), StorageConfig()).ensure_writable(run_marker="_run_spec.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    RunStore(str(empty), StorageConfig()).ensure_writable(run_marker="_run_spec.json")


def test_a_run_into_a_stale_or_foreign_output_stops_before_any_work(tmp_path):
    """A stale generations/ without the run's spec was found only after the whole run, on the row count."""
    from stepback_ray.config import load_job
    from stepback_ray.pipeline import run_job
    from tests.support import REPO

    stale = tmp_path / "stale"
    (stale / "generations").mkdir(parents=True)
    (stale / "generations" / "chunk-00000.parquet").write_bytes(b"old")
    job = load_job(REPO / "jobs" / "demo.yaml", [f"output={stale}", "engine.kind=dry-run"])
    t0 = time.time()
    with pytest.raises(StorageError, match=r"stale: the output holds files but no run \(1 entries, e.g. generations"):
        run_job(job)
    assert time.time() - t0 < 10 and sorted(p.name for p in stale.iterdir()) == ["generations"]


def test_an_input_error_leaves_no_empty_output_folder(tmp_path):
    proc = stepback(
        "run",
        "jobs/demo.yaml",
        "--set",
        f"output={tmp_path / 'runs' / 'x'}",
        "--set",
        f"input.questions={tmp_path / 'missing_questions.json'}",
    )
    assert proc.returncode == 2 and "missing_questions.json: file not found" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_an_object_store_output_holding_other_files_is_refused_too(s3_bucket):
    endpoint, bucket, creds = s3_bucket
    store = RunStore(f"s3://{bucket}/run", StorageConfig(**creds))
    store.ensure_writable(run_marker="_run_spec.json")  # nothing there yet
    store.write_bytes("notes.txt", b"x")
    with pytest.raises(StorageError, match=r"run: the output holds files but no run \(1 entries, e.g. notes.txt"):
        store.ensure_writable(run_marker="_run_spec.json")
    store.write_bytes("_run_spec.json", b"{}")
    store.ensure_writable(run_marker="_run_spec.json")


def test_no_credentials_for_an_s3_input_is_one_line_not_a_traceback(monkeypatch):
    """botocore's NoCredentialsError is not an OSError: listing a dataset input, reading a file and drawing a plan's
    sample still end in one StorageError line saying what to set."""
    from botocore.exceptions import NoCredentialsError

    from stepback_ray.config import load_job
    from stepback_ray.data import datasets
    from stepback_ray.storage import filesystems

    class NoCredentials:
        def __getattr__(self, name):
            def refuse(*args, **kwargs):
                raise NoCredentialsError()

            return refuse

    monkeypatch.setattr(datasets, "filesystem_for", lambda uri, storage: (NoCredentials(), "bucket/users"))
    monkeypatch.setattr(filesystems, "filesystem_for", lambda uri, storage: (NoCredentials(), "bucket/x.json"))
    job = load_job(
        None,
        data={"name": "n", "task": "LaMP_5", "input": {"format": "parquet", "path": "s3://bucket/users"}},
    )
    with pytest.raises(StorageError, match=r"^s3://bucket/users: no credentials for object storage \(set AWS_"):
        datasets.input_files(job)
    with pytest.raises(StorageError, match=r"^s3://bucket/x.json: no credentials"):
        read_bytes("s3://bucket/x.json", StorageConfig(retries=0))
    assert not filesystems.is_storage_error(ValueError("a bug stays a bug"))
