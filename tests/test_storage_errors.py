"""Object-storage failures are one-line errors: unreachable endpoint, missing bucket, wrong credentials."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from stepback_ray.config import StorageConfig
from stepback_ray.errors import InputError, StorageError
from stepback_ray.storage import RunStore, read_bytes

from .test_cli import stepback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint():
    storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{_free_port()}", key="k", secret="s")
    t0 = time.time()
    with pytest.raises(StorageError, match=r"s3://b/run: storage endpoint unreachable"):
        RunStore("s3://b/run", storage).ensure_writable()
    assert time.time() - t0 < 60


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
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    proc = stepback("run", "jobs/demo.yaml", "--set", "output=s3://b/x", "--set",
                    f"storage.endpoint_url=http://127.0.0.1:{_free_port()}", "--set", "storage.key=k",
                    "--set", "storage.secret=s")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "storage endpoint unreachable" in err[0]
    assert "storage.secret" not in proc.stderr and " s\n" not in proc.stderr
