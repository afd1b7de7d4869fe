"""The generation pass: a chunk of queries -> for each query and mode, the user's profile (read from the profile
chunks that hold it) and retrieved items -> prompts (CPU) -> engine (proposals, then the lead-author merges of
co-authored queries, then sampled candidates where ``generation.candidates`` > 1) -> parse, select and score
(CPU) -> commit ``generations/chunk-<id>.parquet``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pyarrow as pa

from stepback_ray import profiling
from stepback_ray.config import JobSpec
from stepback_ray.data import donors
from stepback_ray.data.rows import Query, most_recent_first
from stepback_ray.engines import Request, SamplingParams
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.evaluation import metrics
from stepback_ray.generation import prompting, selection
from stepback_ray.generation.retrieval import MemoRetriever, build_retriever
from stepback_ray.pipeline.chunks import ProfilesAt, chunk_queries
from stepback_ray.pipeline.commit import commit_chunks
from stepback_ray.pipeline.engine_stage import EngineStage
from stepback_ray.pipeline.profile_pass import profiled_authors
from stepback_ray.pipeline.schemas import GENERATION_SCHEMA, PLANNED_GENERATION_SCHEMA, row_key, table
from stepback_ray.pipeline.stages import PassSpec, Stage
from stepback_ray.storage import RunStore
from stepback_ray.tasks import get_task


class GenerationPlanStage:
    """CPU stage: a chunk of queries -> one row per (query, mode) with its rendered prompts."""

    def __init__(self, job: JobSpec, at: ProfilesAt | None):
        self.job, self.task, self.at = job, get_task(job.task), at
        self.tools = PromptFormatter(job.engine)
        self.retriever = build_retriever(job.retrieval)
        self.store = RunStore(at.uri, job.storage) if at else None
        self.plug = None
        if any(prompting.uses_plug(m) for m in job.modes):
            from stepback_ray.pplug.serving import PlugServer  # deferred: imports torch

            self.plug = PlugServer(job)

    def leads(self, queries: list[Query]) -> set[str] | None:
        """The lead authors of ``queries`` when the job profiles only them (their random-profile donors are then
        other leads, whose profiles exist); None when every author is profiled."""
        return {q.user_id for q in queries} if profiled_authors(self.job) == "lead" else None

    def _embeddings(self, chunk_ids: list[str]) -> dict[str, dict[str, list[float]]]:
        out: dict[str, dict[str, list[float]]] = {}
        for cid in chunk_ids:
            rel = f"{self.at.embeddings}/chunk-{cid}.parquet"
            if self.store.exists(rel):
                for r in self.store.read_table(rel, columns=["user_id", "item_ids", "vectors"]).to_pylist():
                    out[r["user_id"]] = dict(zip(r["item_ids"], r["vectors"]))
        return out

    def _soft_tokens(
        self,
        rows: list[dict[str, Any]],
        queries: dict[str, Query],
        chunk_ids: list[str],
        donor_info: dict[str, dict[str, Any]],
    ) -> None:
        """Soft tokens for the rows of Persona-Plug modes: from the lead user's items visible to the query, or for
        a donor mode (pplug-random) from the donor's history, with the query's own input."""
        wanted = [r for r in rows if prompting.uses_plug(r["mode"])]
        if not wanted:
            return
        vectors = self._embeddings(chunk_ids)
        requests = []
        for r in wanted:
            q = queries[r["query_id"]]
            owner, history = q.user_id, q.history
            if prompting.uses_donor(r["mode"]):
                d = donor_info.get(q.user_id)
                owner, history = (d["donor"], d["history"]) if d else (None, [])
            have = vectors.get(owner, {})
            items = [it for it in most_recent_first(history) if it["id"] in have][: self.plug.max_items]
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
                    table = self.store.read_table(
                        rel, columns=["user_id", "profile_text", "profile_json", "status", "fingerprint"]
                    )
                    out.update({r["user_id"]: r for r in table.to_pylist()})
        return out

    def _lineage(
        self, mode: str, plan: prompting.GenerationPlan, profiles: dict[str, dict[str, Any]]
    ) -> dict[str, str | None]:
        """Which profile the row's prompt used: the store version and the profile row's fingerprint, of the lead
        persona (the lead author, or their donor under the controls); nulls when the mode shows no profile."""
        if not prompting.mode_uses(mode)[0]:
            return {"profile_version": None, "profile_fingerprint": None}
        lead = plan.people[0] if plan.people else None
        used = profiles.get(lead.user_id, {}) if lead is not None and lead.profile_text else {}
        return {"profile_version": self.at.version if self.at else None, "profile_fingerprint": used.get("fingerprint")}

    def _refs(self, mode: str, plan: prompting.GenerationPlan, llm_fields: dict[str, str]) -> list[list[str]] | None:
        """What candidates are compared with beside each other: for the proposals of a strategy that keeps one
        (``consensus``), the lead persona's past outputs (and, in profile modes, profile); for several sampled
        candidates in a profile mode, the past outputs and profiles of the people whose context the prompt uses."""
        if prompting.keeps_a_proposal(plan.merge):
            fields = llm_fields if prompting.mode_uses(mode)[0] else {}
            return selection.personal_refs(self.task, plan.people[:1], fields).to_list()
        if self.job.generation.candidates < 2 or not prompting.mode_uses(mode)[0]:
            return None
        return selection.personal_refs(self.task, plan.people, llm_fields).to_list()

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            queries, histories = chunk_queries(self.job, chunk)
            users = sorted({u for q in queries for u in q.user_ids})
            donor_info = (
                {
                    u: {"donor": d, "history": histories.get(d, [])}
                    for u, d in donors(users, self.job.generation.seed, self.leads(queries)).items()
                }
                if any(prompting.uses_donor(m) for m in self.job.modes)
                else {}
            )
            profiles = self._profiles(chunk.get("profile_chunks") or [chunk["chunk_id"]])
            texts = {u: p["profile_text"] for u, p in profiles.items()}
            llm_fields = {
                u: profiling.render_profile(json.loads(p["profile_json"]), self.task, habits=False)
                for u, p in profiles.items()
                if p["profile_json"]
            }
            retry = set(json.loads(chunk["retry"])) if chunk.get("retry") else None  # a rerun: the failed rows only

            def wanted(query_id: str, mode: str, retry: set | None = retry) -> bool:
                return retry is None or row_key(query_id, mode) in retry

            n_rows = sum(wanted(q.query_id, m) for q in queries for m in self.job.modes)
            for q in queries:
                lead = profiles.get(q.user_id, {})
                retriever = MemoRetriever(self.retriever)  # the query's modes share its retrieval
                for mode in self.job.modes:
                    if not wanted(q.query_id, mode):
                        continue
                    plan = prompting.plan_generation(
                        self.task,
                        q,
                        mode,
                        texts,
                        donor_info,
                        self.job.retrieval,
                        self.job.multi_author,
                        retriever,
                        self.tools,
                        self.job.max_new_tokens,
                    )
                    rows.append(
                        {
                            "chunk_id": chunk["chunk_id"],
                            "chunk_rows": n_rows,
                            "query_id": q.query_id,
                            "mode": mode,
                            "user_id": q.user_id,
                            "user_ids": q.user_ids,
                            "input": q.input,
                            "gold": q.gold,
                            "profile_text": lead.get("profile_text"),
                            "profile_status": lead.get("status"),
                            "retrieved_ids": plan.retrieved_ids,
                            "prompts": [p.text for p in plan.prompts],
                            "merge_json": json.dumps(plan.merge) if plan.merge else None,
                            "truncated": plan.truncated,
                            "notes": plan.all_notes(),
                            "history_items": len(q.history),
                            "select_refs": self._refs(mode, plan, llm_fields),
                            "context_user_ids": [p.user_id for p in plan.people],
                            **self._lineage(mode, plan, profiles),
                        }
                    )
            if self.plug is not None:
                chunk_rows = [r for r in rows if r["chunk_id"] == chunk["chunk_id"]]
                self._soft_tokens(
                    chunk_rows,
                    {q.query_id: q for q in queries},
                    chunk.get("profile_chunks") or [chunk["chunk_id"]],
                    donor_info,
                )
        return table(rows, PLANNED_GENERATION_SCHEMA)


class GenerationEngineStage(EngineStage):
    """Engine stage: every prompt of a block in one engine call; then the lead-author merges in a second one."""

    def __init__(self, job: JobSpec, **given: Any):
        super().__init__(job, **given)
        self.task = get_task(job.task)
        g = job.generation
        self.params = SamplingParams(
            max_new_tokens=job.max_new_tokens,
            min_new_tokens=g.min_new_tokens,
            temperature=g.temperature,
            top_p=g.top_p,
            seed=g.seed,
            stop=tuple(g.stop) if g.stop is not None else self.task.stop,
        )

    def serve(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        flat = [(i, Request(p, r.get("soft_tokens"))) for i, r in enumerate(rows) for p in r["prompts"]]
        done = self.generate([req for _, req in flat], self.params)
        per_row: dict[int, list] = {}
        for (i, _), c in zip(flat, done):
            per_row.setdefault(i, []).append(c)
        merges = []
        for i, r in enumerate(rows):
            comps = per_row.get(i, [])
            r.update(
                prompt=r["prompts"][-1] if r["prompts"] else None,
                proposals=[c.text for c in comps],
                llm_calls=len(comps),
                prompt_tokens=sum(c.prompt_tokens for c in comps),
                cached_prompt_tokens=sum(c.cached_tokens for c in comps),
                completion_tokens=sum(c.completion_tokens for c in comps),
                engine_seconds=sum(c.seconds for c in comps),
                engine_error="; ".join(c.error for c in comps if c.error) or None,
                raw_output=comps[-1].text if comps else None,
                finish_reason=comps[-1].finish_reason if comps else None,
            )
            merge = _merge_of(r)
            if prompting.keeps_a_proposal(merge) and comps:  # the scoring stage keeps one; the lead's until then
                r.update(prompt=r["prompts"][0], raw_output=comps[0].text, finish_reason=comps[0].finish_reason)
            elif prompting.needs_merge_call(merge) and not r["engine_error"]:
                merges.append(
                    (
                        r,
                        prompting.rendered_merge_prompt(self.task, self.engine, merge, [c.text for c in comps]),
                    )
                )
            elif len(comps) == 1:
                r["proposals"] = []
        if merges:
            for (r, prompt), c in zip(merges, self.generate([m[1] for m in merges], self.params)):
                r.update(
                    prompt=prompt,
                    raw_output=c.text,
                    finish_reason=c.finish_reason,
                    llm_calls=r["llm_calls"] + 1,
                    prompt_tokens=r["prompt_tokens"] + c.prompt_tokens,
                    cached_prompt_tokens=r["cached_prompt_tokens"] + c.cached_tokens,
                    completion_tokens=r["completion_tokens"] + c.completion_tokens,
                    engine_seconds=r["engine_seconds"] + c.seconds,
                    engine_error=c.error,
                )
        if self.job.generation.candidates > 1:
            self._sample_candidates(rows, {id(r) for r, _ in merges})
        for r in rows:
            r.pop("soft_tokens", None)  # served; not an output column
        return pa.Table.from_pylist(self.stamp(rows))

    def _sample_candidates(self, rows: list[dict[str, Any]], merged: set[int]) -> None:
        """``candidates - 1`` sampled answers to each row's final prompt (the merge prompt after a lead-merge),
        beside the decoded one; the scoring stage keeps one of them. On vLLM the prompts' KV is still in the
        prefix cache from the decoded call, so this costs little more than the sampled tokens."""
        g = self.job.generation
        todo = [
            r for r in rows if not r["engine_error"] and r["prompt"] and not prompting.keeps_a_proposal(_merge_of(r))
        ]  # a strategy that keeps a proposal chooses among the authors' proposals instead
        params = dataclasses.replace(
            self.params, temperature=g.candidate_temperature, top_p=g.candidate_top_p, n=g.candidates - 1
        )
        done = self.generate(
            [Request(r["prompt"], None if id(r) in merged else r.get("soft_tokens")) for r in todo], params
        )
        for r, c in zip(todo, done):
            r.update(
                candidates=[r["raw_output"], *(c.samples or [c.text])] if not c.error else [r["raw_output"]],
                llm_calls=r["llm_calls"] + 1,
                prompt_tokens=r["prompt_tokens"] + c.prompt_tokens,
                cached_prompt_tokens=r["cached_prompt_tokens"] + c.cached_tokens,
                completion_tokens=r["completion_tokens"] + c.completion_tokens,
                engine_seconds=r["engine_seconds"] + c.seconds,
            )
            if c.error:
                r["notes"] = r["notes"] + [f"sampled candidates failed ({c.error[:200]}); the decoded answer is kept"]


def score_and_commit_generations(batch: pa.Table, job: JobSpec, at: ProfilesAt | None = None) -> pa.Table:
    """CPU stage: parse each output for its task, score it against the gold, then commit the chunk (``at``, the
    profiles' location, is not needed here: every commit stage is called the same way)."""
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
        if prompting.keeps_a_proposal(_merge_of(r)):
            _keep_a_proposal(task, r, refs)
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
    return pa.Table.from_pylist(commit_chunks(job, "generations", rows, GENERATION_SCHEMA))


def _merge_of(row: dict[str, Any]) -> dict[str, Any] | None:
    """How a row's proposals become its answer (the plan's ``merge``), or None for a one-prompt row."""
    return json.loads(row["merge_json"]) if row.get("merge_json") else None


def _keep_a_proposal(task, row: dict[str, Any], refs: selection.PersonalRefs) -> None:
    """``consensus``: the authors' proposal that agrees most with the others and with the lead persona's own
    past outputs (and profile) becomes the row's answer, and its prompt the row's prompt."""
    raws = row.get("proposals") or []
    if len(raws) < 2:
        return
    pick = selection.choose(task, [task.parse(x or "") for x in raws], refs)
    row.update(raw_output=raws[pick], prompt=row["prompts"][pick])
    row["notes"] = row["notes"] + [f"kept the proposal of author {pick + 1} of {len(raws)}"]


GENERATION_PASS = PassSpec(
    "generation",
    (
        Stage("generation_plan", GenerationPlanStage, "cpu"),
        Stage("generation_engine", GenerationEngineStage, "engine", takes_at=False),
        Stage("score_and_commit", score_and_commit_generations, "commit"),
    ),
    over="queries",
    commits_to=lambda job, at: (job.output_uri, "generations"),
    needed=lambda job, command: command == "run",
)
