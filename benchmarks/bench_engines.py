"""Engine benchmark: the same prompts through the pipeline, the raw engine, and a one-at-a-time loop.

    python -m benchmarks.bench_engines --prompts 200 --write          # every engine importable here
    .venv-vllm/bin/python -m benchmarks.bench_engines --prompts 200 --engines transformers,vllm,raydata-vllm
    python -m benchmarks.bench_engines --device cuda --dummy qwen2.5-1.5b --prompts 512   # GPU, random weights
    .venv-vllm/bin/python -m benchmarks.bench_engines --engines vllm,openai --serve-vllm  # + vLLM's HTTP server

Prompts are real: step-back profile prompts and generation prompts (the LaMP_5 input with its instruction, about
250 tokens) built by stepback-ray from lamp5_arxiv dev users. Every engine produces a fixed number of tokens per
prompt (end-of-sequence ignored), so all do the same work. For each engine and prompt set it measures

  (a) pipeline: a Ray Data pass of the pipeline's engine stage over blocks of prompts (actor start and model load
      included in the wall time),
  (b) raw: the engine called directly with the whole batch (in a child process of its own when Ray runs here too,
      so that one engine's threads, shared memory and CUDA/OpenMP state never meet another's),
  (c) loop: the engine called once per prompt (on the first --loop-prompts prompts),
  (d) raydata-vllm: Ray Data's own vLLM processor (``ray.data.llm``), where vllm is importable,
  (e) openai: the HTTP engine against an OpenAI-compatible server (``--openai-base-url``, or ``--serve-vllm``:
      vLLM's server of the same model started here, on 127.0.0.1, whose prefix cache is emptied before each
      path so that no path reads what an earlier one cached: ``--reset-server-cache``),

and prints one JSON object with, per path, the tokens sent (prompt + generated), the tokens computed (sent less the
prompt tokens the engine's prefix cache served: vLLM's ``num_cached_tokens`` per request, the transformers
engine's shared-opening prefill; ``None`` where the engine cannot tell, as Ray Data's vLLM processor), both per
second, prompts/s, and the ratios pipeline/raw, pipeline/loop and computed tokens/s over the machine's limit
(measured in the same run). Tokens sent per second can exceed the limit when a cache serves part of the prompts;
tokens computed per second cannot. ``--write`` keeps the report as ``docs/results/engines/<section>.json`` and
regenerates the results page (``benchmarks.results_page``). Without Ray (the GPU machine has none),
--no-pipeline measures raw and loop only. ``--dummy`` builds a production architecture (its config written out
here) with random weights, as vLLM's ``load_format="dummy"`` does, for throughput on machines without the weights.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.benchdoc import machine, publish
from stepback_ray import profiling
from stepback_ray.config import EngineConfig, ProfileConfig, RetrievalConfig, load_job
from stepback_ray.data import collect_users, read_lamp
from stepback_ray.engines import SamplingParams, build_engine
from stepback_ray.engines.formatting import PromptFormatter
from stepback_ray.generation.prompting import fit_prompt
from stepback_ray.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]

# Production architectures, written out by hand (no weights can be downloaded here): Qwen2.5 Instruct configs.
DUMMY_CONFIGS = {
    "qwen2.5-1.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": 21,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}


# Engines measured under a name of their own: an engine with other settings, raw and loop beside the real one.
ENGINE_VARIANTS = {
    # the transformers engine without the split prefill: one padded generate call per batch of 16 prompts
    "transformers-one-call": {
        "kind": "transformers",
        "split_prefill": False,
        "batch_size": 16,
        "max_batch_tokens": 8192,
    },
    # the transformers engine decoding with transformers' generate and stock kernels (no own loop)
    "transformers-generate": {"kind": "transformers", "decode_loop": "generate", "cpu_decode_kernels": False},
    # the transformers engine without the shared-opening prefill
    "transformers-no-prefix-reuse": {"kind": "transformers", "prefix_reuse": False},
}


def variant_config(base: dict, name: str) -> EngineConfig:
    """The engine ``name`` runs: a variant of :data:`ENGINE_VARIANTS`, or an engine kind, over the run's ``base``
    settings."""
    return EngineConfig(**{**base, **ENGINE_VARIANTS.get(name, {"kind": name})})


def engine_and_calls(name: str) -> tuple[str, int | None]:
    """``--alternate`` names an engine, or ``<engine>@<n>``: the same engine called with ``n`` prompts at a time
    (as a pipeline of small chunks calls it without ``ray.engine_coalesce``)."""
    engine, _, per_call = name.partition("@")
    return engine, int(per_call) if per_call else None


def dummy_model_dir(name: str) -> str:
    """A model folder with a production architecture's config and the embedded model's tokenizer (its ids are
    valid in the larger vocabulary), for ``load_format: dummy``."""
    from transformers import AutoTokenizer

    from stepback_ray.engines.models import resolve_model

    folder = Path(tempfile.mkdtemp(prefix=f"dummy-{name}-"))
    (folder / "config.json").write_text(json.dumps(DUMMY_CONFIGS[name]))
    AutoTokenizer.from_pretrained(resolve_model("packaged:smollm2-135m-instruct")).save_pretrained(folder)
    return str(folder)


def build_prompts(n: int, tools: PromptFormatter, data: Path) -> dict[str, list[str]]:
    """``n`` real generation prompts and ``n`` real step-back profile prompts from lamp5_arxiv dev users."""
    task = TASKS["LaMP_5"]
    queries = read_lamp(str(data / "lamp5_arxiv/dev_questions.json"), None, task)[:n]
    gen = [fit_prompt(task, tools, q.input, None, [], RetrievalConfig(), 32).text for q in queries]
    cfg = ProfileConfig(history_token_budget=768, max_item_tokens=160)
    prof = []
    for u in collect_users(queries):
        part = profiling.plan_profile(u.user_id, u.history, task, cfg, tools).parts[0]
        prof.append(tools.render(profiling.profile_messages(task, [s.text for s in part])))
    return {"generation": gen, "profile": prof}


CACHED_COUNTED = ("transformers", "vllm", "dry-run")
"""Engine kinds whose completions say how many prompt tokens their prefix cache served (``cached_tokens``): vLLM
reports ``num_cached_tokens`` per request, the transformers engine counts its shared-opening prefill, the dry-run
engine models a cache. The HTTP engine reads what its server reports, which a server may leave out (and vLLM's
server does unless started with ``--enable-prompt-tokens-details``): counted only against the server
``--serve-vllm`` starts with them."""


def counts_cached(cfg: EngineConfig, server_reports_cached: bool = False) -> bool:
    """Whether ``cfg``'s completions tell its cached prompt tokens, so that tokens computed can be recorded."""
    return cfg.kind in CACHED_COUNTED or (cfg.kind == "openai" and server_reports_cached)


def with_computed(row: dict, seconds: float | None) -> dict:
    """``row`` (tokens sent and ``cached_prompt_tokens``, None where not counted) with the tokens the engine
    computed and those per ``seconds``: what a throughput is held to the machine's limit in."""
    cached = row.get("cached_prompt_tokens")
    if cached is None:
        return {**row, "computed_tokens": None, "computed_tokens_per_s": None}
    n = row["prompt_tokens"] - cached + row["completion_tokens"]
    return {**row, "computed_tokens": n, "computed_tokens_per_s": round(n / seconds, 1) if seconds else None}


def measure(generate, prompts: list[str], params: SamplingParams, cached_counted: bool = True) -> dict[str, float]:
    """One timed call of ``generate``: tokens sent and computed (``cached_counted``: whether the engine's
    completions count their cached prompt tokens), both per second of wall time."""
    t0 = time.perf_counter()
    outs = generate(prompts, params)
    wall = time.perf_counter() - t0
    p_tok = sum(o.prompt_tokens for o in outs)
    c_tok = sum(o.completion_tokens for o in outs)
    row = {
        "prompts": len(prompts),
        "prompt_tokens": p_tok,
        "completion_tokens": c_tok,
        "cached_prompt_tokens": sum(o.cached_tokens for o in outs) if cached_counted else None,
        "wall_s": round(wall, 2),
        "tokens_per_s": round((p_tok + c_tok) / wall, 1),
        "prompts_per_s": round(len(prompts) / wall, 3),
    }
    return with_computed(row, wall)


def run_alternated(
    configs: dict[str, EngineConfig], prompts: list[str], params: SamplingParams, rounds: int
) -> dict[str, dict]:
    """Every engine built in this one process and called on the same prompts in turn, the order reversed each
    round: on a VM whose speed drifts by 10 % within the hour, the A/B that separate processes cannot give.
    Reports each engine's tokens/s per round and on the mean, against the first engine, and how many of its
    texts equal the first engine's."""
    engines = {name: build_engine(cfg) for name, cfg in configs.items()}
    names = list(engines)

    def calls(name: str, ps: list[str], p: SamplingParams) -> list:
        per_call = engine_and_calls(name)[1] or len(ps)
        return [c for i in range(0, len(ps), per_call) for c in engines[name].generate(ps[i : i + per_call], p)]

    speeds: dict[str, list[float]] = {n: [] for n in names}
    texts: dict[str, list[str]] = {}
    shares: dict[str, float | None] = {}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:

            def kept(ps, p, name=name):
                outs = calls(name, ps, p)
                texts.setdefault(name, [o.text for o in outs])
                return outs

            row = measure(kept, prompts, params, counts_cached(configs[name]))
            speeds[name].append(row["tokens_per_s"])
            sent = row["prompt_tokens"] + row["completion_tokens"]
            shares[name] = None if row["computed_tokens"] is None else round(row["computed_tokens"] / sent, 4)
    for engine in engines.values():
        engine.close()
    base = sum(speeds[names[0]]) / rounds
    return {
        n: {
            "tokens_per_s": speeds[n],
            "mean": round(sum(speeds[n]) / rounds, 1),
            "vs_first": round(sum(speeds[n]) / rounds / base, 3),
            "texts_equal_first": sum(a == b for a, b in zip(texts[names[0]], texts[n])),
            "prompts": len(prompts),
            "computed_share": shares[n],
        }
        for n in names
    }


def flops_per_token(model_path: str) -> dict[str, float]:
    """Matmul FLOPs one token costs in a forward pass: 2 x the parameters it multiplies by (every weight matrix,
    and the LM head; an embedding lookup is free, a tied embedding is the LM head). Attention's own products
    (4 x layers x position x hidden) are left out: the limit is a little above the truth, never below."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    tied = getattr(cfg, "tie_word_embeddings", False)
    return {
        "params": params,
        "gflop_per_token": round(2 * (params if tied else params - embed) / 1e9, 4),
        "hidden": cfg.hidden_size,
        "intermediate": cfg.intermediate_size,
    }


def matmul_peak(device: str, dtype: str, hidden: int, intermediate: int, threads: int, rows: int = 512) -> float:
    """GFLOP/s of the model's largest matmul shape (``rows`` tokens x hidden @ hidden x intermediate) in ``dtype``
    (``fp32`` or ``bf16``) with the engine's thread count: the best of 6 rounds of 10 products (the first round
    also warms up the thread pool and caches). The machine's limit for this model, measured in the same run as the
    engines, is this over :func:`flops_per_token`."""
    import torch

    torch.set_num_threads(threads)
    kind = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(rows, hidden, dtype=kind, device=device)
    b = torch.randn(hidden, intermediate, dtype=kind, device=device)
    best = float("inf")
    for _ in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return round(2 * rows * hidden * intermediate / best / 1e9, 1)


def resolve_device(device: str) -> str:
    """``auto`` as the engines read it: a CUDA device where one is visible, else the CPU."""
    import torch

    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def empty_own_prefix_cache(engine) -> None:
    """Empty the prefix cache an in-process engine keeps across calls (vLLM's ``LLM.reset_prefix_cache``), so
    that a measurement does not read what the one before it computed; engines without one are left as they are
    (the transformers engine shares an opening only within a call)."""
    reset = getattr(getattr(engine, "llm", None), "reset_prefix_cache", None)
    if reset is not None:
        reset()


def run_raw_and_loop(
    engine_cfg: EngineConfig,
    sets: dict[str, list[str]],
    params: dict[str, SamplingParams],
    loop_n: int,
    fresh=lambda: None,
    cached_counted: bool = True,
) -> dict[str, dict]:
    """Raw and loop for one engine in this process; ``fresh()`` runs before each measurement (the HTTP engine's
    server emptied of what the last one cached: :func:`server_reset`); ``cached_counted``: whether the engine's
    completions count their cached prompt tokens (:func:`counts_cached`)."""
    from stepback_ray.engines.models import resolve_model

    device = resolve_device(engine_cfg.device)
    dtype = "fp32" if device == "cpu" else "bf16"
    shape = flops_per_token(resolve_model(engine_cfg.model))
    threads = engine_cfg.threads or os.cpu_count() or 1
    peak = matmul_peak(device, dtype, shape["hidden"], shape["intermediate"], threads)
    limit = {
        "matmul_gflops": peak,
        "dtype": dtype,
        "threads": threads,
        "gflop_per_token": shape["gflop_per_token"],
        "tokens_per_s": round(peak / shape["gflop_per_token"], 1),
    }
    t0 = time.perf_counter()
    engine = build_engine(engine_cfg)
    load = time.perf_counter() - t0
    server_fresh = fresh

    def fresh() -> None:  # the engine's own cache emptied too: the loop's prompts are the raw call's first ones
        server_fresh()
        empty_own_prefix_cache(engine)

    out = {}
    for kind, prompts in sets.items():
        fresh()
        raw = measure(engine.generate, prompts, params[kind], cached_counted)
        raw["limit"] = limit
        # like for like with the pipeline, whose wall time starts with no engine: the model load counted in
        tokens = raw["prompt_tokens"] + raw["completion_tokens"]
        raw.update(load_s=round(load, 2), tokens_per_s_with_load=round(tokens / (raw["wall_s"] + load), 1))
        fresh()
        one_by_one = lambda ps, p: [engine.generate([x], p)[0] for x in ps]  # noqa: E731
        loop = measure(one_by_one, prompts[:loop_n], params[kind], cached_counted)
        out[kind] = {"raw": raw, "loop": loop}
    engine.close()
    gc.collect()
    return out


def run_pipeline(
    engine_cfg: EngineConfig,
    sets: dict[str, list[str]],
    new_tokens: dict[str, int],
    block: int,
    fresh=lambda: None,
    cached_counted: bool = True,
) -> dict[str, dict]:
    """The pipeline's engine stage (actor pool, blocks, object store) over the same prompts (``fresh()`` and
    ``cached_counted`` as in :func:`run_raw_and_loop`); its computed tokens/s is over its engine time."""
    import ray.data

    from stepback_ray.pipeline.generation_pass import GenerationEngineStage
    from stepback_ray.pipeline.on_ray import engine_compute

    out = {}
    for kind, prompts in sets.items():
        job = load_job(
            None,
            data={
                "name": "bench",
                "task": "LaMP_5",
                "input": {"questions": "unused.json"},
                "engine": engine_cfg.model_dump(mode="json"),
                "generation": {"max_new_tokens": new_tokens[kind], "min_new_tokens": new_tokens[kind], "stop": []},
            },
        )
        rows = [
            {"chunk_id": f"{i // block:06d}", "chunk_rows": block, "prompts": [p], "merge_json": None}
            for i, p in enumerate(prompts)
        ]
        fresh()
        cpu0 = process_cpu_seconds()
        t0 = time.perf_counter()
        ds = ray.data.from_items(rows, override_num_blocks=max(1, (len(rows) + block - 1) // block))
        # the engine stage's own pool (blocks in flight served side by side and merged, ray.engine_coalesce)
        ds = ds.map_batches(
            GenerationEngineStage,
            fn_constructor_kwargs={"job": job},
            batch_size=None,
            batch_format="pyarrow",
            compute=engine_compute(job, 1),
            num_cpus=1,
        )
        done = ds.take_all()
        wall = time.perf_counter() - t0
        cpu = cpu_by_role(cpu0, process_cpu_seconds())
        p_tok = sum(r["prompt_tokens"] for r in done)
        c_tok = sum(r["completion_tokens"] for r in done)
        engine_s = sum(r["engine_seconds"] for r in done)  # inside the engine's generate calls
        cached = sum(r["cached_prompt_tokens"] for r in done) if cached_counted else None
        row = {
            "prompts": len(done),
            "prompt_tokens": p_tok,
            "completion_tokens": c_tok,
            "cached_prompt_tokens": cached,
            "wall_s": round(wall, 2),
            "tokens_per_s": round((p_tok + c_tok) / wall, 1),
            "prompts_per_s": round(len(done) / wall, 3),
            "engine_s": round(engine_s, 2),
            "engine_tokens_per_s": round((p_tok + c_tok) / engine_s, 1),
            "cpu_s": cpu,
            "cpu_capacity_s": round(wall * len(os.sched_getaffinity(0)), 1),
        }
        out[kind] = with_computed(row, engine_s)
    return out


def process_cpu_seconds() -> dict[int, tuple[str, float, int]]:
    """Every process's command line, CPU seconds (user + system) so far and start time (clock ticks after boot:
    tells a reused process id), from /proc (empty elsewhere)."""
    out: dict[int, tuple[str, float, int]] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in (p for p in (os.listdir("/proc") if os.path.isdir("/proc") else []) if p.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(pid)] = (cmd, (int(fields[11]) + int(fields[12])) / tick, int(fields[19]))
    return out


def cpu_by_role(
    before: dict[int, tuple[str, float, int]], after: dict[int, tuple[str, float, int]]
) -> dict[str, float]:
    """CPU seconds spent between two snapshots by the engine actor, this driver, and everything else (Ray's own
    processes and actors: GCS, raylet, Ray Data's stats and autoscaling actors): on a machine of 2 cores, what the
    rest takes is what the engine does not get. A process is the same one if its start time is (Ray renames an
    idle worker that becomes an actor); processes that ended in between are not counted."""
    roles = {"engine actor": 0.0, "driver": 0.0, "other": 0.0}
    for pid, (cmd, cpu, started) in after.items():
        spent = cpu - (before[pid][1] if pid in before and before[pid][2] == started else 0.0)
        role = (
            "engine actor"
            if "EngineStage" in cmd or "EngineHost" in cmd
            else "driver"
            if pid == os.getpid()
            else "other"
        )
        roles[role] += max(spent, 0.0)
    return {k: round(v, 1) for k, v in roles.items()}


def run_raydata_vllm(
    model_path: str, sets: dict[str, list[str]], new_tokens: dict[str, int], block: int, kv_gb: float
) -> dict[str, dict]:
    """Ray Data's own vLLM batch stage (``ray.data.llm``) over the same prompts, same output length."""
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from stepback_ray.engines.formatting import PromptFormatter

    tools = PromptFormatter(EngineConfig())
    out = {}
    for kind, prompts in sets.items():
        n = new_tokens[kind]
        config = vLLMEngineProcessorConfig(
            model_source=model_path,
            batch_size=block,
            concurrency=1,
            engine_kwargs={
                "dtype": "float32",
                "max_model_len": 8192,
                "enable_prefix_caching": True,
                "enable_chunked_prefill": True,
            },
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": f"{kv_gb:g}"}},
            placement_group_config={"bundles": [{"CPU": 1}]},
            tokenize_stage=False,
            detokenize_stage=False,
            chat_template_stage=False,
        )
        processor = build_processor(
            config,
            preprocess=lambda row, n=n: {
                "prompt": row["prompt"],
                "sampling_params": {"max_tokens": n, "min_tokens": n, "temperature": 0},
            },
            postprocess=lambda row: {
                "num_generated_tokens": row.get("num_generated_tokens", 0),
                "num_input_tokens": row.get("num_input_tokens", 0),
            },
            preprocess_map_kwargs={"num_cpus": 0.1},
            postprocess_map_kwargs={"num_cpus": 0.1},
        )
        t0 = time.perf_counter()
        done = processor(ray.data.from_items([{"prompt": p} for p in prompts])).take_all()
        wall = time.perf_counter() - t0
        p_tok = sum(len(tools.encode(p)) for p in prompts)
        c_tok = sum(int(r["num_generated_tokens"] or 0) for r in done)
        row = {
            "prompts": len(done),
            "prompt_tokens": p_tok,
            "completion_tokens": c_tok,
            "cached_prompt_tokens": None,  # ray.data.llm's rows do not carry vLLM's num_cached_tokens
            "wall_s": round(wall, 2),
            "tokens_per_s": round((p_tok + c_tok) / wall, 1),
            "prompts_per_s": round(len(done) / wall, 3),
        }
        out[kind] = with_computed(row, wall)
    return out


def shown_command(argv: list[str]) -> str:
    """The command a reader would type: ``--serve-vllm``'s run reports itself as such, not with the server's
    port and the flag it set for the run."""
    args = [a for a in argv if a != "--server-reports-cached"]
    if "--reset-server-cache" in args and "--openai-base-url" in args:
        at = args.index("--openai-base-url")
        del args[at : at + 2]
        args[args.index("--reset-server-cache")] = "--serve-vllm"
    return "python -m benchmarks.bench_engines " + " ".join(args)


def server_reset(cfg: EngineConfig, reset: bool):
    """What empties the HTTP engine's server before a measurement (``--reset-server-cache``): vLLM's prefix
    cache would otherwise serve the prompts a path measured before it sent (the rows that follow read high)."""
    if cfg.kind != "openai" or not reset:
        return lambda: None
    from benchmarks.vllm_serve import reset_prefix_cache

    return lambda: reset_prefix_cache(cfg.openai.base_url)


def raw_in_child(engine: str, argv: list[str]) -> dict[str, dict]:
    """Raw and loop for one engine in a fresh interpreter running this script with ``--no-pipeline``."""
    import subprocess

    keep, skip = [], False
    for a in argv:  # drop the options the child must not inherit
        if skip:
            skip = False
            continue
        if a in ("--engines", "--raw-json"):
            skip = True
            continue
        if a == "--write" or a.startswith(("--engines=", "--raw-json=")):
            continue
        keep.append(a)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "raw.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.bench_engines",
                *keep,
                "--engines",
                engine,
                "--no-pipeline",
                "--raw-json",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"raw run exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        return {kind: paths.get(engine, {}) for kind, paths in json.loads(out.read_text()).items()}


def measured(results: dict[str, dict], engine: str, path: str | None, run) -> None:
    """Run one measurement into ``results[kind][engine]``; a failure is recorded in its place (the other paths
    still run), and what is known so far goes to stderr as one JSON line, so a long benchmark never loses it."""
    try:
        for kind, r in run().items():
            results[kind].setdefault(engine, {}).update({path: r} if path else r)
    except Exception as exc:  # noqa: BLE001 - one engine failing to start must not cost the others' numbers
        for kind in results:
            results[kind].setdefault(engine, {})[f"{path or 'raw'}_error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps({"partial_results": results}), file=sys.stderr, flush=True)


def measured_limits(engines: dict[str, dict]) -> dict[str, dict]:
    """Each engine's limit as its raw child measured it (engines whose raw run failed have none)."""
    return {
        eng: paths["raw"]["limit"]
        for eng, paths in engines.items()
        if isinstance(paths.get("raw"), dict) and paths["raw"].get("limit")
    }


def run_limit(engines: dict[str, dict]) -> dict | None:
    """The machine's limit for this run: the best of the matmul peaks its raw children measured (each child
    measures its own; two children of one run have differed by 16 % here, so every engine is held to the best)."""
    limits = measured_limits(engines).values()
    return max(limits, key=lambda lim: lim["tokens_per_s"]) if limits else None


def add_ratios(results: dict[str, dict]) -> None:
    """Each engine's ratios between its paths (every pipeline block size against raw) and against the run's
    limit (:func:`run_limit`)."""
    for kind in results:
        limit = run_limit(results[kind])
        for paths in results[kind].values():
            ratios = {}
            pipelines = [p for p, r in paths.items() if p.startswith("pipeline") and isinstance(r, dict)]
            for pipe in pipelines if "raw" in paths else []:
                tag = pipe[len("pipeline") :]
                # both from no engine to the last token (the pipeline starts its actor and loads the model; the
                # raw engine's load is added to its wall time) ...
                ratios[f"pipeline{tag}/raw"] = round(
                    paths[pipe]["tokens_per_s"] / paths["raw"]["tokens_per_s_with_load"], 3
                )
                # ... and the steady state: tokens per second inside the engine's generate calls
                ratios[f"pipeline{tag}/raw (engine time)"] = round(
                    paths[pipe]["engine_tokens_per_s"] / paths["raw"]["tokens_per_s"], 3
                )
            if limit:  # tokens computed per second over the machine's matmul peak / the model's FLOPs per token
                for path, key in (("raw", "raw/limit"), ("pipeline", "pipeline/limit (engine time)")):
                    r = paths.get(path)
                    if isinstance(r, dict) and "prompts" in r:
                        rate = r.get("computed_tokens_per_s")
                        if rate is None:  # tokens sent: a prefix cache can lift them over the limit
                            ratios[f"{key} (tokens sent; computed not recorded)"] = round(
                                (r["engine_tokens_per_s"] if path == "pipeline" else r["tokens_per_s"])
                                / limit["tokens_per_s"],
                                3,
                            )
                        else:
                            ratios[f"{key}, computed"] = round(rate / limit["tokens_per_s"], 3)
            if "pipeline" in paths and "loop" in paths:
                ratios["pipeline/loop"] = round(paths["pipeline"]["tokens_per_s"] / paths["loop"]["tokens_per_s"], 2)
            if "raw" in paths and "loop" in paths:
                ratios["raw/loop"] = round(paths["raw"]["tokens_per_s"] / paths["loop"]["tokens_per_s"], 2)
            if "raydata-vllm" in paths and "pipeline" in paths:
                ratios["pipeline/raydata-vllm"] = round(
                    paths["pipeline"]["tokens_per_s"] / paths["raydata-vllm"]["tokens_per_s"], 3
                )
            if ratios:
                paths["ratios"] = ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--loop-prompts", type=int, default=40)
    ap.add_argument("--engines", default="transformers,vllm,raydata-vllm")
    ap.add_argument("--sets", default="generation,profile")
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--profile-tokens", type=int, default=64)
    ap.add_argument("--block", type=int, default=64, help="prompts per pipeline block")
    ap.add_argument(
        "--also-blocks",
        type=lambda v: [int(x) for x in v.split(",") if x],
        default=[],
        help="comma-separated block sizes the pipeline is measured at as well (e.g. 200)",
    )
    ap.add_argument(
        "--section",
        default="",
        help="the record's name: docs/results/engines/<section>.json (default: 'default', or 'alternated')",
    )
    ap.add_argument("--batch-size", type=int, help="engine.batch_size (default: the engine's)")
    ap.add_argument("--max-batch-tokens", type=int, help="engine.max_batch_tokens (default: the engine's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--dummy", choices=sorted(DUMMY_CONFIGS), help="random weights with this architecture")
    ap.add_argument("--no-pipeline", action="store_true", help="raw and loop only (no Ray installed)")
    ap.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: the --engines built in one process, alternated ROUNDS times on the first --sets",
    )
    ap.add_argument("--kv-cache-gb", type=float, default=4.0)
    ap.add_argument("--data", default=os.environ.get("STEPBACK_SHARED_DATA", str(REPO.parent / "shared" / "data")))
    ap.add_argument(
        "--write",
        action="store_true",
        help="keep the report as docs/results/engines/<section>.json and regenerate docs/results.md",
    )
    ap.add_argument("--openai-base-url", help="the openai engine's server: an OpenAI-compatible URL (.../v1)")
    ap.add_argument(
        "--serve-vllm",
        action="store_true",
        help="start a vLLM OpenAI server of the model from --vllm-venv for the openai engine "
        "(benchmarks/vllm_serve.py), stopped at the end",
    )
    ap.add_argument("--vllm-venv", default=str(REPO / ".venv-vllm"))
    ap.add_argument(
        "--reset-server-cache",
        action="store_true",
        help="empty the openai engine's server's prefix cache before each path (vLLM's development "
        "endpoint; --serve-vllm starts its server with it and sets this)",
    )
    # internal: set by --serve-vllm, whose server reports each request's cached prompt tokens
    ap.add_argument("--server-reports-cached", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--raw-json", help=argparse.SUPPRESS)  # internal: the child that measures raw and loop
    args = ap.parse_args()
    if args.serve_vllm:  # the whole benchmark again, with the server's URL (the raw children get it too)
        from benchmarks.vllm_serve import serving
        from stepback_ray.engines.models import resolve_model

        log = Path(tempfile.mkdtemp(prefix="bench-vllm-serve-")) / "vllm-serve.log"
        with serving(
            Path(args.vllm_venv) / "bin" / "python",
            resolve_model("packaged:smollm2-135m-instruct"),
            "packaged:smollm2-135m-instruct",
            log,
            kv_cache_gb=args.kv_cache_gb,
            dev_mode=True,
        ) as url:
            sys.argv = [
                sys.argv[0],
                *[a for a in sys.argv[1:] if a != "--serve-vllm"],
                "--openai-base-url",
                url,
                "--reset-server-cache",
                "--server-reports-cached",
            ]
            return main()

    model = dummy_model_dir(args.dummy) if args.dummy else "packaged:smollm2-135m-instruct"
    base = dict(
        model=model,
        device=args.device,
        dtype=args.dtype,
        load_format="dummy" if args.dummy else "auto",
        vllm={"cpu_kv_cache_gb": args.kv_cache_gb, "structured_output": False},
        openai={"base_url": args.openai_base_url, "api_key_env": None, "send_seed": False},
    )
    base.update(
        {
            k: v
            for k, v in (("batch_size", args.batch_size), ("max_batch_tokens", args.max_batch_tokens))
            if v is not None
        }
    )
    tools = PromptFormatter(EngineConfig(**base))
    sets = {k: v for k, v in build_prompts(args.prompts, tools, Path(args.data)).items() if k in args.sets.split(",")}
    new_tokens = {"generation": args.gen_tokens, "profile": args.profile_tokens}
    params = {k: SamplingParams(max_new_tokens=new_tokens[k], min_new_tokens=new_tokens[k]) for k in sets}
    engines = args.engines.split(",")
    if args.alternate:
        kind = next(iter(sets))
        configs = {e: variant_config(base, engine_and_calls(e)[0]) for e in engines}
        report = {
            "date": dt.date.today().isoformat(),
            "machine": machine(),
            "model": model,
            "set": kind,
            "prompts": args.prompts,
            "new_tokens": new_tokens[kind],
            "rounds": args.alternate,
            "command": "python -m benchmarks.bench_engines " + " ".join(sys.argv[1:]),
            "results": run_alternated(configs, sets[kind], params[kind], args.alternate),
        }
        print(json.dumps(report, indent=1))
        if args.write:
            print(f"kept: {publish('engines/' + (args.section or 'alternated'), report)}", file=sys.stderr)
        return
    try:
        import vllm  # noqa: F401

        has_vllm = True
    except ImportError:
        has_vllm = False
    results: dict[str, dict] = {k: {} for k in sets}
    ray_started = False
    for eng in engines:
        if eng in ("vllm", "raydata-vllm") and not has_vllm:
            print(f"skipping {eng}: vllm is not importable here", file=sys.stderr)
            continue
        if eng == "raydata-vllm":
            continue
        cfg = variant_config(base, eng)
        fresh = server_reset(cfg, args.reset_server_cache)
        counted = counts_cached(cfg, args.server_reports_cached)
        if eng in ENGINE_VARIANTS and not args.no_pipeline:  # a variant is compared raw, beside the engine
            measured(results, eng, None, lambda eng=eng: raw_in_child(eng, sys.argv[1:]))
            continue
        if not args.no_pipeline:
            import ray

            if not ray_started:
                from stepback_ray.pipeline.on_ray import init_local_ray

                init_local_ray()
                ray_started = True
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            measured(results, eng, None, lambda eng=eng: raw_in_child(eng, sys.argv[1:]))
            measured(
                results,
                eng,
                "pipeline",
                lambda cfg=cfg, fresh=fresh, c=counted: run_pipeline(cfg, sets, new_tokens, args.block, fresh, c),
            )
            for block in args.also_blocks:  # the same prompts in blocks of another size, side by side
                measured(
                    results,
                    eng,
                    f"pipeline (block {block})",
                    lambda block=block, cfg=cfg, fresh=fresh, c=counted: run_pipeline(
                        cfg, sets, new_tokens, block, fresh, c
                    ),
                )
        else:
            measured(
                results,
                eng,
                None,
                lambda cfg=cfg, fresh=fresh, c=counted: run_raw_and_loop(
                    cfg, sets, params, args.loop_prompts, fresh, c
                ),
            )
    if args.raw_json:
        Path(args.raw_json).write_text(json.dumps(results))
        return
    if "raydata-vllm" in engines and has_vllm and not args.no_pipeline:
        from stepback_ray.engines.models import resolve_model

        measured(
            results,
            "vllm",
            "raydata-vllm",
            lambda: run_raydata_vllm(
                resolve_model(model) if not args.dummy else model, sets, new_tokens, args.block, args.kv_cache_gb
            ),
        )
    add_ratios(results)
    if ray_started:
        import ray

        ray.shutdown()
    import torch

    device = resolve_device(args.device)
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "model": args.dummy or model,
        "dummy": bool(args.dummy),
        "device": device,
        "prompts": args.prompts,
        "new_tokens": new_tokens,
        "command": shown_command(sys.argv[1:]),
        "results": results,
    }
    if device == "cuda":
        report["gpu_max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report, indent=1))
    if args.write:
        print(f"kept: {publish('engines/' + (args.section or 'default'), report)}", file=sys.stderr)


if __name__ == "__main__":
    main()
