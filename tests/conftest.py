"""Shared fixtures: the shared data sets, small official-shape LaMP files, a local Ray, a local S3 (moto)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPBACK_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = REPO / "data" / "samples" / "lamp5_arxiv_dev20"


def load_script(name: str):
    """A module of ``scripts/`` (benchmarks and drills share their code with the tests). It is registered in
    ``sys.modules`` before it runs, as an import would, so that its dataclasses can resolve their annotations."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shared_set(name: str) -> tuple[str, str]:
    """(questions, outputs) of a set in ../shared/data, e.g. 'lamp5_arxiv/dev'; skips when absent."""
    q, o = SHARED / f"{name}_questions.json", SHARED / f"{name}_outputs.json"
    if not q.is_file():
        pytest.skip(f"shared data set {name} not found under {SHARED}")
    return str(q), str(o)


def write_lamp(tmp: Path, name: str, questions: list, task: str, golds: dict[str, str] | None) -> tuple[str, str]:
    """Write a LaMP questions/outputs pair and return the two paths."""
    q, o = tmp / f"{name}_questions.json", tmp / f"{name}_outputs.json"
    q.write_text(json.dumps(questions))
    if golds is not None:
        o.write_text(json.dumps({"task": task, "golds": [{"id": k, "output": v} for k, v in golds.items()]}))
    return str(q), str(o)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (jobs see it initialized and leave it running)."""
    import ray

    from stepback_ray.pipeline.on_ray import init_local_ray

    init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 speaking the real S3 protocol; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server; yields (endpoint, bucket, storage settings for a job spec)."""
    import uuid

    import s3fs

    creds = {"key": "testing", "secret": "testing"}
    bucket = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True, **creds)
    fs.mkdir(bucket)
    yield s3_server, bucket, {"endpoint_url": s3_server, **creds}


@pytest.fixture(scope="session")
def formatter():
    """Prompt tools (tokenizer + chat template) of the embedded default model."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines.formatting import PromptFormatter

    return PromptFormatter(EngineConfig())


@pytest.fixture(scope="session")
def engine():
    """The embedded default model in the transformers engine (loaded once per session)."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import build_engine

    return build_engine(EngineConfig(batch_size=4))


@pytest.fixture(scope="session")
def dry_engine():
    """The dry-run engine with the embedded model's tokenizer: everything but the LLM (well-formed profiles of
    the expected length), for tests of what is built around the engine's calls."""
    from stepback_ray.config import EngineConfig
    from stepback_ray.engines import build_engine

    return build_engine(EngineConfig(kind="dry-run"))


def lamp5_users(n: int) -> list[dict]:
    """The first ``n`` users of the committed lamp5_arxiv sample / shared dev set, as {user_id, history, query}."""
    import json as _json

    path = SHARED / "lamp5_arxiv" / "dev_questions.json"
    src = path if (path.is_file() and n > 20) else Path(f"{SAMPLE}_questions.json")
    questions = _json.loads(src.read_text())[:n]
    golds = {}
    gold_path = Path(str(src).replace("_questions.json", "_outputs.json"))
    if gold_path.is_file():
        golds = {g["id"]: g["output"] for g in _json.loads(gold_path.read_text())["golds"]}
    return [
        {
            "user_id": q["user_id"],
            "history": q["profile"],
            "queries": [{"query_id": q["id"], "input": q["input"], "gold": golds.get(q["id"])}],
        }
        for q in questions
    ]


def write_items_parquet(path: Path, users: list[dict]) -> None:
    """One row per history item (layout: item)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"user_id": u["user_id"], **it} for u in users for it in u["history"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
