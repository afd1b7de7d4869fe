"""The job: read the input into chunks, run the declared passes (:data:`~.passes.PASSES`) on the executor, then
read back the committed rows into ``metrics.json``, the official-format predictions, the report and
``manifest.json``.

:func:`run_job` is ``stepback run`` (every pass its modes need), :func:`run_profile_job` is ``stepback profile``
(the nightly per-user passes alone). Both record the spec first (a rerun of the same output must match it) and,
when the run cannot do its work, leave a ``status: failed`` manifest with the counts it reached before raising.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from stepback_ray.config import JobSpec
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.engines.openai_engine import api_key
from stepback_ray.errors import RunFailed, StepbackError
from stepback_ray.evaluation.report import build_report
from stepback_ray.evaluation.summary import summarize
from stepback_ray.pipeline.executors import executor
from stepback_ray.pipeline.input_identity import check_input
from stepback_ray.pipeline.manifest import check_error_budget, check_resume, failed_manifest, manifest_head
from stepback_ray.pipeline.passes import check_stage_settings, passes_for
from stepback_ray.pipeline.profile_pass import profiled_authors
from stepback_ray.pipeline.run_passes import run_passes
from stepback_ray.pipeline.stages import Command
from stepback_ray.pipeline.user_passes import run_user_passes
from stepback_ray.pipeline.work import Work, prepare_work
from stepback_ray.storage import RunStore


@dataclass
class RunResult:
    output_uri: str
    metrics: dict[str, Any]
    manifest: dict[str, Any]
    report: str | None = None
    """The report's URI (``report.html``)."""


def _start(job: JobSpec, command: Command, work: Work | None = None) -> tuple[RunStore, Work | None, bool, float]:
    """What every job does before any cluster work: claim the output (empty, new, or this run's own), read LaMP
    input unless ``work`` holds it already (bad input fails here, before the seconds the next check costs), check
    the model's tokenizer loads, and record or match the spec."""
    t_start = time.time()
    check_stage_settings(job)
    store = RunStore(job.output_uri, job.storage)
    store.ensure_writable(run_marker="_run_spec.json")
    work = work if work is not None else prepare_work(job, profiled_authors(job, command))
    PromptFormatter(job.engine)  # fail here, before any cluster work, if the model or its tokenizer is unusable
    if job.engine.kind == "openai" and not job.ray.address:  # local engine actors share this environment
        api_key(job.engine.openai)  # a missing API key variable fails here, as one line
    resumed = check_resume(store, job)
    check_input(store, job, resumed)  # a rerun reads the input its first run staged, or stops
    return store, work, resumed, t_start


def run_job(
    job: JobSpec, engine: Any = None, work: Work | None = None, report: bool = True, quiet: bool = False
) -> RunResult:
    """Run the whole job: read, profile, generate, score, write. Returns the metrics and the manifest.
    ``engine``: one the caller built for ``job.engine`` and keeps (the in-process executor only; a profile of the
    run reads its phases). ``work``: the input already in chunks (a plan's sample): not read, and not staged.
    ``report`` False: no ``report.html`` and figures (a plan's dry run, whose output is thrown away). ``quiet``:
    Ray's own output in the run's log file, not on the console (:mod:`.console`; the command's default,
    ``--verbose`` turns it off)."""
    if engine is not None and job.executor != "in-process":
        raise StepbackError("run_job: an engine built by the caller runs in process only (executor: in-process)")
    if job.input.format != "lamp" and job.input.layout == "item":
        raise StepbackError(
            "input.layout 'item' holds histories only, no queries to generate for: profile it with "
            "`stepback profile`, or give one row per user with its queries (layout: user)"
        )
    given = work is not None
    store, work, resumed, t_start = _start(job, "run", work)
    try:
        return _run_job(job, store, work, resumed, t_start, engine, given, report, quiet)
    except RunFailed as e:
        failed_manifest(job, "run", store, t_start, resumed, e)
        raise


def _run_job(
    job: JobSpec,
    store: RunStore,
    work: Work | None,
    resumed: bool,
    t_start: float,
    engine: Any = None,
    given: bool = False,
    report: bool = True,
    quiet: bool = False,
) -> RunResult:
    t_exec = time.time()
    profiled = profiled_authors(job, "run")
    with executor(job, engine, quiet, staging=not given) as ex:
        t_ray = time.time()
        work = work or prepare_work(job, profiled)
        t_passes = time.time()
        timings: dict[str, float] = {
            "read_s": round(t_exec - t_start + t_passes - t_ray, 3),
            "ray_start_s": round(t_ray - t_exec, 3),
        }
        at, profile_stats, pass_times = run_user_passes(ex, job, work, "run", resumed)
        timings.update(pass_times)
        query_passes = passes_for(job, "run", "queries")
        committed = run_passes(ex, job, query_passes, work.generation_chunks, at, timings, timings)
        t1 = time.time()
    timings["shutdown_s"] = round(time.time() - t1, 3)  # engines closed, the local Ray stopped

    result_metrics, gen_counts = summarize(store, job.task, job.modes)
    result_metrics["max_new_tokens"] = job.max_new_tokens  # what at_length_cap counts answers stopped at
    if gen_counts["generation_rows"] == 0:
        raise StepbackError(
            f"{job.input.path or job.input.questions}: no queries to generate for (a dataset with "
            "layout: user needs a `queries` list in its rows)"
        )
    by_status = gen_counts["generation_rows_by_status"]
    check_error_budget(
        job,
        "generation rows",
        by_status.get("error", 0),
        gen_counts["generation_rows"],
        {"generation_rows": gen_counts["generation_rows"], "generation_rows_by_status": by_status},
    )
    if profile_stats:
        result_metrics["profiles"] = profile_stats
    store.write_json("metrics.json", result_metrics)
    timings["total_s"] = round(time.time() - t_start, 3)
    queries = work.expected_queries if work.expected_queries is not None else gen_counts["queries_generated"]
    expected = queries * len(job.modes)
    generated = gen_counts["generation_rows"]
    manifest = {
        **manifest_head(job, "run", t_start, resumed, "ok"),
        "counts": {
            **work.counts,
            "shards": work.shards,
            "profile_chunks": len(work.profile_chunks) if profiled else 0,
            "generation_chunks": len(work.generation_chunks),
            "generation_rows": generated,
            "expected_generation_rows": expected,
            "generation_rows_by_status": gen_counts["generation_rows_by_status"],
        },
        "chunks_committed_this_run": {
            "profiles": profile_stats["chunks_committed_this_run"] if profile_stats else 0,
            "generations": sum(len(s) for s in committed.values()),
        },
        "profiles": {"uri": at.uri, "folder": at.folder, "version": at.version} if at else None,
        "files": {
            "generations": store.list("generations", ".parquet"),
            "predictions": [f"predictions/{m}.json" for m in job.modes],
            "metrics": "metrics.json",
        },
        "timings": timings,
    }
    if generated != expected:
        raise StepbackError(f"{job.output_uri}: {generated} generation rows committed, expected {expected}")
    store.write_json("manifest.json", manifest)
    report_uri = build_report(job.output_uri, job.storage) if report else None
    return RunResult(job.output_uri, result_metrics, manifest, report_uri)


def run_profile_job(job: JobSpec, work: Work | None = None, report: bool = True, quiet: bool = False) -> RunResult:
    """Profile only (the nightly job): every user of the input, unchanged ones carried over from the store. Its
    report (:mod:`~stepback_ray.evaluation.profile_report`) is written whether the run finished or failed, unless
    ``report`` is False (a plan's dry run). ``work``: the input already in chunks (a plan's sample): not read, and
    not staged. ``quiet``: Ray's own output in the run's log file, not on the console (:mod:`.console`)."""
    given = work is not None
    store, work, resumed, t_start = _start(job, "profile", work)
    try:
        t_exec = time.time()
        with executor(job, quiet=quiet, staging=not given) as ex:
            t_ray = time.time()
            work = work or prepare_work(job, "all")
            timings: dict[str, float] = {
                "read_s": round(t_exec - t_start + time.time() - t_ray, 3),
                "ray_start_s": round(t_ray - t_exec, 3),
            }
            at, stats, pass_times = run_user_passes(ex, job, work, "profile", resumed)
            timings.update(pass_times)
            t1 = time.time()
        timings["shutdown_s"] = round(time.time() - t1, 3)
    except RunFailed as e:
        failed_manifest(job, "profile", store, t_start, resumed, e)
        if report:
            _report_of_failed(job, e)
        raise
    timings["total_s"] = round(time.time() - t_start, 3)
    manifest = {
        **manifest_head(job, "profile", t_start, resumed, "ok"),
        "counts": {**work.counts, "shards": work.shards},
        "profiles": {"uri": at.uri, "folder": at.folder, "version": at.version, **stats},
        "timings": timings,
    }
    store.write_json("manifest.json", manifest)
    report_uri = build_report(job.output_uri, job.storage) if report else None
    return RunResult(job.output_uri, {"profiles": stats}, manifest, report_uri)


def _report_of_failed(job: JobSpec, error: RunFailed) -> None:
    """A failed profile run's report (why it failed, what it had measured). Should even that fail, the run's own
    error is still the one raised, saying the report is missing and why."""
    try:
        build_report(job.output_uri, job.storage)
    except StepbackError as e:
        error.args = (f"{error.args[0] if error.args else error}; its report could not be written: {e}",)
