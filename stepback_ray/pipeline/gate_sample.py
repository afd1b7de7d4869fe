"""The quality gate's lift check: does the new version's profile still beat another person's, on a fixed sample?

``profile_store.gate.min_lift`` asks, before ``CURRENT.json`` moves, that ``profile+rag`` beat ``random-profile``
(the same prompt with another user's profile and history) by at least the given mean score on a fixed sample of
users with golds. The sample is the ``gate.lift_users`` lead users whose ids hash lowest among those with a gold
query (one query each) in the first shards (read in order until :data:`SCAN_FACTOR` times that many are found):
the same people every night while they stay in the input (a store keeps its shard count), independent of input
order, so two nights' lifts compare like with like. Their queries go into one chunk (so each borrows a
profile from another sampled user) and run through the ordinary generation pass, reading the profiles of the
version being committed, into ``<run>/_gate_sample/`` (kept, for inspection; a rerun resumes it). The check's
figure is the mean paired difference with its bootstrap interval; for a rating task (lower error is better) the
sign is turned so that a positive lift always means the person's own profile helps.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.data.rows import chunk_id, shard_of
from stepback_ray.evaluation.metrics import bootstrap_ci
from stepback_ray.modes import donor_control
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_queries
from stepback_ray.pipeline.commit import pending
from stepback_ray.pipeline.generation_pass import GENERATION_PASS
from stepback_ray.storage import RunStore
from stepback_ray.tasks import get_task

OWN = "profile+rag"
MODES = (OWN, donor_control(OWN))
"""The person's own profile and its control (the same prompt with another user's profile and history)."""
SCAN_FACTOR = 4
"""Shards are read in order until this many times ``lift_users`` candidates are found (a million-user input is
not read whole in the driver for a 50-user sample; shards are hash partitions, so any few are a random sample)."""
FOLDER = "_gate_sample"


def _rank(user_id: str) -> str:
    return hashlib.sha256(f"gate-sample:{user_id}".encode()).hexdigest()


def sample_chunk(
    job: JobSpec, generation_chunks: list[dict[str, Any]], users: int, shards: int
) -> dict[str, Any] | None:
    """One generation chunk holding one gold query (the first by id) of each of the ``users`` sampled lead users,
    with their histories (each lends theirs to the user who borrows from them). None: no query has a gold."""
    best: dict[str, Any] = {}
    for chunk in sorted(generation_chunks, key=lambda c: c["chunk_id"]):
        if len(best) >= SCAN_FACTOR * users:  # enough candidates: the same shards are read every night
            break
        queries, _ = chunk_queries(job, chunk)
        for q in sorted(queries, key=lambda q: q.query_id):
            if q.gold is not None and (q.user_id not in best or q.query_id < best[q.user_id].query_id):
                best[q.user_id] = q
    chosen = sorted(best, key=_rank)[:users]
    if not chosen:
        return None
    queries = [best[u] for u in chosen]
    histories: dict[str, list] = {}
    for q in queries:
        for uid, h in zip(q.user_ids, q.histories):
            histories.setdefault(uid, h)
    return {
        "chunk_id": "00000",
        "profile_chunks": sorted({chunk_id(shard_of(u, shards)) for u in histories}),
        "payload": json.dumps({"queries": [q.to_dict() for q in queries], "histories": histories}),
    }


def measure_lift(
    ex, job: JobSpec, generation_chunks: list[dict[str, Any]], shards: int, at: ProfilesAt
) -> dict[str, Any]:
    """Run the sample through the generation pass and return the lift (``mean`` None when nothing was scored)."""
    chunk = sample_chunk(job, generation_chunks, job.profile_store.gate.lift_users, shards)
    if chunk is None:
        return {"users": 0, "mean": None, "detail": "no query of the input has a gold"}
    sample_job = job.model_copy(update={"modes": list(MODES), "output": f"{job.output_uri}/{FOLDER}"})
    todo = pending(*GENERATION_PASS.commits_to(sample_job, at), sample_job, [chunk])
    ex.run(GENERATION_PASS, todo, at, job=sample_job)
    store = RunStore(sample_job.output_uri, job.storage)
    scores: dict[str, dict[str, float]] = {m: {} for m in MODES}
    for r in store.scan("generations", ["query_id", "mode", "score", "status"]):
        if r["score"] is not None:
            scores[r["mode"]][r["query_id"]] = r["score"]
    sign = -1.0 if get_task(job.task).metric not in ("rouge", "accuracy_f1") else 1.0
    keys = sorted(set(scores[MODES[0]]) & set(scores[MODES[1]]))
    if not keys:
        return {
            "users": len(json.loads(chunk["payload"])["queries"]),
            "mean": None,
            "detail": "no sampled query was scored in both modes",
        }
    diffs = [sign * (scores[MODES[0]][k] - scores[MODES[1]][k]) for k in keys]
    lo, hi = bootstrap_ci(diffs)
    return {
        "users": len(keys),
        "mean": round(sum(diffs) / len(diffs), 4),
        "lo": round(lo, 4),
        "hi": round(hi, 4),
        **{m: round(sum(scores[m][k] for k in keys) / len(keys), 4) for m in MODES},
        "output": store.uri_of("generations"),
    }
