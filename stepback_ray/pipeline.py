"""The batch job as two Ray Data passes, joined by user through the run's profile files.

**Profile pass** (per user): chunk of users -> step-back prompts (CPU) -> engine (actor pool) -> parse profile
(CPU) -> commit ``profiles/chunk-<id>.parquet``.
**Generation pass** (per query and mode): chunk of users -> that chunk's profiles + retrieval -> prompts (CPU) ->
engine (actor pool) -> clean and score (CPU) -> commit ``generations/chunk-<id>.parquet``.

A *chunk* (a fixed group of users, see :mod:`stepback_ray.data.rows`) is one Ray Data block from start to end:
every stage maps a whole block (``batch_size=None``) to a whole block, so the commit stage writes each chunk as
one file, atomically, and checks that no row is missing. A rerun with the same ``run_id`` skips committed chunks.
Engines are built inside their actors from the job spec; CPU stages load only the tokenizer. After both passes
the driver reads back the score columns, writes ``metrics.json``, and writes ``manifest.json`` last.
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
from .data import chunk_users, decode_chunk, group_by_user, read_lamp
from .engines import SamplingParams, build_engine
from .engines.formatting import PromptFormatter
from .errors import StepbackError
from .storage import RunStore
from .tasks import get_task

CPU_STAGE_CPUS = 0.25
"""CPU share of the light stages: small, so they never starve the engine actors of slots on small nodes."""

PROFILE_STOP = ("}",)

_LIST_STR = pa.list_(pa.string())
_COMMON = [
    ("chunk_id", pa.string()), ("chunk_rows", pa.int64()), ("user_id", pa.string()), ("task", pa.string()),
    ("prompt", pa.string()), ("notes", _LIST_STR),
]
PROFILE_PROMPT_SCHEMA = pa.schema(_COMMON + [
    ("items_total", pa.int64()), ("items_used", pa.int64()), ("item_ids", _LIST_STR), ("fingerprint", pa.string()),
])
GENERATION_PROMPT_SCHEMA = pa.schema(_COMMON + [
    ("query_id", pa.string()), ("mode", pa.string()), ("input", pa.string()), ("gold", pa.string()),
    ("profile_text", pa.string()), ("profile_json", pa.string()), ("profile_status", pa.string()),
    ("retrieved_ids", _LIST_STR), ("truncated", pa.bool_()),
])
ENGINE_FIELDS = [
    ("raw_output", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("finish_reason", pa.string()), ("engine_seconds", pa.float64()), ("engine_error", pa.string()),
]
PROFILE_FIELDS = [("profile_json", pa.string()), ("profile_text", pa.string()), ("status", pa.string()),
                  ("model", pa.string()), ("prompt_version", pa.string())]
SCORE_FIELDS = [("output", pa.string()), ("rouge1", pa.float64()), ("rougeL", pa.float64()), ("status", pa.string())]


def _with(schema: pa.Schema, fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    for name, typ in fields:
        if schema.get_field_index(name) < 0:
            schema = schema.append(pa.field(name, typ))
    return schema


# ------------------------------------------------------------------------------------------------ stages
class ProfilePrompts:
    """CPU stage: a chunk of users -> one step-back prompt row per user (no prompt for an empty history)."""

    def __init__(self, job: JobSpec):
        self.job, self.task = job, get_task(job.task)
        self.tools = PromptFormatter(job.engine)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = decode_chunk(chunk["payload"])
            for u in users:
                row = {"chunk_id": chunk["chunk_id"], "chunk_rows": len(users), "user_id": u.user_id,
                       "task": self.task.name, "items_total": len(u.history), "notes": [],
                       "fingerprint": profiling.fingerprint(u.history, self.job.engine.model, self.job.profile,
                                                            self.task.name)}
                if not u.history:
                    row.update(prompt=None, items_used=0, item_ids=[], notes=["profile skipped: empty history"])
                else:
                    chosen = profiling.select_history(u.history, self.task, self.job.profile, self.tools)
                    row.update(prompt=self.tools.render(profiling.profile_messages(self.task, chosen)),
                               items_used=len(chosen), item_ids=[c.item["id"] for c in chosen])
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=PROFILE_PROMPT_SCHEMA)


class GenerationPrompts:
    """CPU stage: a chunk of users -> one prompt row per (query, mode), with the chunk's profiles joined in."""

    def __init__(self, job: JobSpec, with_profiles: bool):
        self.job, self.task, self.with_profiles = job, get_task(job.task), with_profiles
        self.tools = PromptFormatter(job.engine)
        self.store = RunStore(job.output_uri, job.storage)

    def _profiles(self, chunk_id: str) -> dict[str, dict[str, Any]]:
        if not self.with_profiles:
            return {}
        table = self.store.read_table(f"profiles/chunk-{chunk_id}.parquet",
                                      columns=["user_id", "profile_text", "profile_json", "status"])
        return {r["user_id"]: r for r in table.to_pylist()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for chunk in batch.to_pylist():
            users = decode_chunk(chunk["payload"])
            profiles = self._profiles(chunk["chunk_id"])
            n_rows = sum(len(u.queries) for u in users) * len(self.job.modes)
            for u in users:
                prof = profiles.get(u.user_id, {})
                for q in u.queries:
                    for mode in self.job.modes:
                        built = prompting.build_prompt(self.task, q, mode, prof.get("profile_text") or None,
                                                       self.job.retrieval, self.tools,
                                                       self.job.generation.max_new_tokens)
                        rows.append({
                            "chunk_id": chunk["chunk_id"], "chunk_rows": n_rows, "user_id": u.user_id,
                            "task": self.task.name, "query_id": q.query_id, "mode": mode, "input": q.input,
                            "gold": q.gold, "prompt": self.tools.render(built.messages), "notes": built.notes,
                            "profile_text": prof.get("profile_text"), "profile_json": prof.get("profile_json"),
                            "profile_status": prof.get("status"), "retrieved_ids": built.retrieved_ids,
                            "truncated": built.truncated,
                        })
        return pa.Table.from_pylist(rows, schema=GENERATION_PROMPT_SCHEMA)


class EngineStage:
    """Accelerator stage: one engine per actor, loaded once; runs every prompt of a block in one engine call
    (the engine batches internally), and records tokens and time per row."""

    def __init__(self, job: JobSpec, kind: str):
        self.engine = build_engine(job.engine)
        if kind == "profile":
            self.params = SamplingParams(max_new_tokens=job.profile.max_new_tokens, stop=PROFILE_STOP)
        else:
            g = job.generation
            self.params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                         seed=g.seed, stop=get_task(job.task).stop)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [i for i, r in enumerate(rows) if r["prompt"] is not None]
        done = self.engine.generate([rows[i]["prompt"] for i in todo], self.params)
        for r in rows:
            r.update(raw_output=None, prompt_tokens=0, completion_tokens=0, finish_reason=None, engine_seconds=0.0,
                     engine_error=None)
        for i, c in zip(todo, done):
            rows[i].update(raw_output=c.text, prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                           finish_reason=c.finish_reason, engine_seconds=c.seconds, engine_error=c.error)
        return pa.Table.from_pylist(rows, schema=_with(batch.schema, ENGINE_FIELDS))


def _commit(job: JobSpec, folder: str, rows: list[dict[str, Any]], schema: pa.Schema) -> list[dict[str, Any]]:
    """Write each complete chunk in ``rows`` as one file; refuse a chunk with rows missing."""
    store = RunStore(job.output_uri, job.storage)
    by_chunk: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_chunk.setdefault(r["chunk_id"], []).append(r)
    summaries = []
    for chunk_id, part in sorted(by_chunk.items()):
        expected = part[0]["chunk_rows"]
        if len(part) != expected:
            raise RuntimeError(f"chunk {chunk_id} reached the commit stage with {len(part)} of {expected} rows")
        for r in part:
            r.pop("chunk_rows", None)
        rel = f"{folder}/chunk-{chunk_id}.parquet"
        store.write_table(rel, pa.Table.from_pylist(part, schema=schema))
        summaries.append({"chunk_id": chunk_id, "file": rel, "rows": len(part),
                          "statuses": json.dumps(count_statuses(part))})
    return summaries


def count_statuses(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rows per status kind (``ok``, ``truncated``, ``error``, ...): the text after a colon is the reason."""
    out: dict[str, int] = {}
    for r in rows:
        key = r["status"].split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out


def _drop(schema: pa.Schema, *names: str) -> pa.Schema:
    for n in names:
        i = schema.get_field_index(n)
        if i >= 0:
            schema = schema.remove(i)
    return schema


def parse_and_commit_profiles(batch: pa.Table, job: JobSpec) -> pa.Table:
    """CPU stage: parse each user's profile answer, then commit the chunk to ``profiles/``."""
    schema = get_task(job.task).profile
    rows = batch.to_pylist()
    for r in rows:
        r.update(model=job.engine.model, prompt_version=profiling.PROMPT_VERSION)
        if r["prompt"] is None:
            r.update(profile_json=None, profile_text="", status="skipped: empty history")
        elif r["engine_error"]:
            r.update(profile_json=None, profile_text="", status=f"error: {r['engine_error']}")
        else:
            prof, status = profiling.parse_profile(r["raw_output"] or "", schema)
            r.update(profile_json=json.dumps(prof), profile_text=profiling.render_profile(prof, schema), status=status)
    out_schema = _drop(_with(batch.schema, PROFILE_FIELDS), "chunk_rows")
    return pa.Table.from_pylist(_commit(job, "profiles", rows, out_schema))


def score_and_commit_generations(batch: pa.Table, job: JobSpec) -> pa.Table:
    """CPU stage: clean each output, score it against the gold, then commit the chunk to ``generations/``."""
    task = get_task(job.task)
    rows = batch.to_pylist()
    for r in rows:
        if r["engine_error"]:
            r.update(output=None, rouge1=None, rougeL=None, status=f"error: {r['engine_error']}")
            continue
        out = task.clean(r["raw_output"] or "")
        r1 = rl = None
        if r["gold"] is not None and task.metric == "rouge":
            r1, rl = metrics.rouge(out, r["gold"])
        r.update(output=out, rouge1=r1, rougeL=rl, status="truncated" if r["truncated"] else "ok")
    out_schema = _drop(_with(batch.schema, SCORE_FIELDS), "chunk_rows")
    return pa.Table.from_pylist(_commit(job, "generations", rows, out_schema))


# ------------------------------------------------------------------------------------------------ driver
@contextlib.contextmanager
def ray_session(job: JobSpec) -> Iterator[None]:
    """Connect to the job's Ray cluster, or start a local one and shut it down afterwards."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=job.ray.address, include_dashboard=False, log_to_driver=True,
                 logging_level="WARNING")
        started = True
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = job.ray.progress_bars
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _run_pass(job: JobSpec, kind: str, chunks: list[dict[str, Any]], with_profiles: bool = False) -> list[dict]:
    import ray.data

    if not chunks:
        return []
    from ray.data import ActorPoolStrategy

    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks))
    common = dict(batch_size=None, batch_format="pyarrow", zero_copy_batch=True)
    cpu_pool = ActorPoolStrategy(size=1)
    if kind == "profile":
        ds = ds.map_batches(ProfilePrompts, fn_constructor_kwargs={"job": job}, compute=cpu_pool,
                            num_cpus=CPU_STAGE_CPUS, **common)
    else:
        ds = ds.map_batches(GenerationPrompts, fn_constructor_kwargs={"job": job, "with_profiles": with_profiles},
                            compute=cpu_pool, num_cpus=CPU_STAGE_CPUS, **common)
    ds = ds.map_batches(EngineStage, fn_constructor_kwargs={"job": job, "kind": kind},
                        compute=ActorPoolStrategy(size=job.ray.engine_actors), num_cpus=job.ray.engine_actor_cpus,
                        num_gpus=job.ray.engine_actor_gpus or None, **common)
    commit = parse_and_commit_profiles if kind == "profile" else score_and_commit_generations
    ds = ds.map_batches(commit, fn_kwargs={"job": job}, num_cpus=CPU_STAGE_CPUS, **common)
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


def summarize(job: JobSpec, table: pa.Table) -> dict[str, Any]:
    """Per-mode metrics from the committed generation rows."""
    rows = table.to_pylist()
    modes: dict[str, Any] = {}
    for mode in job.modes:
        part = [r for r in rows if r["mode"] == mode]
        scored = [r for r in part if r["rouge1"] is not None]
        p_tok = sum(r["prompt_tokens"] for r in part)
        c_tok = sum(r["completion_tokens"] for r in part)
        secs = sum(r["engine_seconds"] for r in part)
        modes[mode] = {
            "users": len({r["user_id"] for r in part}), "queries": len(part), "scored": len(scored),
            "rouge-1": metrics.mean([r["rouge1"] for r in scored]),
            "rouge-L": metrics.mean([r["rougeL"] for r in scored]),
            "prompt_tokens": p_tok, "completion_tokens": c_tok, "engine_seconds": round(secs, 3),
            "tokens_per_s": round((p_tok + c_tok) / secs, 1) if secs else None,
            "statuses": count_statuses(part),
        }
    return {"task": job.task, "metric": get_task(job.task).metric, "modes": modes}


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
    users = group_by_user(queries, job.limit)
    if not users:
        raise StepbackError(f"{job.input.questions}: no questions to run")
    chunks = chunk_users(users, job.ray.users_per_chunk)
    PromptFormatter(job.engine)  # fail here, before any cluster work, if the model or its tokenizer is unusable
    resumed = _check_resume(store, job)
    needs_profiles = any(prompting.mode_uses(m)[0] for m in job.modes)
    timings: dict[str, float] = {"read_s": round(time.time() - t_start, 3)}
    with ray_session(job):
        t0 = time.time()
        profile_todo = _pending(store, "profiles", chunks) if needs_profiles else []
        profile_summaries = _run_pass(job, "profile", profile_todo)
        timings["profile_pass_s"] = round(time.time() - t0, 3)
        t0 = time.time()
        gen_todo = _pending(store, "generations", chunks)
        gen_summaries = _run_pass(job, "generate", gen_todo, with_profiles=needs_profiles)
        timings["generation_pass_s"] = round(time.time() - t0, 3)

    cols = ["mode", "user_id", "rouge1", "rougeL", "prompt_tokens", "completion_tokens", "engine_seconds", "status"]
    generated = _read_folder(store, "generations", cols)
    result_metrics = summarize(job, generated)
    if needs_profiles:
        prof = _read_folder(store, "profiles", ["status", "prompt_tokens", "completion_tokens", "engine_seconds"])
        p = prof.to_pylist()
        secs = sum(r["engine_seconds"] for r in p)
        toks = sum(r["prompt_tokens"] + r["completion_tokens"] for r in p)
        result_metrics["profiles"] = {"users": len(p), "statuses": count_statuses(p),
                                      "prompt_tokens": sum(r["prompt_tokens"] for r in p),
                                      "completion_tokens": sum(r["completion_tokens"] for r in p),
                                      "engine_seconds": round(secs, 3),
                                      "tokens_per_s": round(toks / secs, 1) if secs else None}
    store.write_json("metrics.json", result_metrics)
    timings["total_s"] = round(time.time() - t_start, 3)
    manifest = {
        "run_id": job.run_id, "name": job.name, "output": job.output_uri, "resumed": resumed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": job.public_dict(), "versions": _versions(),
        "counts": {"queries_in": len(queries), "users": len(users), "queries": sum(len(u.queries) for u in users),
                   "chunks": len(chunks), "generation_rows": generated.num_rows,
                   "expected_generation_rows": sum(len(u.queries) for u in users) * len(job.modes)},
        "chunks_committed_this_run": {"profiles": len(profile_summaries), "generations": len(gen_summaries)},
        "files": {"profiles": store.list("profiles", ".parquet"), "generations": store.list("generations", ".parquet"),
                  "metrics": "metrics.json"},
        "timings": timings,
    }
    store.write_json("manifest.json", manifest)
    return RunResult(job.output_uri, result_metrics, manifest)
