"""The profile pass: a chunk of users -> plan each history into parts (CPU, tokenizer only) -> distill on the
engine (style notes, part profiles, merges) -> commit ``profiles/chunk-<id>.parquet``.

With a profile store the plan stage carries unchanged users over from the previous version (and plans grown
histories as incremental updates); a chunk retried after engine errors keeps its good rows and plans only the
failed users again.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa

from stepback_ray import profiling
from stepback_ray.config import JobSpec
from stepback_ray.data.rows import UserHistory, status_kind
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.errors import DamagedFile
from stepback_ray.generation import prompting
from stepback_ray.modes import AUTHOR_STRATEGIES
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_users
from stepback_ray.pipeline.commit import commit_chunks
from stepback_ray.pipeline.engine_stage import EngineStage
from stepback_ray.pipeline.schemas import PLANNED_PROFILE_SCHEMA, PROFILE_SCHEMA, table, with_chunk_rows
from stepback_ray.pipeline.stages import Command, PassSpec, Stage
from stepback_ray.storage import RunStore
from stepback_ray.store.integrity import VersionFiles, note_base_damage
from stepback_ray.tasks import get_task


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
        self.base = VersionFiles(self.store, at.previous.rsplit("/", 1)[0]) if at.previous else None

    def _previous(self, chunk_id: str) -> tuple[dict[str, dict[str, Any]], str | None]:
        """The base version's rows of the chunk, checked against its checksum, and a note for its users when the
        file is damaged: then nothing is carried, and the version's manifest names the file."""
        if self.base is None:
            return {}, None
        rel = f"{self.at.previous}/chunk-{chunk_id}.parquet"
        if not self.store.exists(rel):
            return {}, None
        try:
            rows = self.base.read(rel).to_pylist()
        except DamagedFile as e:
            note_base_damage(self.store, self.at.version, e, rel)
            return {}, f"profiled again: the base version's {rel} is damaged ({e.problem})"
        return {r["user_id"]: r for r in rows}, None

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
        if (
            prev is not None
            and not self.at.full
            and self.job.profile_store.incremental
            and prev["profile_json"]
            and old < set(ids)
            and prev["fingerprint"]
            == profiling.fingerprint(
                [it for it in u.history if it["id"] in old], self.job.engine, self.job.profile, self.task.name
            )
        ):
            plan = profiling.plan_profile(
                u.user_id,
                [it for it in u.history if it["id"] not in old],
                self.task,
                self.job.profile,
                self.tools,
                self.budget,
            )
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
            previous, damaged = self._previous(chunk["chunk_id"])
            retained = self._retained(chunk)
            for u in users:
                fp = profiling.fingerprint(u.history, self.job.engine, self.job.profile, self.task.name)
                row = {
                    "chunk_id": chunk["chunk_id"],
                    "chunk_rows": len(users),
                    "user_id": u.user_id,
                    "fingerprint": fp,
                    "history_ids": [it["id"] for it in u.history],
                    "notes": [],
                    "recent_items": profiling.recent_items(u.history, self.task),
                }
                if u.user_id in retained and retained[u.user_id]["fingerprint"] == fp:
                    rows.append(
                        {
                            **row,
                            "origin": retained[u.user_id]["origin"],
                            "retained": True,
                            "carried_json": json.dumps(retained[u.user_id], default=str),
                        }
                    )
                    continue
                prev = previous.get(u.user_id)
                # unchanged: carry over, except in a full rebuild a profile that came from incremental updates, and
                # never a profile the engine failed on (the next run retries it)
                failed = prev is not None and status_kind(prev.get("status")) == "error"
                if (
                    prev is not None
                    and not failed
                    and prev["fingerprint"] == fp
                    and (not self.at.full or prev.get("exact", True))
                ):
                    rows.append({**row, "origin": "carried", "carried_json": json.dumps(prev, default=str)})
                    continue
                plan, origin = self._plan(u, prev)
                if plan.items_dropped:
                    row["notes"] = [
                        f"profile from the newest {plan.items_used} of {plan.items_total} items "
                        f"({plan.items_dropped} older items over profile.max_parts)"
                    ]
                if damaged:  # (a user new tonight in that chunk is counted as recomputed too: the file cannot say)
                    origin, row["notes"] = "recomputed", [*row["notes"], damaged]
                rows.append({**row, "origin": origin, "plan_json": json.dumps(plan.to_dict())})
        return table(rows, PLANNED_PROFILE_SCHEMA)


class ProfileEngineStage(EngineStage):
    """Engine stage: distills every planned user of a block (notes, parts, merges: one batched call per level)."""

    def __init__(self, job: JobSpec, **given: Any):
        super().__init__(job, **given)
        self.task = get_task(job.task)
        self.distiller = profiling.Distiller(
            self.task, job.profile, self.engine, lambda prompts, params: self.generate(prompts, params)
        )

    def serve(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        carried = [r for r in rows if r["carried_json"]]
        todo = [r for r in rows if not r["carried_json"]]
        plans = [profiling.ProfilePlan.from_dict(json.loads(r["plan_json"])) for r in todo]
        out = [
            {
                **json.loads(r["carried_json"]),
                "chunk_id": r["chunk_id"],
                "chunk_rows": r["chunk_rows"],
                "recent_items": r["recent_items"],
            }
            | (
                {}
                if r["retained"]
                else {  # retained: this pass's own row
                    "origin": "carried",
                    "llm_calls": 0,
                    "prompt_tokens": 0,
                    "cached_prompt_tokens": 0,
                    "completion_tokens": 0,
                    "engine_seconds": 0.0,
                }
            )
            for r in carried
        ]
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
            out.append(
                {
                    **r,
                    "task": self.task.name,
                    "status": res.status,
                    "profile_json": json.dumps(res.profile) if res.profile is not None else None,
                    "profile_text": profiling.render_profile(res.profile, self.task) if res.profile else "",
                    "items_total": plan.items_total,
                    "items_used": len(item_ids),
                    "items_dropped": plan.items_dropped,
                    "parts": len(plan.parts),
                    "item_ids": item_ids,
                    "partials_json": json.dumps(res.partials) if len(res.partials) > 1 else None,
                    "style_notes_json": json.dumps(res.notes) if res.notes else None,
                    "prompt": res.prompt,
                    "raw_output": res.raw_output,
                    "llm_calls": res.llm_calls,
                    "prompt_tokens": res.prompt_tokens,
                    "cached_prompt_tokens": res.cached_prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "engine_seconds": res.engine_seconds,
                    "model": self.job.engine.model,
                    "prompt_version": profiling.PROMPT_VERSION,
                    "notes": notes,
                    "run_id": self.job.run_id,
                    "exact": plan.base_profile is None,
                }
            )
        return table(self.stamp(out), with_chunk_rows(PROFILE_SCHEMA))


def commit_profiles(batch: pa.Table, job: JobSpec, at: ProfilesAt) -> pa.Table:
    """Commit stage: each chunk's profiles as one file, with the chunk's origins (new, carried, ...) counted."""
    rows = batch.to_pylist()
    summaries = commit_chunks(job, at.folder, rows, PROFILE_SCHEMA, at.uri)
    for s in summaries:
        part = [r for r in rows if r["chunk_id"] == s["chunk_id"]]
        s["origins"] = json.dumps({o: sum(1 for r in part if r["origin"] == o) for o in {r["origin"] for r in part}})
    return pa.Table.from_pylist(summaries)


def needs_profiles(job: JobSpec, command: Command = "run") -> bool:
    """``stepback profile`` profiles every user; ``stepback run`` where one of its modes reads a profile."""
    return command == "profile" or any(prompting.mode_uses(m)[0] for m in job.modes)


Profiled = Literal["lead", "all"] | None
"""Whose profiles a job computes: no one, the lead author of each query, or every author."""


def profiled_authors(job: JobSpec, command: Command = "run") -> Profiled:
    """``stepback profile`` profiles every author; ``stepback run`` profiles the authors its prompts show a profile
    of: only lead authors under a ``multi_author.strategy`` that shows the lead's alone (a co-authored paper's
    other authors are then retrieved from, never profiled), every author otherwise, no one when no mode reads a
    profile. A run that writes a profile store profiles every author: a store version holds every user of its
    input. On single-author tasks the two are the same users."""
    if not needs_profiles(job, command):
        return None
    if command == "profile" or job.profile_store.uri or AUTHOR_STRATEGIES[job.multi_author.strategy].coauthor_profiles:
        return "all"
    return "lead"


PROFILE_PASS = PassSpec(
    "profile",
    (
        Stage("profile_plan", ProfilePlanStage, "cpu"),
        Stage("profile_engine", ProfileEngineStage, "engine", takes_at=False),
        Stage("commit_profiles", commit_profiles, "commit"),
    ),
    over="users",
    commits_to=lambda job, at: (at.uri, at.folder),
    needed=needs_profiles,
)
