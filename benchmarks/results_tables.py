"""The tables of the results page, one function per benchmark, each from that benchmark's records (plain dicts
read from ``docs/results/``); :mod:`benchmarks.results_page` puts them together.

Throughput is held to the machine's limit in the tokens an engine *computed*: the tokens it was sent (prompt and
generated) less the prompt tokens its prefix cache served (vLLM's ``num_cached_tokens`` per request; the
transformers engine's shared-opening prefill, which computes a decode batch's common opening once). A record made
before engines' cached tokens were counted says so ("computed not recorded") instead of holding tokens sent to
the limit: a prefix cache makes tokens sent per second exceed what the machine can compute."""

from __future__ import annotations

NOT_RECORDED = "not recorded"


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def header(record: dict, command: str | None = None) -> str:
    """The line under a table's title: when, on what, by which command."""
    cmd = command if command is not None else record.get("command")
    parts = [f"Date: {record['date']}", f"machine: {record['machine']}"]
    if cmd:
        parts.append(f"command: `{cmd}`")
    if record.get("transcribed_from"):
        parts.append(f"record transcribed from {record['transcribed_from']}")
    return "; ".join(parts) + "." + (f" {record['note']}" if record.get("note") else "")


# ---------------------------------------------------------------------------------------------- engines


def computed_tokens(path: dict) -> int | None:
    """Tokens a path's engine computed: sent (prompt + generated) less the prompt tokens its prefix cache served;
    None where the record does not hold the cached count."""
    cached = path.get("cached_prompt_tokens")
    if cached is None:
        return None
    return path["prompt_tokens"] - cached + path["completion_tokens"]


def limit_tokens_per_s(limit: dict) -> float:
    """A limit's tokens/s: the matmul peak over the model's GFLOP per token."""
    return limit.get("tokens_per_s") or round(limit["matmul_gflops"] / limit["gflop_per_token"], 1)


def run_limit(engines: dict) -> dict | None:
    """The best limit any raw child of the run measured: every engine of a run is held to it."""
    limits = [p["raw"]["limit"] for p in engines.values() if isinstance(p.get("raw"), dict) and p["raw"].get("limit")]
    return max(limits, key=limit_tokens_per_s) if limits else None


def against_limit(path_name: str, path: dict, limit: dict | None) -> tuple[str, str, str]:
    """A path's tokens computed, computed tokens/s (a pipeline's in its engine time, the others' over wall time)
    and that over the limit, as table cells."""
    seconds = path.get("engine_s") if path_name.startswith("pipeline") else path["wall_s"]
    computed = computed_tokens(path)
    sent = path["prompt_tokens"] + path["completion_tokens"]
    if computed is None:
        share = f"sent: {sent / seconds / limit_tokens_per_s(limit):.3f}; " if limit and seconds else ""
        return NOT_RECORDED, NOT_RECORDED, f"{share}computed {NOT_RECORDED}"
    rate = computed / seconds if seconds else None
    over = f"**{rate / limit_tokens_per_s(limit):.3f}**" if limit and rate else "-"
    return f"{computed:,}", _fmt(rate), over


def _startup(path: dict) -> str:
    if "load_s" in path:
        return f"model load {path['load_s']} s"
    if "engine_s" in path:
        cpu = path.get("cpu_s")
        spent = (
            f"; CPU s of {path['cpu_capacity_s']}: engine actor {cpu['engine actor']}, driver {cpu['driver']}, "
            f"other processes {cpu['other']}"
            if cpu
            else ""
        )
        return f"{path['engine_s']} s in the engine's calls{spent}"
    return ""


def engines_table(record: dict) -> list[str]:
    """One run of ``bench_engines``: every engine and path, tokens sent and computed, against the run's limit."""
    lines = [
        header(record),
        "",
        f"Model `{record['model']}`{' (random weights)' if record.get('dummy') else ''}, {record['prompts']} prompts "
        f"per set, fixed output length ({record['new_tokens']}), device {record['device']}.",
        "",
    ]
    for kind, engines in record["results"].items():
        limit = run_limit(engines)
        lines += [
            f"**{kind} prompts**",
            "",
            "| engine | path | prompts | tokens sent | tokens computed | wall s | sent tokens/s | computed tokens/s "
            "| computed / limit | start-up, engine time |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for eng, paths in engines.items():
            names = [p for p in paths if p.startswith("pipeline") and isinstance(paths[p], dict)]
            for name in [*names, "raw", "loop", "raydata-vllm"]:
                p = paths.get(name)
                if not isinstance(p, dict) or "prompts" not in p:
                    continue
                computed, rate, over = against_limit(name, p, limit)
                lines.append(
                    f"| {eng} | {name} | {p['prompts']} | {p['prompt_tokens'] + p['completion_tokens']:,} | "
                    f"{computed} | {p['wall_s']} | {p['tokens_per_s']} | {rate} | {over} | {_startup(p)} |"
                )
        lines.append("")
        if limit:
            lines.append(
                f"- limit {limit_tokens_per_s(limit)} tokens/s = {limit['dtype']} matmul peak {limit['matmul_gflops']}"
                f" GFLOP/s ({limit['threads']} threads, the best of the run's raw children) / "
                f"{limit['gflop_per_token']} GFLOP per token; a pipeline's computed tokens/s is in its engine time"
            )
        for eng, paths in engines.items():
            ratios = {k: v for k, v in paths.get("ratios", {}).items() if "limit" not in k}
            if ratios:
                lines.append(f"- {eng}: " + ", ".join(f"`{k} = {v}`" for k, v in ratios.items()))
            for key, err in paths.items():
                if key.endswith("_error"):
                    lines.append(f"- {eng} {key[:-6]}: failed: `{err}`")
        lines.append("")
    return lines


def alternated_table(record: dict) -> list[str]:
    """One ``bench_engines --alternate`` run: engines built in one process, called in turn."""
    lines = [
        header(record),
        "",
        f"Model `{record['model']}`, the first {record['prompts']} {record['set']} prompts, {record['new_tokens']} "
        f"new tokens each (fixed), {record['rounds']} rounds, the order reversed each round.",
        "",
        "| engine | sent tokens/s per round | mean | against the first | computed share of tokens sent | texts equal "
        "to the first's |",
        "|---|---|---|---|---|---|",
    ]
    for eng, r in record["results"].items():
        share = r.get("computed_share")
        lines.append(
            f"| {eng} | {' / '.join(str(x) for x in r['tokens_per_s'])} | {r['mean']} | {r['vs_first']}x | "
            f"{NOT_RECORDED if share is None else share} | {r['texts_equal_first']} of {r['prompts']} |"
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------- prefix reuse


def prefix_table(record: dict) -> list[str]:
    lines = [
        header(record),
        "",
        f"Model `{record['model']}`, LaMP_5 with {record['users']} lamp5_arxiv dev users asking "
        f"{record['queries_per_user']} questions each ({record['queries']} queries), modes profile, profile+rag, "
        "random-profile, one process, runs back to back. Sent: prompt tokens; cached: served by the prefix cache "
        "(vLLM's `num_cached_tokens`; the dry-run engine's model of it, what `stepback plan` reports); computed "
        "share = (sent - cached) / sent.",
        "",
        "| run | generation: sent | cached | computed share | profile pass: computed share | generation pass s | "
        "generation pass computed tokens/s | prompts, outputs as in the first run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["runs"].items():
        g, p = r["generation"], r["profile"]
        tokens = r.get("generation_tokens")
        rate = (
            _fmt((tokens - g["cached_prompt_tokens"]) / r["generation_pass_s"])
            if tokens is not None and r["generation_pass_s"]
            else f"{NOT_RECORDED} (sent: {r['generation_tokens_per_s']})"
        )
        lines.append(
            f"| {name} | {g['prompt_tokens']:,} | {g['cached_prompt_tokens']:,} | {g['computed_share']} | "
            f"{p['computed_share']} | {r['generation_pass_s']:.1f} | {rate} | {r['same_prompts']}, "
            f"{r['same_outputs']} |"
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------- the demo


def demo_against_bound(runs: list[dict]) -> dict:
    """A series of demo runs held to the best limit any of them measured, on the tokens each computed."""
    best = max(r["limit_tokens_per_s"] for r in runs)
    out = {}
    for r in runs:
        computed = r["tokens"] - r["cached_prompt_tokens"]
        bound = computed / best
        out.setdefault(r["variant"], []).append(
            {
                "run": r,
                "computed": computed,
                "bound_s": bound,
                "ratio": r["total_s"] / bound,
                "engine_over_bound": sum(r["engine_s"]) / bound,
            }
        )
    return {"limit": best, "variants": out}


def demo_table(series: dict[str, dict]) -> list[str]:
    """Every series of demo runs (one folder of ``bench_demo`` records each): per variant its mean wall time and
    its ratio to the compute bound of the tokens it computed, at the best limit of its series."""
    lines = [
        "| series | variant | runs | date | mean wall s | generation pass: wall less engine s | tokens sent (cached) "
        "| limit tokens/s | bound on computed tokens s | mean ratio | mean engine s / bound | ROUGE-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for name, s in series.items():
        held = demo_against_bound(s["runs"])
        for variant, rows in held["variants"].items():
            n = len(rows)
            r0 = rows[0]["run"]
            fixed_costs = [x["run"]["generation_pass_s"] - x["run"]["engine_s"][1] for x in rows]
            rouge = " / ".join(str(v) for v in r0["rouge1"].values())
            lines.append(
                f"| {name} | {variant} | {n} | {r0['date']} | {sum(x['run']['total_s'] for x in rows) / n:.1f} | "
                f"{' / '.join(f'{fixed:.1f}' for fixed in fixed_costs)} | "
                f"{r0['tokens']:,} ({r0['cached_prompt_tokens']:,}) | {held['limit']} | {rows[0]['bound_s']:.1f} | "
                f"**{sum(x['ratio'] for x in rows) / n:.2f}** | {sum(x['engine_over_bound'] for x in rows) / n:.2f} "
                f"| {rouge} |"
            )
        sets = "; ".join(
            f"{v}: {', '.join(f'`{x}`' for x in rows[0]['run']['sets']) or 'none'}"
            for v, rows in held["variants"].items()
        )
        notes.append(f"- {name}: {header(s['about'])} Variants (`--set`): {sets}.")
    return lines + ["", *notes, ""]


def demo_profile_table(p: dict) -> list[str]:
    """``bench_demo --profile``: the demo's engine phases against a roofline measured in the same run."""
    floor = sum(r["floor_s"] for r in p["phases"] if r["floor_s"])
    lines = [
        header(p),
        "",
        "The demo's job in one process (`executor: in-process`, one engine call of every prompt per pass), the "
        f"transformers engine's phases against a roofline: fp32 matmul peak {p['peak_gflops']} GFLOP/s, memory "
        f"bandwidth {p['bandwidth_gbs']} GB/s, both measured before and after the job. Floor: the prefill's FLOPs "
        "(the tokens it computed through the weights, causal attention pairs) at the peak; each decode step's "
        "FLOPs at the peak or its bytes (weights, every row's KV cache) at the bandwidth, whichever is slower.",
        "",
        "| phase | seconds | share of engine time | work | floor s | over floor |",
        "|---|---|---|---|---|---|",
    ]
    for r in p["phases"]:
        over = "" if r["over_floor"] is None else f"**{r['over_floor']}**"
        lines.append(
            f"| {r['phase']} | {r['seconds']} | {r['share']} | {r['work']} | "
            f"{'' if r['floor_s'] is None else r['floor_s']} | {over} |"
        )
    cached = p.get("cached_prompt_tokens")
    bound = (
        f"the {p['tokens'] - cached:,} tokens it computed ({p['tokens']:,} sent, {cached:,} served by the shared "
        f"opening) over the limit ({p['limit_tokens_per_s']} tokens/s) take {p['compute_bound_s']} s"
        if cached is not None
        else f"the job's {p['tokens']:,} tokens sent over the limit ({p['limit_tokens_per_s']} tokens/s) take "
        f"{p['compute_bound_s']} s (tokens sent; computed {NOT_RECORDED})"
    )
    lines += [
        "",
        f"Engine {p['engine_s']} s of a {p['wall_s']} s run (model load {p['model_load_s']} s before it); the "
        f"roofline's floor for the engine's work {floor:.1f} s; {bound}. Decode steps bound by compute rather than "
        f"memory: {p['decode_compute_bound_steps']}. ROUGE-1 {' / '.join(str(v) for v in p['rouge1'].values())}.",
        "",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- the rest


def contention_table(record: dict) -> list[str]:
    s = record["summary"]
    lines = [
        header(record),
        "",
        f"The same engine call (8 LaMP_5 prompts of ~1,000 tokens, 24 new tokens, SmolLM2 in this process) alone, "
        f"beside an idle local Ray with {record['actors']} idle actors, and beside the same Ray started under "
        f"`SCHED_IDLE`; conditions alternated, {record['rounds']} rounds of {record['calls']} calls. Preemptions: "
        "this process's involuntary context switches per CPU second.",
        "",
        "| condition | mean s per call | over alone | preemptions per CPU s |",
        "|---|---|---|---|",
    ]
    for cond, c in s.items():
        lines.append(f"| {cond} | {c['mean_s']} | {c.get('over_alone', 1.0)} | {c['preemptions_per_cpu_s']} |")
    lines += [
        "",
        "Per call (s): "
        + "; ".join(
            f"{r['condition']} r{r['round']}: " + ", ".join(str(c["s"]) for c in r["calls"]) for r in record["runs"]
        )
        + ".",
        "",
    ]
    return lines


def _gib(r: dict, key: str) -> str:
    """A size in GiB, from bytes (``<key>_bytes``) or as recorded (``<key>_gib``)."""
    return f"{r[key + '_bytes'] / 2**30:.2f}" if key + "_bytes" in r else f"{r[key + '_gib']:.2f}"


def scale_table(record: dict) -> list[str]:
    lines = [
        header(record),
        "",
        "The whole pipeline with the dry-run engine (everything but the LLM: staging and validation, step-back "
        "planning and tokenization, BM25 retrieval, generation prompts, parsing, scoring, Parquet writes), modes "
        f"{', '.join(record['modes'])}. Peak memory sampled every second; a run killed part-way and resumed counts "
        "as several invocations: its wall time is their sum and its peaks their maximum.",
        "",
        "| users | shards | wall min | users/s | driver peak RSS GiB | largest worker peak RSS GiB | all processes "
        "peak RSS GiB | all processes peak PSS GiB | output GiB (staged input) | invocations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in record["sizes"]:
        if not r.get("finished", True):
            lines.append(f"| {r['users']:,} | {r['shards']} | {r['wall_s'] / 60:.1f} so far | unfinished | | | | | |")
            continue
        wall = r["wall_s"] / 60 if "wall_s" in r else r["wall_min"]
        lines.append(
            f"| {r['users']:,} | {r['shards']} | {wall:.1f} | {r['users_per_s']} | {r['driver_peak_rss_gib']} | "
            f"{r['worker_peak_rss_gib']} | {r['all_processes_peak_rss_gib']} | "
            f"{r.get('all_processes_peak_pss_gib', '-')} | {_gib(r, 'output')} ({_gib(r, 'staged')}) | "
            f"{r['invocations']} |"
        )
    finished = [r for r in record["sizes"] if r.get("finished", True)]
    biggest = max(finished, key=lambda r: r["users"]) if finished else None
    if biggest and biggest["users"] < 1_000_000 and len(finished) == len(record["sizes"]):
        lines += [
            "",
            f"1,000,000 users were not run: at the {biggest['users']:,}-user rate ({biggest['users_per_s']} "
            f"users/s) it would take about {1_000_000 / biggest['users_per_s'] / 3600:.1f} h on this machine.",
        ]
    real = record.get("real_sample")
    if real:
        lines += [
            "",
            f"With the real engine ({real['engine']}) the demo's {real['users']} users take {real['wall_s']} s "
            f"(measured {real.get('date', record['date'])}): {real['users_per_s']} users/s; the LLM, not the "
            "pipeline, sets the pace on this machine.",
        ]
    return lines + [""]


def nightly_table(record: dict) -> list[str]:
    lines = [
        header(record),
        "",
        f"`stepback profile` over {record['users']} {record['set']} users with the real model ({record['model']}), "
        f"then again the night after with {record['changed']} of the histories grown by new items.",
        "",
        "| run | users recomputed | users carried | wall s |",
        "|---|---|---|---|",
    ]
    for r in record["runs"]:
        lines.append(f"| {r['run']} | {r['recomputed']} | {r['carried']} | {r['wall_s']} |")
    full, night = record["runs"][0]["wall_s"], record["runs"][1]["wall_s"]
    return lines + ["", f"nightly / full = {night / full:.3f}.", ""]


def drills_table(records: list[dict]) -> list[str]:
    lines = [
        "| drill | fault injected | faults | rows expected | rows out | lost | duplicates | flagged / quarantined "
        "| passed | date |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        flagged = (
            f"{r['records_quarantined']:,} quarantined"
            if "records_quarantined" in r
            else ", ".join(f"{k}: {v}" for k, v in sorted(r["rows_by_status"].items()) if k != "ok") or "none"
        )
        lines.append(
            f"| {r['drill']} | {r['fault']} | {r['faults_injected']:,} | {r['rows_expected']:,} | "
            f"{r['rows_out']:,} | {r['rows_lost']} | {r['duplicates']} | {flagged} | "
            f"{'yes' if r['passed'] else 'NO'} | {r['date']} |"
        )
    machines = sorted({r["machine"] for r in records})
    return lines + ["", f"Machine: {'; '.join(machines)}. Each drill's command is in its record.", ""]


def pplug_table(training: dict, about: dict) -> list[str]:
    s, h = training["summary"], training["history"]
    lines = [
        header(about),
        "",
        f"Persona-Plug on {s['task']}: {s['train_users']:,} users to train on, {s['val_users']} held out; "
        f"{s['model']} and {s['encoder']} frozen, newest {s['max_items']} items per user, {s['steps']} steps; "
        f"wall time {s['wall_s'] / 60:.1f} min.",
        "",
        "| step | " + " | ".join(str(x) for x in h["val_step"]) + " |",
        "|---|" + "---|" * len(h["val_step"]),
        "| validation loss | " + " | ".join(f"{x:.3f}" for x in h["val_loss"]) + " |",
        "",
    ]
    return lines
