"""Synthetic users for scale tests: histories sampled from the real items in ../shared/data.

    python -m benchmarks.make_synthetic_users --users 1000000 --out runs/synthetic/users-1m --files 64

Every history item is a real arXiv paper (title, abstract, date) from the shared lamp5_arxiv sets; each user's
history length is drawn from the real distribution of those sets, and each user gets one query (a real held-out
abstract, with its title as gold). The output is a Parquet dataset in the ``user`` layout (``user_id``,
``history``, ``queries``), cut into ``--files`` files, written with vectorized Arrow operations so a million
users take minutes. Prints one JSON line with the counts and bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def real_items(data: Path) -> tuple[pa.Table, np.ndarray, pa.Table]:
    """Distinct real items, the real history lengths, and real (input, gold) queries."""
    items, lengths, queries = {}, [], []
    for split in ("dev", "train"):
        qs = json.loads((data / f"lamp5_arxiv/{split}_questions.json").read_text())
        golds = {
            g["id"]: g["output"] for g in json.loads((data / f"lamp5_arxiv/{split}_outputs.json").read_text())["golds"]
        }
        for q in qs:
            lengths.append(len(q["profile"]))
            queries.append({"input": q["input"], "gold": golds[q["id"]]})
            for it in q["profile"]:
                items[it["id"]] = {
                    "id": it["id"],
                    "title": it["title"],
                    "abstract": it["abstract"],
                    "date": it.get("date", ""),
                }
    return pa.Table.from_pylist(list(items.values())), np.array(lengths), pa.Table.from_pylist(queries)


def make_part(
    start: int, n: int, items: pa.Table, lengths: np.ndarray, queries: pa.Table, rng: np.random.Generator
) -> pa.Table:
    sizes = rng.choice(lengths, size=n)
    picks = rng.integers(0, items.num_rows, size=int(sizes.sum()))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    history = pa.ListArray.from_arrays(
        pa.array(offsets), items.take(pa.array(picks)).to_struct_array().combine_chunks()
    )
    user_ids = pa.array([f"u{start + i:08d}" for i in range(n)])
    q = queries.take(pa.array(rng.integers(0, queries.num_rows, size=n)))
    qstruct = pa.StructArray.from_arrays(
        [
            pa.array([f"q{start + i:08d}" for i in range(n)]),
            q.column("input").combine_chunks(),
            q.column("gold").combine_chunks(),
        ],
        names=["query_id", "input", "gold"],
    )
    one = pa.array(np.arange(n + 1, dtype=np.int32))
    return pa.table({"user_id": user_ids, "history": history, "queries": pa.ListArray.from_arrays(one, qstruct)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    args = ap.parse_args()
    t0 = time.time()
    items, lengths, queries = real_items(Path(args.data))
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per = -(-args.users // args.files)
    total_items = 0
    for f in range(args.files):
        start = f * per
        n = min(per, args.users - start)
        if n <= 0:
            break
        part = make_part(start, n, items, lengths, queries, rng)
        total_items += int(pa.compute.sum(pa.compute.list_value_length(part.column("history"))).as_py())
        pq.write_table(part, out / f"part-{f:05d}.parquet", compression="zstd")
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    print(
        json.dumps(
            {
                "users": args.users,
                "history_items": total_items,
                "distinct_real_items": items.num_rows,
                "files": len(list(out.glob("*.parquet"))),
                "bytes": size,
                "seconds": round(time.time() - t0, 1),
                "out": str(out),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
