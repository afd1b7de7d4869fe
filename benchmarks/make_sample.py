"""Cut the first N users of a LaMP-format set into a small sample (questions + outputs) for the repo.

    python -m benchmarks.make_sample ../shared/data/lamp5_arxiv/dev data/samples/lamp5_arxiv_dev20 --users 20

The committed sample is what the demo reads by default, so the demo runs from a clone of the repo alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="prefix of the source pair: <source>_questions.json and <source>_outputs.json")
    ap.add_argument("dest", help="prefix of the sample pair to write")
    ap.add_argument("--users", type=int, default=20)
    args = ap.parse_args()
    questions = json.loads(Path(f"{args.source}_questions.json").read_text())
    outputs = json.loads(Path(f"{args.source}_outputs.json").read_text())
    users: list[str] = []
    keep = []
    for q in questions:
        uid = q.get("user_id", q["id"])
        if uid not in users:
            if len(users) >= args.users:
                continue
            users.append(uid)
        keep.append(q)
    ids = {q["id"] for q in keep}
    golds = {"task": outputs["task"], "golds": [g for g in outputs["golds"] if g["id"] in ids]}
    Path(args.dest).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.dest}_questions.json").write_text(json.dumps(keep, ensure_ascii=False) + "\n")
    Path(f"{args.dest}_outputs.json").write_text(json.dumps(golds, ensure_ascii=False) + "\n")
    print(json.dumps({"users": len(users), "questions": len(keep), "dest": args.dest}))


if __name__ == "__main__":
    main()
