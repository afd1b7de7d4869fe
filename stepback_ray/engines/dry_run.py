"""The dry-run engine: everything but the LLM, for capacity planning and scale tests.

Prompts are rendered and tokenized exactly as a real engine would (with the model's own tokenizer), and each
gets an answer of the expected length (``engine.dry_run_output_fraction`` of ``max_new_tokens``): a well-formed
profile for step-back prompts, filler text otherwise. Everything downstream (parsing, merges, scoring, writing)
runs for real, so token counts, row counts and output bytes are those of a real run, minus the model's time.
With ``engine.dry_run_tokens_per_s`` it also takes the time an engine of that throughput would (to rehearse
a cluster's timing, or to test what happens while an engine is busy).
"""

from __future__ import annotations

import json
import os
import time

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams, split_requests
from stepback_ray.engines.formatting import FormattedEngine
from stepback_ray.engines.prefix import BLOCK, PrefixCacheModel

_WORDS = ("data", "model", "learning", "system", "method", "network", "analysis", "language", "vision", "graph")


class DryRunEngine(FormattedEngine):
    supports_json_schema = False

    def __init__(self, config: EngineConfig):
        self._init_prompt_tools(config)
        self.calls = 0
        """generate calls so far (the fault drills' dead and hung engines start after the N-th)."""
        self.cache = PrefixCacheModel(config.vllm.block_size or BLOCK)
        """The prefix cache a real engine would keep across this engine's calls: what it would not compute."""

    def _answer(self, prefilled_json: bool, target: int) -> str:
        words = [_WORDS[i % len(_WORDS)] for i in range(max(1, target))]
        if prefilled_json:  # continues '{"keywords": ["' and closes the object
            kw = words[: max(1, target // 2)]
            return json.dumps({"keywords": kw, "topics": kw[:2], "style": " ".join(words[:6])})[
                len('{"keywords": ["') :
            ]
        return " ".join(words)

    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        prompts, prefix_embeds = split_requests(requests)
        t0 = time.perf_counter()
        self.calls += 1
        self._inject_engine_fault()
        target = max(1, round(params.max_new_tokens * self.config.dry_run_output_fraction))
        out = []
        marker = self.config.dry_run_fail_marker
        texts = [self.render(p) for p in prompts]
        token_ids = self.formatter.encode_many(texts)
        counts = [len(ids) for ids in token_ids]
        answers: dict[bool, tuple[str, int]] = {}
        for k, text in enumerate(texts):
            if marker and marker in text:
                raise RuntimeError(f"injected engine failure (prompt contains {marker!r})")
            soft = prefix_embeds[k] if prefix_embeds is not None else None
            n_prompt = counts[k] + (0 if soft is None else len(soft))
            if n_prompt + params.max_new_tokens > self.max_context:
                out.append(
                    Completion(
                        "",
                        n_prompt,
                        0,
                        "error",
                        0.0,
                        error=f"prompt has {n_prompt} tokens; with {params.max_new_tokens} new tokens "
                        f"it exceeds the context of {self.max_context}",
                    )
                )
                continue
            prefilled = text.endswith('{"keywords": ["')
            if prefilled not in answers:  # the same answer for every prompt of a kind: tokenized once
                ids = self.formatter.encode(self._answer(prefilled, target))[: params.max_new_tokens]
                answers[prefilled] = (self.tokenizer.decode(ids), len(ids))
            answer, n_answer = answers[prefilled]
            cached = self.cache.cached(token_ids[k]) if soft is None else 0
            out.append(
                Completion(
                    answer,
                    n_prompt,
                    n_answer * params.n,
                    "length" if n_answer >= params.max_new_tokens else "stop",  # as a real engine at its cap
                    0.0,
                    samples=[answer] * params.n if params.n > 1 else [],
                    cached_tokens=cached,
                )
            )
        tps = self.config.dry_run_tokens_per_s
        if tps:
            busy = sum(c.prompt_tokens + c.completion_tokens for c in out) / tps - (time.perf_counter() - t0)
            if busy > 0:
                time.sleep(busy)
        share = (time.perf_counter() - t0) / max(1, len(prompts))
        for c in out:
            c.seconds = share
        return out

    def _inject_engine_fault(self) -> None:
        """Fault drills: past the N-th call, a dead engine (a fatal error, as vLLM's EngineDeadError) or a hung one."""
        c = self.config
        if c.dry_run_fatal_after is not None and self.calls > c.dry_run_fatal_after:
            self._log_fault("dead")
            raise RuntimeError(f"EngineDeadError: injected engine death after {c.dry_run_fatal_after} calls")
        if c.dry_run_hang_after is not None and self.calls > c.dry_run_hang_after:
            self._log_fault("hang")
            time.sleep(10**6)  # hung: only the stage's call timeout ends this

    def _log_fault(self, kind: str) -> None:
        if self.config.dry_run_fault_log:
            with open(self.config.dry_run_fault_log, "a") as f:
                f.write(f"{kind} pid={os.getpid()} call={self.calls}\n")

    def close(self) -> None:
        pass
