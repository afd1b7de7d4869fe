"""The batch job as two Ray Data passes, joined by user through the run's profile files.

**Profile pass** (per user): chunk of users -> plan the history into parts (CPU, tokenizer only) -> distill
(engine actor pool: style notes, part profiles, merges) -> commit ``profiles/chunk-<id>.parquet``.
**Generation pass** (per query and mode): chunk of queries -> the users' profiles (read from the profile chunks
that hold them) + retrieval -> prompts (CPU) -> engine (proposals, then lead-author merges for co-authored
queries) -> parse and score (CPU) -> commit ``generations/chunk-<id>.parquet``.

A *chunk* (see :mod:`stepback_ray.data.rows`) is one Ray Data block from start to end: every stage maps a whole
block (``batch_size=None``) to a whole block, so the commit stage writes each chunk as one file, atomically, and
checks that no row is missing. A rerun with the same ``run_id`` skips committed chunks. Engines are built inside
their actors from the job spec; CPU stages load only the tokenizer (and the retriever). After both passes the
driver reads back the score columns, writes ``metrics.json``, and writes ``manifest.json`` last.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from . import __version__, metrics, profiling, prompting
from .config import JobSpec
from .data import collect_users, decode_queries, decode_users, donors, generation_chunks, lead_groups, profile_chunks
from .data.lamp import read_lamp
from .engines import SamplingParams, build_engine
from .engines.formatting import PromptFormatter
from .errors import StepbackError
from .resources import engine_resources
from .retrieval import build_retriever
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
    ("prompt_version", _S), ("notes", _LS),
])
GENERATION_SCHEMA = pa.schema([
    ("chunk_id", _S), ("query_id", _S), ("mode", _S), ("user_id", _S), ("user_ids", _LS), ("task", _S),
    ("input", _S), ("gold", _S), ("profile_text", _S), ("profile_status", _S), ("retrieved_ids", _LS),
    ("prompt", _S), ("proposals", _LS), ("raw_output", _S), ("output", _S), ("score", _F), ("rouge1", _F),
    ("rougeL", _F), ("abs_error", _F), ("prompt_tokens", _I), ("completion_tokens", _I), ("engine_seconds", _F),
    ("llm_calls", _I), ("finish_reason", _S), ("truncated", _B), ("status", _S), ("notes", _LS),
])
_PLANNED = pa.schema([("chunk_id", _S), ("chunk_rows", _I), ("user_id", _S), ("plan_json", _S), ("fingerprint", _S),
                      ("notes", _LS)])
_GEN_PLANNED = pa.schema([
    ("chunk_id", _S), ("chunk_rows", _I), ("query_id", _S), ("mode", _S), ("user_id", _S), ("user_ids", _LS),
    ("input", _S), ("gold", _S), ("profile_text", _S), ("profile_status", _S), ("retrieved_ids", _LS),
    ("prompts", _LS), ("merge_json", _S), ("truncated", _B), ("notes", _LS),
])


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def _with_chunk_rows(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("chunk_rows", _I))


# ------------------------------------------------------------------------------------------------ profile pass
class ProfilePlanStage:
    """CPU stage: a chunk of users -> one row per user with the history planned into prompt-sized parts."""

    def __init__(self, job: JobSpec):
        self.job, self.task = job, get_task(job.task)
        self.tools = PromptFormatter(job.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = decode_users(chunk["payload"])
            for u in users:
                plan = profiling.plan_profile(u.user_id, u.history, self.task, self.job.profile, self.tools)
                notes = [f"profile from the newest {plan.items_used} of {plan.items_total} items "
                         f"({plan.items_dropped} older items over profile.max_parts)"] if plan.items_dropped else []
                rows.append({"chunk_id": chunk["chunk_id"], "chunk_rows": len(users), "user_id": u.user_id,
                             "plan_json": json.dumps(plan.to_dict()), "notes": notes,
                             "fingerprint": profiling.fingerprint(u.history, self.job.engine.model, self.job.profile,
                                                                  self.task.name)})
        return _table(rows, _PLANNED)


class ProfileEngineStage:
    """Engine stage: distills every planned user of a block (notes, parts, merges: one batched call per level)."""

    def __init__(self, job: JobSpec):
        self.job, self.task = job, get_task(job.task)
        self.engine = build_engine(job.engine)
        self.distiller = profiling.Distiller(self.task, job.profile, self.engine, self.engine.generate)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        plans = [profiling.ProfilePlan.from_dict(json.loads(r["plan_json"])) for r in rows]
        schema = self.task.profile
        out = []
        for r, plan, res in zip(rows, plans, self.distiller.run(plans)):
            notes = list(r["notes"])
            if not plan.parts:
                notes.append("profile skipped: empty history")
            out.append({
                **r, "task": self.task.name, "status": res.status,
                "profile_json": json.dumps(res.profile) if res.profile is not None else None,
                "profile_text": profiling.render_profile(res.profile, schema) if res.profile else "",
                "items_total": plan.items_total, "items_used": plan.items_used, "items_dropped": plan.items_dropped,
                "parts": len(plan.parts), "item_ids": [s.item_id for p in plan.parts for s in p],
                "partials_json": json.dumps(res.partials) if len(res.partials) > 1 else None,
                "style_notes_json": json.dumps(res.notes) if res.notes else None,
                "prompt": res.prompt, "raw_output": res.raw_output, "llm_calls": res.llm_calls,
                "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                "engine_seconds": res.engine_seconds, "model": self.job.engine.model,
                "prompt_version": profiling.PROMPT_VERSION, "notes": notes,
            })
        return _table(out, _with_chunk_rows(PROFILE_SCHEMA))


# ------------------------------------------------------------------------------------------------ generation pass
class GenerationPlanStage:
    """CPU stage: a chunk of queries -> one row per (query, mode) with its rendered prompts."""

    def __init__(self, job: JobSpec, with_profiles: bool):
        self.job, self.task, self.with_profiles = job, get_task(job.task), with_profiles
        self.tools = PromptFormatter(job.engine)
        self.retriever = build_retriever(job.retrieval)
        self.store = RunStore(job.output_uri, job.storage)

    def _profiles(self, chunk_ids: list[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        if self.with_profiles:
            for cid in chunk_ids:
                table = self.store.read_table(f"profiles/chunk-{cid}.parquet",
                                              columns=["user_id", "profile_text", "status"])
                out.update({r["user_id"]: r for r in table.to_pylist()})
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            queries, donor_info = decode_queries(chunk["payload"])
            profiles = self._profiles(chunk["profile_chunks"])
            texts = {u: p["profile_text"] for u, p in profiles.items()}
            n_rows = len(queries) * len(self.job.modes)
            for q in queries:
                lead = profiles.get(q.user_id, {})
                for mode in self.job.modes:
                    plan = prompting.plan_generation(self.task, q, mode, texts, donor_info, self.job.retrieval,
                                                     self.job.multi_author, self.retriever, self.tools,
                                                     self.job.max_new_tokens)
                    rows.append({
                        "chunk_id": chunk["chunk_id"], "chunk_rows": n_rows, "query_id": q.query_id, "mode": mode,
                        "user_id": q.user_id, "user_ids": q.user_ids, "input": q.input, "gold": q.gold,
                        "profile_text": lead.get("profile_text"), "profile_status": lead.get("status"),
                        "retrieved_ids": plan.retrieved_ids, "prompts": [self.tools.render(p.prompt) for p in plan.prompts],
                        "merge_json": json.dumps(plan.merge) if plan.merge else None, "truncated": plan.truncated,
                        "notes": plan.all_notes(),
                    })
        return _table(rows, _GEN_PLANNED)


class GenerationEngineStage:
    """Engine stage: every prompt of a block in one engine call; then the lead-author merges in a second one."""

    def __init__(self, job: JobSpec):
        self.job, self.task = job, get_task(job.task)
        self.engine = build_engine(job.engine)
        g = job.generation
        self.params = SamplingParams(max_new_tokens=job.max_new_tokens, min_new_tokens=g.min_new_tokens,
                                     temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                                     stop=tuple(g.stop) if g.stop is not None else self.task.stop)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        flat = [(i, p) for i, r in enumerate(rows) for p in r["prompts"]]
        done = self.engine.generate([p for _, p in flat], self.params)
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
            for (r, prompt), c in zip(merges, self.engine.generate([m[1] for m in merges], self.params)):
                r.update(prompt=prompt, raw_output=c.text, finish_reason=c.finish_reason, llm_calls=r["llm_calls"] + 1,
                         prompt_tokens=r["prompt_tokens"] + c.prompt_tokens,
                         completion_tokens=r["completion_tokens"] + c.completion_tokens,
                         engine_seconds=r["engine_seconds"] + c.seconds, engine_error=c.error)
        return pa.Table.from_pylist(rows)


# ------------------------------------------------------------------------------------------------ commit
def _commit(job: JobSpec, folder: str, rows: list[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    """Write each complete chunk in ``rows`` as one file; refuse a chunk with rows missing."""
    store = RunStore(job.output_uri, job.storage)
    by_chunk: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_chunk.setdefault(r["chunk_id"], []).append(r)
    summaries = []
    for cid, part in sorted(by_chunk.items()):
        expected = part[0]["chunk_rows"]
        if len(part) != expected:
            raise RuntimeError(f"chunk {cid} reached the commit stage with {len(part)} of {expected} rows")
        rel = f"{folder}/chunk-{cid}.parquet"
        store.write_table(rel, _table(part, schema))
        summaries.append({"chunk_id": cid, "file": rel, "rows": len(part),
                          "statuses": json.dumps(count_statuses(part))})
    return summaries


def count_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per status kind (``ok``, ``truncated``, ``unparsed``, ``error``, ...): text after a colon is detail."""
    out: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out


def commit_profiles(batch: pa.Table, job: JobSpec) -> pa.Table:
    return pa.Table.from_pylist(_commit(job, "profiles", batch.to_pylist(), PROFILE_SCHEMA))


def score_and_commit_generations(batch: pa.Table, job: JobSpec) -> pa.Table:
    """CPU stage: parse each output for its task, score it against the gold, then commit the chunk."""
    task = get_task(job.task)
    rows = batch.to_pylist()
    for r in rows:
        if r["engine_error"]:
            r.update(output=None, status=f"error: {r['engine_error']}")
            continue
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
@contextlib.contextmanager
def ray_session(job: JobSpec) -> Iterator[None]:
    """Connect to the job's Ray cluster, or start a local one and shut it down afterwards."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=job.ray.address, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
        started = True
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = job.ray.progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _run_pass(job: JobSpec, kind: str, chunks: list[dict[str, Any]], with_profiles: bool = False) -> list[dict]:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    if not chunks:
        return []
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    cpu_pool = ActorPoolStrategy(size=job.ray.cpu_stage_actors)
    res = engine_resources(job, ray.cluster_resources())
    engine_pool = dict(compute=ActorPoolStrategy(size=res.actors,
                                                 max_tasks_in_flight_per_actor=job.ray.engine_tasks_in_flight),
                       **res.remote_args())
    if kind == "profile":
        ds = ds.map_batches(ProfilePlanStage, fn_constructor_kwargs={"job": job}, compute=cpu_pool,
                            num_cpus=CPU_STAGE_CPUS, **common)
        ds = ds.map_batches(ProfileEngineStage, fn_constructor_kwargs={"job": job}, **engine_pool, **common)
        ds = ds.map_batches(commit_profiles, fn_kwargs={"job": job}, num_cpus=CPU_STAGE_CPUS, **common)
    else:
        ds = ds.map_batches(GenerationPlanStage, fn_constructor_kwargs={"job": job, "with_profiles": with_profiles},
                            compute=cpu_pool, num_cpus=CPU_STAGE_CPUS, **common)
        ds = ds.map_batches(GenerationEngineStage, fn_constructor_kwargs={"job": job}, **engine_pool, **common)
        ds = ds.map_batches(score_and_commit_generations, fn_kwargs={"job": job}, num_cpus=CPU_STAGE_CPUS, **common)
    return ds.take_all()


@dataclass
class RunResult:
    output_uri: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]


def _pending(store: RunStore, folder: str, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = {p.rsplit("/", 1)[-1] for p in store.list(folder, ".parquet")}
    return [c for c in chunks if f"chunk-{c['chunk_id']}.parquet" not in done]


def _check_resume(store: RunStore, job: JobSpec) -> bool:
    """Record the run's spec at the start; on a rerun into the same output, insist the spec is the same."""
    spec = {k: v for k, v in job.public_dict().items() if k not in ("ray",)}
    if store.exists("_run_spec.json"):
        previous = store.read_json("_run_spec.json")
        if previous != spec:
            changed = sorted(k for k in set(previous) | set(spec) if previous.get(k) != spec.get(k))
            raise StepbackError(f"{job.output_uri} holds a run with a different job spec (changed: "
                                f"{', '.join(changed)}); choose another output or run_id")
        return True
    store.write_json("_run_spec.json", spec)
    return False


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "stepback-ray": __version__}
    for pkg in ("ray", "torch", "transformers", "pyarrow", "vllm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def summarize(job: JobSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-mode official metrics, token counts and statuses from the committed generation rows."""
    task = get_task(job.task)
    modes: dict[str, Any] = {}
    for mode in job.modes:
        part = [r for r in rows if r["mode"] == mode]
        scored = [r for r in part if r["gold"] is not None and not r["status"].startswith("error")]
        p_tok = sum(r["prompt_tokens"] for r in part)
        c_tok = sum(r["completion_tokens"] for r in part)
        secs = sum(r["engine_seconds"] for r in part)
        modes[mode] = {
            "users": len({r["user_id"] for r in part}), "queries": len(part), "scored": len(scored),
            **metrics.aggregate(task, [r["output"] for r in scored], [r["gold"] for r in scored]),
            "prompt_tokens": p_tok, "completion_tokens": c_tok, "engine_seconds": round(secs, 3),
            "tokens_per_s": round((p_tok + c_tok) / secs, 1) if secs else None,
            "statuses": count_statuses(part),
        }
    return {"task": job.task, "metric": task.metric, "keys": list(metrics.OFFICIAL_KEYS[task.metric]),
            "modes": modes}


def _read_folder(store: RunStore, folder: str, columns: list[str]) -> pa.Table:
    tables = [store.read_table(p, columns=columns) for p in store.list(folder, ".parquet")]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def run_job(job: JobSpec) -> RunResult:
    """Run the whole job: read, profile, generate, score, write. Returns the metrics and the manifest."""
    t_start = time.time()
    task = get_task(job.task)
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable()
    queries = read_lamp(job.input.questions, job.input.outputs, task, job.storage)
    groups = lead_groups(queries, job.limit)
    if not groups:
        raise StepbackError(f"{job.input.questions}: no questions to run")
    kept = [q for g in groups for q in g]
    users = collect_users(kept)
    needs_profiles = any(prompting.mode_uses(m)[0] for m in job.modes)
    p_chunks, where = profile_chunks(users, job.ray.users_per_chunk)
    donor_of = donors([u.user_id for u in users], job.generation.seed) if "random-profile" in job.modes else None
    histories = {u.user_id: u.history for u in users} if donor_of is not None else None
    g_chunks = generation_chunks(groups, job.ray.users_per_chunk, where if needs_profiles else {}, donor_of, histories)
    PromptFormatter(job.engine)  # fail here, before any cluster work, if the model or its tokenizer is unusable
    resumed = _check_resume(store, job)
    timings: dict[str, float] = {"read_s": round(time.time() - t_start, 3)}
    with ray_session(job):
        t0 = time.time()
        profile_summaries = _run_pass(job, "profile", _pending(store, "profiles", p_chunks) if needs_profiles else [])
        timings["profile_pass_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        gen_summaries = _run_pass(job, "generate", _pending(store, "generations", g_chunks),
                                  with_profiles=needs_profiles)
        timings["generation_pass_s"] = round(time.time() - t0, 3)

    cols = ["query_id", "mode", "user_id", "gold", "output", "prompt_tokens", "completion_tokens", "engine_seconds",
            "status"]
    generated = _read_folder(store, "generations", cols).to_pylist()
    result_metrics = summarize(job, generated)
    official_task = "LaMP_2" if task.name == "LaMP_2_news" else task.name
    for mode in job.modes:  # the official outputs format, ready for `stepback score` or a LaMP submission
        store.write_json(f"predictions/{mode}.json", {"task": official_task, "golds": [
            {"id": r["query_id"], "output": r["output"] or ""} for r in generated if r["mode"] == mode]})
    if needs_profiles:
        p = _read_folder(store, "profiles", ["status", "prompt_tokens", "completion_tokens", "engine_seconds",
                                             "llm_calls", "parts"]).to_pylist()
        secs = sum(r["engine_seconds"] for r in p)
        toks = sum(r["prompt_tokens"] + r["completion_tokens"] for r in p)
        result_metrics["profiles"] = {
            "users": len(p), "statuses": count_statuses(p), "llm_calls": sum(r["llm_calls"] for r in p),
            "map_reduced_users": sum(1 for r in p if r["parts"] > 1),
            "prompt_tokens": sum(r["prompt_tokens"] for r in p),
            "completion_tokens": sum(r["completion_tokens"] for r in p), "engine_seconds": round(secs, 3),
            "tokens_per_s": round(toks / secs, 1) if secs else None}
    store.write_json("metrics.json", result_metrics)
    timings["total_s"] = round(time.time() - t_start, 3)
    expected = len(kept) * len(job.modes)
    manifest = {
        "run_id": job.run_id, "name": job.name, "output": job.output_uri, "resumed": resumed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": job.public_dict(), "versions": _versions(),
        "counts": {"queries_in": len(queries), "queries": len(kept), "users": len(users),
                   "profile_chunks": len(p_chunks) if needs_profiles else 0, "generation_chunks": len(g_chunks),
                   "generation_rows": len(generated), "expected_generation_rows": expected,
                   "generation_rows_by_status": count_statuses(generated)},
        "chunks_committed_this_run": {"profiles": len(profile_summaries), "generations": len(gen_summaries)},
        "files": {"profiles": store.list("profiles", ".parquet"), "generations": store.list("generations", ".parquet"),
                  "predictions": [f"predictions/{m}.json" for m in job.modes], "metrics": "metrics.json"},
        "timings": timings,
    }
    if len(generated) != expected:
        raise StepbackError(f"{job.output_uri}: {len(generated)} generation rows committed, expected {expected}")
    store.write_json("manifest.json", manifest)
    return RunResult(job.output_uri, result_metrics, manifest)
