"""What the tests share besides fixtures: the repository's paths, the shared data sets, small LaMP and Parquet
inputs written on the fly, the command line in a subprocess. Imported as ``from tests.support import ...`` (the
fixtures are in the ``conftest.py`` files)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPBACK_SHARED_DATA", REPO.parent / "shared" / "data"))
FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE = REPO / "data" / "samples" / "lamp5_arxiv_dev20"


def stepback(*args: str) -> subprocess.CompletedProcess:
    """``python -m stepback_ray ARGS`` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "stepback_ray", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def lamp5_users(n: int) -> list[dict]:
    """The first ``n`` users of the committed lamp5_arxiv sample / shared dev set, as {user_id, history, query}."""
    path = SHARED / "lamp5_arxiv" / "dev_questions.json"
    src = path if (path.is_file() and n > 20) else Path(f"{SAMPLE}_questions.json")
    questions = json.loads(src.read_text())[:n]
    golds = {}
    gold_path = Path(str(src).replace("_questions.json", "_outputs.json"))
    if gold_path.is_file():
        golds = {g["id"]: g["output"] for g in json.loads(gold_path.read_text())["golds"]}
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
