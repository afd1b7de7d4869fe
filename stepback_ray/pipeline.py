"""The batch job as two Ray Data passes, joined by user through the run's profile files.

**Profile pass** (per user): chunk of users -> plan the history into parts (CPU, tokenizer only) -> distill
(engine actor pool: style notes, part profiles, merges) -> commit ``profiles/chunk-<id>.parquet``.
**Generation pass** (per query and mode): chunk of queries -> the users' profiles (read from the profile chunks
that hold them) + retrieval -> prompts (CPU) -> engine (proposals, then lead-author merges for co-authored
queries) -> parse and score (CPU) -> commit ``generations/chunk-<id>.parquet``.

A *chunk* (the users of one shard, see :mod:`stepback_ray.data.rows`) is one Ray Data block from start to end:
every stage maps a whole block (``batch_size=None``) to a whole block, so the commit stage writes each chunk as
one file, atomically, and checks that no row is missing. A rerun with the same ``run_id`` skips committed chunks.
Engines are built inside their actors from the job spec; CPU stages load only the tokenizer (and the retriever).
With a profile store (:mod:`stepback_ray.profile_store`) the profile pass carries unchanged users over and writes
a new store version; without one, profiles live in the run's own output. After both passes the driver reads back
the score columns, writes ``metrics.json`` and the official-format predictions, and writes ``manifest.json`` last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from . import __version__, metrics, profile_quality, profiling, prompting, selection
from .config import JobSpec
from .data import collect_users, decode_queries, decode_users, donors, generation_chunks, lead_groups, profile_chunks
from .data.datasets import load_staged, stage_dataset, staged_chunks
from .data.lamp import read_lamp
from .data.rows import Query, UserHistory, status_kind
from .engines import SamplingParams, build_engine
from .engines.formatting import PromptFormatter
from .engines.guard import EngineCalls
from .errors import ErrorBudgetExceeded, RunFailed, StepbackError
from .profile_store import StoreVersion, commit_version, open_version
from .resources import WORKER_ENV, connect_cluster, engine_resources
from .retrieval import MemoRetriever, build_retriever
from .storage import RunStore
from .tasks import get_task

CPU_STAGE_CPUS = 0.25
"""CPU share of the light stages: small, so they never starve the engine actors of slots on small nodes."""

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()
_LS = pa.list_(pa.string())

PROFILE_SCHEMA = pa.schema([
    ("chunk_id", _S), ("user_id", _S), ("task", _S), ("status", _S), ("profile_json", _S), ("profile_text", _S),
    ("items_total", _I), ("items_used", _I), ("items_dropped", _I), ("parts", _I), ("item_ids", _LS),
    ("partials_json", _S), ("style_notes_json", _S), ("prompt", _S), ("raw_output", _S), ("llm_calls", _I),
    ("prompt_tokens", _I), ("completion_tokens", _I), ("engine_seconds", _F), ("fingerprint", _S), ("model", _S),
    ("prompt_version", _S), ("notes", _LS), ("origin", _S), ("history_ids", _LS), ("run_id", _S), ("exact", _B),
    ("recent_items", _LS), ("committed_at", _F),
])
GENERATION_SCHEMA = pa.schema([
    ("chunk_id", _S), ("query_id", _S), ("mode", _S), ("user_id", _S), ("user_ids", _LS), ("task", _S),
    ("input", _S), ("gold", _S), ("profile_text", _S), ("profile_status", _S), ("retrieved_ids", _LS),
    ("prompt", _S), ("proposals", _LS), ("raw_output", _S), ("output", _S), ("score", _F), ("rouge1", _F),
    ("rougeL", _F), ("abs_error", _F), ("prompt_tokens", _I), ("completion_tokens", _I), ("engine_seconds", _F),
    ("llm_calls", _I), ("finish_reason", _S), ("truncated", _B), ("status", _S), ("notes", _LS),
    ("history_items", _I), ("candidates", _LS), ("committed_at", _F),
])
_PLANNED = pa.schema([("chunk_id", _S), ("chunk_rows", _I), ("user_id", _S), ("plan_json", _S), ("fingerprint", _S),
                      ("notes", _LS), ("origin", _S), ("history_ids", _LS), ("carried_json", _S),
                      ("recent_items", _LS), ("retained", _B)])
_GEN_PLANNED = pa.schema([
    ("chunk_id", _S), ("chunk_rows", _I), ("query_id", _S), ("mode", _S), ("user_id", _S), ("user_ids", _LS),
    ("input", _S), ("gold", _S), ("profile_text", _S), ("profile_status", _S), ("retrieved_ids", _LS),
    ("prompts", _LS), ("merge_json", _S), ("truncated", _B), ("notes", _LS), ("history_items", _I),
    ("soft_tokens", pa.list_(pa.list_(pa.float32()))), ("select_refs", pa.list_(_LS)),
])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _with_chunk_rows(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("chunk_rows", _I))


# ------------------------------------------------------------------------------------------------ work context
@dataclass(frozen=True)
class ProfilesAt:
    """Where a run's profiles are written and read: its own output, or a version of the profile store."""

    uri: str
    folder: str
    previous: str | None = None
    """Folder (same root) of the store version to carry unchanged users over from."""
    full: bool = True
    """Recompute every user whose fingerprint changed from scratch (no incremental update)."""

    @property
    def embeddings(self) -> str:
        """Persona-Plug item embeddings, stored beside the profiles (same shards)."""
        return self.folder.rsplit("/", 1)[0] + "/embeddings" if "/" in self.folder else "embeddings"

    @property
    def previous_embeddings(self) -> str | None:
        return (self.previous.rsplit("/", 1)[0] + "/embeddings") if self.previous else None


def chunk_users(job: JobSpec, chunk: dict[str, Any]) -> list[UserHistory]:
    if chunk.get("source"):
        return load_staged(job, chunk["source"])[0]
    return decode_users(chunk["payload"])


def chunk_queries(job: JobSpec, chunk: dict[str, Any]) -> tuple[list[Query], dict[str, list]]:
    """The chunk's queries and the histories of their users (for the random-profile donors)."""
    if chunk.get("source"):
        users, queries = load_staged(job, chunk["source"])
        return queries, {u.user_id: u.history for u in users}
    return decode_queries(chunk["payload"])


# ------------------------------------------------------------------------------------------------ profile pass
class ProfilePlanStage:
    """CPU stage: a chunk of users -> one row per user: carried over unchanged from the previous store version,
    planned as an incremental update (only the new items), or planned in full (history cut into parts). A full
    rebuild recomputes every profile that an incremental update produced (``exact`` false), so merges of merges
    never drift for long."""

    def __init__(self, job: JobSpec, at: ProfilesAt):
        self.job, self.task, self.at = job, get_task(job.task), at
        self.tools = PromptFormatter(job.engine)
        self.budget = profiling.part_budget(self.task, job.profile, self.tools)  # the same for every user
        self.store = RunStore(at.uri, job.storage)

    def _previous(self, chunk_id: str) -> dict[str, dict[str, Any]]:
        if not self.at.previous:
            return {}
        rel = f"{self.at.previous}/chunk-{chunk_id}.parquet"
        if not self.store.exists(rel):
            return {}
        return {r["user_id"]: r for r in self.store.read_table(rel).to_pylist()}

    def _retained(self, chunk: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A chunk retried after engine errors: the rows this pass already committed without error, kept as they
        are (only the failed users are planned again)."""
        if not chunk.get("retry"):
            return {}
        rows = self.store.read_table(f"{self.at.folder}/chunk-{chunk['chunk_id']}.parquet").to_pylist()
        return {r["user_id"]: r for r in rows if status_kind(r.get("status")) != "error"}

    def _plan(self, u: UserHistory, prev: dict[str, Any] | None) -> tuple[profiling.ProfilePlan, str]:
        ids = [it["id"] for it in u.history]
        old = set(prev["history_ids"] or []) if prev is not None else set()
        # an incremental update builds on the old profile only if it came from these very items with this model,
        # prompt version and settings (its fingerprint matches them): otherwise the user is profiled afresh
        if (prev is not None and not self.at.full and self.job.profile_store.incremental and prev["profile_json"]
                and old < set(ids) and prev["fingerprint"] == profiling.fingerprint(
                    [it for it in u.history if it["id"] in old], self.job.engine, self.job.profile,
                    self.task.name)):
            plan = profiling.plan_profile(u.user_id, [it for it in u.history if it["id"] not in old], self.task,
                                          self.job.profile, self.tools, self.budget)
            plan.base_profile = json.loads(prev["profile_json"])
            plan.base_item_ids = list(prev["item_ids"] or [])
            plan.items_total = len(u.history)
            plan.habits = profiling.measure_habits(u.history, self.task, self.job.profile)  # the whole history
            plan.exemplars = profiling.exemplars(u.history, self.task, self.job.profile)
            return plan, "incremental"
        plan = profiling.plan_profile(u.user_id, u.history, self.task, self.job.profile, self.tools, self.budget)
        return plan, "recomputed" if prev is not None else "new"

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = chunk_users(self.job, chunk)
            previous = self._previous(chunk["chunk_id"])
            retained = self._retained(chunk)
            for u in users:
                fp = profiling.fingerprint(u.history, self.job.engine, self.job.profile, self.task.name)
                row = {"chunk_id": chunk["chunk_id"], "chunk_rows": len(users), "user_id": u.user_id,
                       "fingerprint": fp, "history_ids": [it["id"] for it in u.history], "notes": [],
                       "recent_items": profiling.recent_items(u.history, self.task)}
                if u.user_id in retained and retained[u.user_id]["fingerprint"] == fp:
                    rows.append({**row, "origin": retained[u.user_id]["origin"], "retained": True,
                                 "carried_json": json.dumps(retained[u.user_id], default=str)})
                    continue
                prev = previous.get(u.user_id)
                # unchanged: carry over, except in a full rebuild a profile that came from incremental updates, and
                # never a profile the engine failed on (the next run retries it)
                failed = prev is not None and status_kind(prev.get("status")) == "error"
                if (prev is not None and not failed and prev["fingerprint"] == fp
                        and (not self.at.full or prev.get("exact", True))):
                    rows.append({**row, "origin": "carried", "carried_json": json.dumps(prev, default=str)})
                    continue
                plan, origin = self._plan(u, prev)
                if plan.items_dropped:
                    row["notes"] = [f"profile from the newest {plan.items_used} of {plan.items_total} items "
                                    f"({plan.items_dropped} older items over profile.max_parts)"]
                rows.append({**row, "origin": origin, "plan_json": json.dumps(plan.to_dict())})
        return _table(rows, _PLANNED)


class ProfileEngineStage:
    """Engine stage: distills every planned user of a block (notes, parts, merges: one batched call per level)."""

    def __init__(self, job: JobSpec, engine=None):
        self.job, self.task = job, get_task(job.task)
        self.engine = engine or build_engine(job.engine)  # given: a caller running the stages in-process
        self.generate = EngineCalls(self.engine, job.engine.call_timeout_s, in_actor=engine is None)
        self.distiller = profiling.Distiller(self.task, job.profile, self.engine,
                                             lambda prompts, params: self.generate(prompts, params))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        carried = [r for r in rows if r["carried_json"]]
        todo = [r for r in rows if not r["carried_json"]]
        plans = [profiling.ProfilePlan.from_dict(json.loads(r["plan_json"])) for r in todo]
        out = [{**json.loads(r["carried_json"]), "chunk_id": r["chunk_id"], "chunk_rows": r["chunk_rows"],
                "recent_items": r["recent_items"]} | ({} if r["retained"] else {  # retained: this pass's own row
                    "origin": "carried", "llm_calls": 0, "prompt_tokens": 0, "completion_tokens": 0,
                    "engine_seconds": 0.0}) for r in carried]
        for r, plan, res in zip(todo, plans, self.distiller.run(plans)):
            notes = list(r["notes"])
            # the items the profile stands on: the selected ones, and for an incremental update also the items
            # its base profile was built from
            item_ids = [s.item_id for p in plan.parts for s in p]
            if plan.base_profile is not None:
                item_ids = sorted(set(item_ids) | set(plan.base_item_ids))
            if not plan.parts:
                notes.append("profile skipped: empty history")
            if res.profile is not None:  # what is measured, not distilled, rides beside the LLM's fields
                res.profile.update({k: v for k, v in (("habits", plan.habits), ("exemplars", plan.exemplars)) if v})
            out.append({
                **r, "task": self.task.name, "status": res.status,
                "profile_json": json.dumps(res.profile) if res.profile is not None else None,
                "profile_text": profiling.render_profile(res.profile, self.task) if res.profile else "",
                "items_total": plan.items_total, "items_used": len(item_ids), "items_dropped": plan.items_dropped,
                "parts": len(plan.parts), "item_ids": item_ids,
                "partials_json": json.dumps(res.partials) if len(res.partials) > 1 else None,
                "style_notes_json": json.dumps(res.notes) if res.notes else None,
                "prompt": res.prompt, "raw_output": res.raw_output, "llm_calls": res.llm_calls,
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "engine_seconds": res.engine_seconds, "model": self.job.engine.model,
                "prompt_version": profiling.PROMPT_VERSION, "notes": notes, "run_id": self.job.run_id,
                "exact": plan.base_profile is None,
            })
        return _table(out, _with_chunk_rows(PROFILE_SCHEMA))


# ------------------------------------------------------------------------------------------------ embedding pass
EMBEDDING_SCHEMA = pa.schema([("chunk_id", _S), ("user_id", _S), ("item_ids", _LS),
                              ("vectors", pa.list_(pa.list_(pa.float32()))), ("encoder", _S), ("reused", _I)])


class EmbedStage:
    """CPU stage (Persona-Plug): every history item of a chunk's users embedded once; items the previous store
    version already embedded (same id, same encoder) are reused, not re-encoded."""

    def __init__(self, job: JobSpec, at: ProfilesAt):
        from .pplug.encoder import TextEncoder, item_text
        from .pplug.training import checkpoint_config

        self.job, self.task, self.at = job, get_task(job.task), at
        # items are embedded as the plug being served was trained: its encoder, its text length
        spec = checkpoint_config(job.pplug.checkpoint, job.storage) if job.pplug.checkpoint else {
            "encoder": job.pplug.encoder, "encoder_max_tokens": job.pplug.encoder_max_tokens}
        self.encoder_name = f"{spec['encoder']}@{spec['encoder_max_tokens']}"
        self.encoder = TextEncoder(spec["encoder"], max_seq_length=spec["encoder_max_tokens"])
        self.item_text = item_text
        self.store = RunStore(at.uri, job.storage)

    def _previous(self, chunk_id: str) -> dict[str, list[float]]:
        rel = f"{self.at.previous_embeddings}/chunk-{chunk_id}.parquet" if self.at.previous_embeddings else None
        if rel is None or not self.store.exists(rel):
            return {}
        known: dict[str, list[float]] = {}
        for r in self.store.read_table(rel).to_pylist():
            if r["encoder"] == self.encoder_name:
                known.update(zip(r["item_ids"], r["vectors"]))
        return known

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = chunk_users(self.job, chunk)
            known = self._previous(chunk["chunk_id"])
            todo = [it for u in users for it in u.history if it["id"] not in known]
            fresh = dict(zip([it["id"] for it in todo],
                             self.encoder.encode([self.item_text(self.task, it) for it in todo])))
            for u in users:
                ids = [it["id"] for it in u.history]
                rows.append({"chunk_id": chunk["chunk_id"], "chunk_rows": len(users), "user_id": u.user_id,
                             "item_ids": ids, "encoder": self.encoder_name,
                             "vectors": [list(map(float, known[i] if i in known else fresh[i])) for i in ids],
                             "reused": sum(1 for i in ids if i in known)})
        return _table(rows, _with_chunk_rows(EMBEDDING_SCHEMA))


def commit_embeddings(batch: pa.Table, job: JobSpec, at: ProfilesAt) -> pa.Table:
    return pa.Table.from_pylist(_commit(job, at.embeddings, batch.to_pylist(), EMBEDDING_SCHEMA, at.uri))


# ------------------------------------------------------------------------------------------------ generation pass
class GenerationPlanStage:
    """CPU stage: a chunk of queries -> one row per (query, mode) with its rendered prompts."""

    def __init__(self, job: JobSpec, at: ProfilesAt | None):
        self.job, self.task, self.at = job, get_task(job.task), at
        self.tools = PromptFormatter(job.engine)
        self.retriever = build_retriever(job.retrieval)
        self.store = RunStore(at.uri, job.storage) if at else None
        self.plug = None
        if any(prompting.uses_plug(m) for m in job.modes):
            from .pplug.serving import PlugServer

            self.plug = PlugServer(job)

    def _embeddings(self, chunk_ids: list[str]) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {}
        for cid in chunk_ids:
            rel = f"{self.at.embeddings}/chunk-{cid}.parquet"
            if self.store.exists(rel):
                for r in self.store.read_table(rel, columns=["user_id", "item_ids", "vectors"]).to_pylist():
                    out[r["user_id"]] = dict(zip(r["item_ids"], r["vectors"]))
        return out

    def _soft_tokens(self, rows: list[dict[str, Any]], queries: dict[str, Query], chunk_ids: list[str],
                     donor_info: dict[str, dict[str, Any]]) -> None:
        """Soft tokens for the rows of Persona-Plug modes: from the lead user's items visible to the query, or for
        a donor mode (pplug-random) from the donor's history, with the query's own input."""
        wanted = [r for r in rows if prompting.uses_plug(r["mode"])]
        if not wanted:
            return
        vectors = self._embeddings(chunk_ids)
        requests = []
        for r in wanted:
            q = queries[r["query_id"]]
            owner, history = q.user_id, q.profile
            if prompting.uses_donor(r["mode"]):
                d = donor_info.get(q.user_id)
                owner, history = (d["donor"], d["history"]) if d else (None, [])
            have = vectors.get(owner, {})
            items = [it for it in profiling.most_recent_first(history) if it["id"] in have][:self.plug.max_items]
            requests.append((q.input, [have[it["id"]] for it in items]))
        for r, soft in zip(wanted, self.plug.soft_tokens(requests)):
            if soft is None:
                r["notes"] = r["notes"] + ["pplug: no history to embed; generated without a soft token (as none)"]
            else:
                r["soft_tokens"] = soft.tolist()

    def _profiles(self, chunk_ids: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.at is not None:
            for cid in chunk_ids:
                rel = f"{self.at.folder}/chunk-{cid}.parquet"
                if self.store.exists(rel):
                    table = self.store.read_table(rel, columns=["user_id", "profile_text", "profile_json", "status"])
                    out.update({r["user_id"]: r for r in table.to_pylist()})
        return out

    def _refs(self, mode: str, plan: prompting.GenerationPlan, llm_fields: dict[str, str]) -> list[list[str]] | None:
        """What candidates are compared with beside each other (profile modes, several candidates): the past
        outputs and profiles of the people whose context the prompt uses."""
        if self.job.generation.candidates < 2 or not prompting.mode_uses(mode)[0]:
            return None
        return selection.personal_refs(self.task, plan.people, llm_fields).to_list()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            queries, histories = chunk_queries(self.job, chunk)
            users = sorted({u for q in queries for u in q.user_ids})
            donor_info = {u: {"donor": d, "history": histories.get(d, [])}
                          for u, d in donors(users, self.job.generation.seed).items()} \
                if any(prompting.uses_donor(m) for m in self.job.modes) else {}
            profiles = self._profiles(chunk.get("profile_chunks") or [chunk["chunk_id"]])
            texts = {u: p["profile_text"] for u, p in profiles.items()}
            llm_fields = {u: profiling.render_profile(json.loads(p["profile_json"]), self.task, habits=False)
                          for u, p in profiles.items() if p["profile_json"]}
            retry = set(json.loads(chunk["retry"])) if chunk.get("retry") else None  # a rerun: the failed rows only

            def wanted(query_id: str, mode: str) -> bool:
                return retry is None or row_key(query_id, mode) in retry

            n_rows = sum(wanted(q.query_id, m) for q in queries for m in self.job.modes)
            for q in queries:
                lead = profiles.get(q.user_id, {})
                retriever = MemoRetriever(self.retriever)  # the query's modes share its retrieval
                for mode in self.job.modes:
                    if not wanted(q.query_id, mode):
                        continue
                    plan = prompting.plan_generation(self.task, q, mode, texts, donor_info, self.job.retrieval,
                                                     self.job.multi_author, retriever, self.tools,
                                                     self.job.max_new_tokens)
                    rows.append({
                        "chunk_id": chunk["chunk_id"], "chunk_rows": n_rows, "query_id": q.query_id, "mode": mode,
                        "user_id": q.user_id, "user_ids": q.user_ids, "input": q.input, "gold": q.gold,
                        "profile_text": lead.get("profile_text"), "profile_status": lead.get("status"),
                        "retrieved_ids": plan.retrieved_ids, "prompts": [p.text for p in plan.prompts],
                        "merge_json": json.dumps(plan.merge) if plan.merge else None, "truncated": plan.truncated,
                        "notes": plan.all_notes(), "history_items": len(q.profile),
                        "select_refs": self._refs(mode, plan, llm_fields),
                    })
            if self.plug is not None:
                chunk_rows = [r for r in rows if r["chunk_id"] == chunk["chunk_id"]]
                self._soft_tokens(chunk_rows, {q.query_id: q for q in queries},
                                  chunk.get("profile_chunks") or [chunk["chunk_id"]], donor_info)
        return _table(rows, _GEN_PLANNED)


class GenerationEngineStage:
    """Engine stage: every prompt of a block in one engine call; then the lead-author merges in a second one."""

    def __init__(self, job: JobSpec, engine=None):
        self.job, self.task = job, get_task(job.task)
        self.engine = engine or build_engine(job.engine)  # given: a caller running the stages in-process
        self.generate = EngineCalls(self.engine, job.engine.call_timeout_s, in_actor=engine is None)
        g = job.generation
        self.params = SamplingParams(max_new_tokens=job.max_new_tokens, min_new_tokens=g.min_new_tokens,
                                     temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                                     stop=tuple(g.stop) if g.stop is not None else self.task.stop)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        flat = [(i, p) for i, r in enumerate(rows) for p in r["prompts"]]
        soft = [rows[i].get("soft_tokens") for i, _ in flat]
        done = self.generate([p for _, p in flat], self.params,
                             soft if any(s is not None for s in soft) else None)
        per_row: dict[int, list] = {}
        for (i, _), c in zip(flat, done):
            per_row.setdefault(i, []).append(c)
        merges = []
        for i, r in enumerate(rows):
            comps = per_row.get(i, [])
            r.update(prompt=r["prompts"][-1] if r["prompts"] else None, proposals=[c.text for c in comps],
                     llm_calls=len(comps), prompt_tokens=sum(c.prompt_tokens for c in comps),
                     completion_tokens=sum(c.completion_tokens for c in comps),
                     engine_seconds=sum(c.seconds for c in comps),
                     engine_error="; ".join(c.error for c in comps if c.error) or None,
                     raw_output=comps[-1].text if comps else None,
                     finish_reason=comps[-1].finish_reason if comps else None)
            if r["merge_json"] and not r["engine_error"]:
                merge = json.loads(r["merge_json"])
                merges.append((r, self.engine.render(
                    prompting.merge_prompt(self.task, self.engine, merge, [self.task.parse(c.text) or c.text
                                                                           for c in comps]))))
            elif len(comps) == 1:
                r["proposals"] = []
        if merges:
            for (r, prompt), c in zip(merges, self.generate([m[1] for m in merges], self.params)):
                r.update(prompt=prompt, raw_output=c.text, finish_reason=c.finish_reason, llm_calls=r["llm_calls"] + 1,
                         prompt_tokens=r["prompt_tokens"] + c.prompt_tokens,
                         completion_tokens=r["completion_tokens"] + c.completion_tokens,
                         engine_seconds=r["engine_seconds"] + c.seconds, engine_error=c.error)
        if self.job.generation.candidates > 1:
            self._sample_candidates(rows, {id(r) for r, _ in merges})
        for r in rows:
            r.pop("soft_tokens", None)  # served; not an output column
        return pa.Table.from_pylist(rows)

    def _sample_candidates(self, rows: list[dict[str, Any]], merged: set[int]) -> None:
        """``candidates - 1`` sampled answers to each row's final prompt (the merge prompt after a lead-merge),
        beside the decoded one; the scoring stage keeps one of them. On vLLM the prompts' KV is still in the
        prefix cache from the decoded call, so this costs little more than the sampled tokens."""
        g = self.job.generation
        todo = [r for r in rows if not r["engine_error"] and r["prompt"]]
        params = dataclasses.replace(self.params, temperature=g.candidate_temperature, top_p=g.candidate_top_p,
                                     n=g.candidates - 1)
        soft = [None if id(r) in merged else r.get("soft_tokens") for r in todo]
        done = self.generate([r["prompt"] for r in todo], params,
                             soft if any(x is not None for x in soft) else None)
        for r, c in zip(todo, done):
            r.update(candidates=[r["raw_output"], *(c.samples or [c.text])] if not c.error else [r["raw_output"]],
                     llm_calls=r["llm_calls"] + 1, prompt_tokens=r["prompt_tokens"] + c.prompt_tokens,
                     completion_tokens=r["completion_tokens"] + c.completion_tokens,
                     engine_seconds=r["engine_seconds"] + c.seconds)
            if c.error:
                r["notes"] = r["notes"] + [f"sampled candidates failed ({c.error[:200]}); the decoded answer is kept"]


# ------------------------------------------------------------------------------------------------ commit
def row_key(query_id: str, mode: str) -> str:
    """A generation row's identity in a chunk (what a rerun retries)."""
    return f"{query_id}\t{mode}"


def _key(r: dict[str, Any]) -> str:
    return row_key(r["query_id"], r["mode"]) if "mode" in r else r["user_id"]


def _commit(job: JobSpec, folder: str, rows: list[dict[str, Any]], schema: pa.Schema,
            uri: str | None = None) -> list[dict[str, Any]]:
    """Write each complete chunk in ``rows`` as one file; refuse a chunk with rows missing. A chunk that already
    has a file (a rerun that retried its failed rows, or a block Ray retried after committing) is merged: the new
    rows replace the file's rows of the same key, the others are kept, so each key is written exactly once."""
    store = RunStore(uri or job.output_uri, job.storage)
    by_chunk: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_chunk.setdefault(r["chunk_id"], []).append(r)
    summaries = []
    for cid, part in sorted(by_chunk.items()):
        expected = part[0]["chunk_rows"]
        if len(part) != expected:
            raise RuntimeError(f"chunk {cid} reached the commit stage with {len(part)} of {expected} rows")
        rel = f"{folder}/chunk-{cid}.parquet"
        now = time.time()
        for r in part:
            r["committed_at"] = now
        if store.exists(rel):
            new = {_key(r) for r in part}
            part = [r for r in store.read_table(rel).to_pylist() if _key(r) not in new] + part
        store.write_table(rel, _table(part, schema))
        summaries.append({"chunk_id": cid, "file": rel, "rows": len(part),
                          "statuses": json.dumps(count_statuses(part))})
    return summaries


def count_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per status kind (:func:`~stepback_ray.data.rows.status_kind`)."""
    out: dict[str, int] = {}
    for r in rows:
        key = status_kind(r.get("status"))
        out[key] = out.get(key, 0) + 1
    return out


def commit_profiles(batch: pa.Table, job: JobSpec, at: ProfilesAt) -> pa.Table:
    rows = batch.to_pylist()
    summaries = _commit(job, at.folder, rows, PROFILE_SCHEMA, at.uri)
    for s in summaries:
        part = [r for r in rows if r["chunk_id"] == s["chunk_id"]]
        s["origins"] = json.dumps({o: sum(1 for r in part if r["origin"] == o) for o in {r["origin"] for r in part}})
    return pa.Table.from_pylist(summaries)


def score_and_commit_generations(batch: pa.Table, job: JobSpec, at: ProfilesAt | None = None) -> pa.Table:
    """CPU stage: parse each output for its task, score it against the gold, then commit the chunk (``at``, the
    profiles' location, is not needed here: every commit of :data:`PASSES` is called the same way)."""
    task = get_task(job.task)
    rows = batch.to_pylist()
    for r in rows:
        if r["engine_error"]:
            # scored as an empty answer, as the official evaluation scores a question without a prediction
            r.pop("select_refs", None)
            r.update(output=None, status=f"error: {r['engine_error']}")
            if r["gold"] is not None:
                r.update(metrics.score_row(task, None, r["gold"]))
            continue
        refs = selection.PersonalRefs.from_list(r.pop("select_refs", None))
        raws = r.get("candidates") or []
        if len(raws) > 1:  # several answers: keep one (consensus, and for profile modes the person)
            parsed = [task.parse(x or "") for x in raws]
            pick = selection.choose(task, parsed, refs)
            r.update(raw_output=raws[pick], candidates=[p or "" for p in parsed])
            if pick:
                r["notes"] = r["notes"] + [f"kept sampled candidate {pick} of {len(raws)}"]
        out = task.parse(r["raw_output"] or "")
        status = "truncated" if r["truncated"] else "ok"
        if out is None or (task.kind != "generation" and out not in task.labels):
            status = "unparsed"
            r["notes"] = r["notes"] + [f"output does not parse as a {task.name} answer: {r['raw_output']!r}"[:300]]
        r.update(output=out, status=status)
        if r["gold"] is not None:
            r.update(metrics.score_row(task, out, r["gold"]))
    return pa.Table.from_pylist(_commit(job, "generations", rows, GENERATION_SCHEMA))


# ------------------------------------------------------------------------------------------------ driver
def init_local_ray(object_store_gib: float | None = None, **kwargs: Any) -> None:
    """Start a local Ray (no cluster) sized for the pipeline.

    A pass runs two actor pools and a task stage at once, and two passes follow each other. Ray starts at most
    ``num_workers_soft_limit`` worker processes without delay (by default one per CPU); on a small machine the
    third process of a pass then waits seconds for a slot. Raising the limit costs nothing (logical CPUs, and so
    scheduling, stay as they are) and takes seconds off every pass. The workers get :data:`WORKER_ENV`."""
    import ray

    limit = max(8, 2 * (kwargs.get("num_cpus") or os.cpu_count() or 1))
    if object_store_gib:
        kwargs["object_store_memory"] = int(object_store_gib * 2 ** 30)
    ray.init(include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": dict(WORKER_ENV)},
             _system_config={"num_workers_soft_limit": limit}, **kwargs)


@contextlib.contextmanager
def ray_session(job: JobSpec) -> Iterator[None]:
    """Connect to the job's Ray cluster, or start a local one and shut it down afterwards."""
    import ray

    started = False
    if not ray.is_initialized():
        if job.ray.address or os.environ.get("RAY_ADDRESS"):  # a cluster (Ray Jobs set RAY_ADDRESS)
            connect_cluster(job.ray.address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        else:
            init_local_ray(job.ray.object_store_gib)
        started = True
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = job.ray.progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@dataclass(frozen=True)
class PassSpec:
    """One Ray Data pass, declared as data: a CPU stage (actors: it holds a tokenizer, a retriever or an encoder),
    optionally an engine stage (the LLM, on the engine actors), and the commit (tasks writing whole chunks).
    Every stage is built with ``job`` (and the CPU stage and the commit also with the profiles' location ``at``);
    each block is one chunk, passed whole from stage to stage."""

    cpu_stage: type
    engine_stage: type | None
    commit: Any
    cpu_stage_cpus: float = CPU_STAGE_CPUS
    """CPUs per CPU-stage actor (the sentence encoder of the embedding pass is a model: a whole CPU)."""


PASSES = {
    "profile": PassSpec(ProfilePlanStage, ProfileEngineStage, commit_profiles),
    "embed": PassSpec(EmbedStage, None, commit_embeddings, cpu_stage_cpus=1.0),
    "generate": PassSpec(GenerationPlanStage, GenerationEngineStage, score_and_commit_generations),
}
"""The passes a run is made of; a new pass is a new entry (its stages and commit), not a branch in the driver."""


def _run_pass(job: JobSpec, kind: str, chunks: list[dict[str, Any]], at: ProfilesAt | None) -> list[dict]:
    """Run the pass ``kind`` of :data:`PASSES` over ``chunks``; returns the commit summaries."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    if not chunks:
        return []
    spec = PASSES[kind]
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    ds = ds.map_batches(spec.cpu_stage, fn_constructor_kwargs={"job": job, "at": at},
                        compute=ActorPoolStrategy(size=job.ray.cpu_stage_actors), num_cpus=spec.cpu_stage_cpus,
                        **common)
    if spec.engine_stage is not None:
        res = engine_resources(job, ray.cluster_resources())
        # a fatal engine failure ends the actor (engines/guard.py): Ray restarts it, boundedly, and retries the block
        ds = ds.map_batches(spec.engine_stage, fn_constructor_kwargs={"job": job},
                            compute=ActorPoolStrategy(size=res.actors,
                                                      max_tasks_in_flight_per_actor=job.ray.engine_tasks_in_flight),
                            max_restarts=job.engine.max_restarts, max_task_retries=-1, **res.remote_args(), **common)
    ds = ds.map_batches(spec.commit, fn_kwargs={"job": job, "at": at}, num_cpus=CPU_STAGE_CPUS, **common)
    return _take_all(ds, job, kind)


def _take_all(ds, job: JobSpec, kind: str) -> list[dict]:
    """Run the pass; an engine actor that died past its restarts fails the run (exit 3) in one line."""
    import ray.exceptions

    try:
        return ds.take_all()
    except Exception as e:
        seen, cause = set(), e
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, ray.exceptions.RayActorError):
                raise RunFailed(f"the {kind} pass's engine actor died {job.engine.max_restarts + 1} times "
                                f"(engine.max_restarts = {job.engine.max_restarts}; the reasons are the 'stepback: "
                                "fatal engine failure' lines in the log); committed chunks are kept: fix the engine "
                                "and rerun the same run id") from e
            cause = cause.__cause__ or cause.__context__
        raise


@dataclass
class RunResult:
    output_uri: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def _pending(uri: str, folder: str, job: JobSpec, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks a (re)run still has to do: those without a committed file in ``folder``, and those whose file
    holds engine-error rows, with ``retry`` listing exactly those rows' keys (the others are kept)."""
    store = RunStore(uri, job.storage)
    done = {p.rsplit("/", 1)[-1] for p in store.list(folder, ".parquet")}
    out = []
    for c in chunks:
        name = f"chunk-{c['chunk_id']}.parquet"
        if name not in done:
            out.append({**c, "retry": None})
            continue
        table = store.read_table(f"{folder}/{name}")
        failed = [_key(r) for r in table.select([n for n in ("user_id", "query_id", "mode", "status")
                                                   if n in table.column_names]).to_pylist()
                  if status_kind(r.get("status")) == "error"]
        if failed:
            out.append({**c, "retry": json.dumps(failed)})
    return out


def _check_resume(store: RunStore, job: JobSpec) -> bool:
    """Record the run's spec at the start; on a rerun into the same output, insist that every key that changes
    results is the same (:data:`~stepback_ray.config.SPEED_ONLY_KEYS` may differ: a smaller batch after an
    out-of-memory crash, the fault switched off)."""
    from .config import SPEED_ONLY_KEYS, without_keys

    spec = job.results_dict()
    if store.exists("_run_spec.json"):
        previous = without_keys(store.read_json("_run_spec.json"), SPEED_ONLY_KEYS)
        if previous != spec:
            changed = sorted(_changed_keys(previous, spec))
            raise StepbackError(f"{job.output_uri} holds a run with a different job spec (changed: "
                                f"{', '.join(changed)}); choose another output or run_id")
        return True
    store.write_json("_run_spec.json", spec)
    return False


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two spec dicts."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [prefix.rstrip(".")] if a != b else []
    return [k for key in set(a) | set(b) for k in _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "stepback-ray": __version__}
    for pkg in ("ray", "torch", "transformers", "pyarrow", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def summarize(job: JobSpec, store: RunStore) -> tuple[dict[str, Any], dict[str, int]]:
    """Per-mode official metrics, token counts and statuses, streamed over the committed generation files (one
    file in memory at a time); the official-format predictions are written per mode on the way."""
    task = get_task(job.task)
    acc = {m: metrics.MetricAccumulator(task) for m in job.modes}
    tot = {m: {"queries": 0, "scored": 0, "prompt_tokens": 0, "completion_tokens": 0, "engine_seconds": 0.0,
               "users": set(), "statuses": {}} for m in job.modes}
    cols = ["query_id", "mode", "user_id", "gold", "output", "rouge1", "rougeL", "abs_error", "prompt_tokens",
            "completion_tokens", "engine_seconds", "status"]
    with contextlib.ExitStack() as stack:
        out = {m: stack.enter_context(store.writer(f"predictions/{m}.json")) for m in job.modes}
        first = {m: True for m in job.modes}
        for m in job.modes:  # the official outputs format, ready for `stepback score` or a LaMP submission
            out[m].write(json.dumps({"task": task.file_task})[:-1].encode() + b', "golds": [')
        for r in store.scan("generations", cols):
            m = r["mode"]
            t = tot[m]
            t["queries"] += 1
            t["users"].add(r["user_id"])
            t["prompt_tokens"] += r["prompt_tokens"]
            t["completion_tokens"] += r["completion_tokens"]
            t["engine_seconds"] += r["engine_seconds"]
            key = status_kind(r["status"])
            t["statuses"][key] = t["statuses"].get(key, 0) + 1
            if r["gold"] is not None:  # failed rows too (an empty answer): the metric predictions/ reproduces
                t["scored"] += 1
                acc[m].add(r["output"], r["gold"], r["rouge1"], r["rougeL"], r["abs_error"])
            sep = b"" if first[m] else b", "
            first[m] = False
            out[m].write(sep + json.dumps({"id": r["query_id"], "output": r["output"] or ""}).encode())
        for m in job.modes:
            out[m].write(b"]}\n")
    modes: dict[str, Any] = {}
    for m in job.modes:
        t = tot[m]
        secs = t["engine_seconds"]
        modes[m] = {"users": len(t["users"]), "queries": t["queries"], "scored": t["scored"], **acc[m].result(),
                    "prompt_tokens": t["prompt_tokens"], "completion_tokens": t["completion_tokens"],
                    "engine_seconds": round(secs, 3),
                    "tokens_per_s": round((t["prompt_tokens"] + t["completion_tokens"]) / secs, 1) if secs else None,
                    "statuses": t["statuses"]}
    statuses: dict[str, int] = {}
    for m in job.modes:
        for k, v in tot[m]["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    counts = {"generation_rows": sum(t["queries"] for t in tot.values()), "generation_rows_by_status": statuses,
              "queries_generated": max((t["queries"] for t in tot.values()), default=0)}
    return {"task": job.task, "metric": task.metric, "keys": list(metrics.OFFICIAL_KEYS[task.metric]),
            "modes": modes}, counts


def num_shards(job: JobSpec, lead_users: int | None) -> int:
    """The job's shard count: fixed in the spec, or about ``users_per_chunk`` lead users per shard (a dataset,
    whose size is not known before reading it, gets 256)."""
    if job.ray.num_shards != "auto":
        return int(job.ray.num_shards)
    if lead_users is None:
        return 256
    return max(1, -(-lead_users // job.ray.users_per_chunk))


@dataclass
class Work:
    """A job's input cut into chunks for the two passes, with the counts the manifest reports."""

    shards: int
    profile_chunks: list[dict[str, Any]]
    generation_chunks: list[dict[str, Any]]
    counts: dict[str, int]
    expected_queries: int | None


def prepare_work(job: JobSpec, needs_profiles: bool) -> Work | None:
    """Read (LaMP JSON: in the driver) or stage (datasets: a Ray Data pass) the input into per-shard chunks.
    Outside a Ray session only LaMP JSON is read (None for datasets): bad input then fails before Ray starts."""
    if job.input.format == "lamp":
        task = get_task(job.task)
        queries = read_lamp(job.input.questions, job.input.outputs, task, job.storage)
        groups = lead_groups(queries, job.limit)
        if not groups:
            raise StepbackError(f"{job.input.questions}: no questions to run")
        kept = [q for g in groups for q in g]
        users = collect_users(kept)
        shards = num_shards(job, len(groups))
        with_donors = any(prompting.uses_donor(m) for m in job.modes)
        histories = {u.user_id: u.history for u in users} if with_donors else None
        return Work(shards, profile_chunks(users, shards),
                    generation_chunks(groups, shards, needs_profiles, with_donors, histories),
                    {"queries_in": len(queries), "queries": len(kept), "users": len(users)}, len(kept))
    import ray

    if not ray.is_initialized():
        return None
    shards = num_shards(job, None)
    counts = stage_dataset(job, shards)
    if counts["rows_staged"] == 0:  # e.g. an upstream schema change: nothing to profile, not an empty success
        raise StepbackError(f"{job.input.path}: no valid records ({counts['rows_quarantined']} quarantined; the "
                            f"reason for each is in {job.output_uri}/quarantine/)")
    chunks = staged_chunks(job)
    return Work(shards, chunks, chunks, counts, None)


def profiles_target(job: JobSpec, shards: int, resuming: bool = False) -> tuple[ProfilesAt, StoreVersion | None]:
    if job.profile_store.uri:
        sv = open_version(job, shards, resuming)
        return ProfilesAt(job.profile_store.uri, sv.profiles_dir, sv.previous_profiles_dir, sv.full), sv
    return ProfilesAt(job.output_uri, "profiles"), None


def run_profile_pass(job: JobSpec, work: Work, resuming: bool = False) -> tuple[ProfilesAt, dict[str, Any]]:
    """Profile every user (carrying unchanged ones over from the store); commit the store version. A rerun
    whose version is already committed gets that version's stats back and redoes nothing."""
    t0 = time.time()
    at, sv = profiles_target(job, work.shards, resuming)
    if sv is not None and sv.committed is not None:
        stats = {k: v for k, v in sv.committed.items() if k not in ("run_id", "config", "files")}
        return at, {**stats, "chunks_committed_this_run": 0, "wall_s": round(time.time() - t0, 3)}
    summaries = _run_pass(job, "profile", _pending(at.uri, at.folder, job, work.profile_chunks), at)
    if any(prompting.uses_plug(m) for m in job.modes):  # item embeddings belong to the same store version
        _run_pass(job, "embed", _pending(at.uri, at.embeddings, job, work.profile_chunks), at)
    store = RunStore(at.uri, job.storage)
    origins = {"new": 0, "recomputed": 0, "incremental": 0, "carried": 0}
    sums = {"users": 0, "llm_calls": 0, "map_reduced_users": 0, "prompt_tokens": 0, "completion_tokens": 0}
    secs, statuses = 0.0, {}
    for r in store.scan(at.folder, ["status", "prompt_tokens", "completion_tokens", "engine_seconds", "llm_calls",
                                    "parts", "origin"]):
        origins[r["origin"]] = origins.get(r["origin"], 0) + 1
        sums["users"] += 1
        sums["llm_calls"] += r["llm_calls"]
        sums["map_reduced_users"] += int(r["parts"] > 1)
        sums["prompt_tokens"] += r["prompt_tokens"]
        sums["completion_tokens"] += r["completion_tokens"]
        secs += r["engine_seconds"]
        key = status_kind(r["status"])
        statuses[key] = statuses.get(key, 0) + 1
    toks = sums["prompt_tokens"] + sums["completion_tokens"]
    stats = {
        **sums, "statuses": statuses, "origins": origins, "quality": measure_profiles(job, at, work),
        "deleted": max(0, (sv.previous_users if sv else 0) - origins["recomputed"] - origins["incremental"]
                       - origins["carried"]),
        "engine_seconds": round(secs, 3), "tokens_per_s": round(toks / secs, 1) if secs else None,
        "chunks_committed_this_run": len(summaries), "wall_s": round(time.time() - t0, 3)}
    # over budget: the store's pointer does not move
    check_error_budget(job, "profiles", statuses.get("error", 0), sums["users"],
                       {"profiles": sums["users"], "profiles_by_status": statuses})
    if sv is not None:
        stats.update(store_uri=job.profile_store.uri, version=sv.version, previous=sv.previous, full_rebuild=sv.full)
        commit_version(sv, job, work.shards, {**stats, "run_id": job.run_id, "config": job.public_dict(),
                                              "files": store.list(at.folder, ".parquet")})
    return at, stats


def check_error_budget(job: JobSpec, what: str, errors: int, total: int, counts: dict[str, Any]) -> None:
    """Fail the pass when its engine-error rows exceed ``max_error_fraction`` of its rows; ``counts`` go into
    the failed run's manifest."""
    if errors and errors > job.max_error_fraction * total:
        raise ErrorBudgetExceeded(what, errors, total, job.max_error_fraction, counts)


def manifest_head(job: JobSpec, t_start: float, resumed: bool, status: str) -> dict[str, Any]:
    """The fields every manifest starts with (a finished run's, a profile job's, a failed run's)."""
    return {"run_id": job.run_id, "name": job.name, "output": job.output_uri, "resumed": resumed, "status": status,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": job.public_dict(),
            "versions": _versions()}


def failed_manifest(job: JobSpec, store: RunStore, t_start: float, resumed: bool, error: RunFailed) -> None:
    """What a failed run leaves for whoever looks: ``status: failed``, why, and the counts it reached."""
    store.write_json("manifest.json", {**manifest_head(job, t_start, resumed, "failed"), "error": str(error),
                                       "counts": getattr(error, "counts", {})})


def measure_profiles(job: JobSpec, at: ProfilesAt, work: Work) -> dict[str, Any]:
    """:mod:`~stepback_ray.profile_quality` over a sample of the pass's users: whole chunks in chunk order (hash
    shards, so independent of the input order) until :data:`~stepback_ray.profile_quality.SAMPLE_USERS`."""
    task = get_task(job.task)
    store = RunStore(at.uri, job.storage)
    users: list[tuple[dict[str, Any] | None, list]] = []
    for chunk in sorted(work.profile_chunks, key=lambda c: c["chunk_id"]):
        if len(users) >= profile_quality.SAMPLE_USERS:
            break
        rel = f"{at.folder}/chunk-{chunk['chunk_id']}.parquet"
        rows = {r["user_id"]: r for r in store.read_table(rel, columns=["user_id", "profile_json"]).to_pylist()}
        for u in chunk_users(job, chunk):
            raw = rows.get(u.user_id, {}).get("profile_json")
            users.append((json.loads(raw) if raw else None, u.history))
    users = users[:profile_quality.SAMPLE_USERS]
    return {"sample_users": len(users), **profile_quality.measure(
        task, users, lambda p: profiling.render_profile(p, task, habits=False),
        lambda p: profiling.render_profile(p, task))}


def run_job(job: JobSpec) -> RunResult:
    """Run the whole job: read, profile, generate, score, write. Returns the metrics and the manifest."""
    t_start = time.time()
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable(run_marker="_run_spec.json")  # empty, new, or this run's own (resumed)
    if job.input.format != "lamp" and job.input.layout == "item":
        raise StepbackError("input.layout 'item' holds histories only, no queries to generate for: profile it with "
                            "`stepback profile`, or give one row per user with its queries (layout: user)")
    needs_profiles = any(prompting.mode_uses(m)[0] for m in job.modes)
    PromptFormatter(job.engine)  # fail here, before any cluster work, if the model or its tokenizer is unusable
    work = prepare_work(job, needs_profiles)
    resumed = _check_resume(store, job)
    try:
        return _run_job(job, store, work, needs_profiles, resumed, t_start)
    except RunFailed as e:
        failed_manifest(job, store, t_start, resumed, e)
        raise


def _run_job(job: JobSpec, store: RunStore, work: Work | None, needs_profiles: bool, resumed: bool,
             t_start: float) -> RunResult:
    with ray_session(job):
        work = work or prepare_work(job, needs_profiles)
        timings: dict[str, float] = {"read_and_ray_start_s": round(time.time() - t_start, 3)}
        at, profile_stats = run_profile_pass(job, work, resumed) if needs_profiles else (None, None)
        timings["profile_pass_s"] = profile_stats["wall_s"] if profile_stats else 0.0
        if any(prompting.uses_plug(m) for m in job.modes) and at is None:  # pplug without profile modes
            t0 = time.time()
            at = ProfilesAt(job.output_uri, "profiles")
            _run_pass(job, "embed", _pending(at.uri, at.embeddings, job, work.profile_chunks), at)
            timings["embedding_pass_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        gen_summaries = _run_pass(job, "generate", _pending(job.output_uri, "generations", job, work.generation_chunks),
                                  at)
        timings["generation_pass_s"] = round(time.time() - t0, 3)

    result_metrics, gen_counts = summarize(job, store)
    if gen_counts["generation_rows"] == 0:
        raise StepbackError(f"{job.input.path or job.input.questions}: no queries to generate for (a dataset with "
                            "layout: user needs a `queries` list in its rows)")
    by_status = gen_counts["generation_rows_by_status"]
    check_error_budget(job, "generation rows", by_status.get("error", 0), gen_counts["generation_rows"],
                       {"generation_rows": gen_counts["generation_rows"], "generation_rows_by_status": by_status})
    if profile_stats:
        result_metrics["profiles"] = profile_stats
    store.write_json("metrics.json", result_metrics)
    timings["total_s"] = round(time.time() - t_start, 3)
    queries = work.expected_queries if work.expected_queries is not None else gen_counts["queries_generated"]
    expected = queries * len(job.modes)
    generated = gen_counts["generation_rows"]
    manifest = {
        **manifest_head(job, t_start, resumed, "ok"),
        "counts": {**work.counts, "shards": work.shards, "profile_chunks": len(work.profile_chunks)
                   if needs_profiles else 0, "generation_chunks": len(work.generation_chunks),
                   "generation_rows": generated, "expected_generation_rows": expected,
                   "generation_rows_by_status": gen_counts["generation_rows_by_status"]},
        "chunks_committed_this_run": {"profiles": profile_stats["chunks_committed_this_run"] if profile_stats else 0,
                                      "generations": len(gen_summaries)},
        "profiles": {"uri": at.uri, "folder": at.folder} if at else None,
        "files": {"generations": store.list("generations", ".parquet"),
                  "predictions": [f"predictions/{m}.json" for m in job.modes], "metrics": "metrics.json"},
        "timings": timings,
    }
    if generated != expected:
        raise StepbackError(f"{job.output_uri}: {generated} generation rows committed, expected {expected}")
    store.write_json("manifest.json", manifest)
    from .report import build_report

    build_report(job.output_uri, job.storage)
    return RunResult(job.output_uri, result_metrics, manifest)


def run_profile_job(job: JobSpec) -> RunResult:
    """Profile only (the nightly job): every user of the input, unchanged ones carried over from the store."""
    t_start = time.time()
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable(run_marker="_run_spec.json")  # empty, new, or this run's own (resumed)
    PromptFormatter(job.engine)
    work = prepare_work(job, needs_profiles=True)
    resumed = _check_resume(store, job)
    try:
        with ray_session(job):
            work = work or prepare_work(job, needs_profiles=True)
            at, stats = run_profile_pass(job, work, resumed)
    except RunFailed as e:
        failed_manifest(job, store, t_start, resumed, e)
        raise
    manifest = {**manifest_head(job, t_start, resumed, "ok"), "counts": {**work.counts, "shards": work.shards},
                "profiles": {"uri": at.uri, "folder": at.folder, **stats},
                "timings": {"total_s": round(time.time() - t_start, 3)}}
    store.write_json("manifest.json", manifest)
    return RunResult(job.output_uri, {"profiles": stats}, manifest)
