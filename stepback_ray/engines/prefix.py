"""Shared prompt prefixes: the order an engine call sends its prompts in, and what a prefix cache saves.

A user's profile opens the prompt of every mode that shows it and of every query of that user, and the task's
system prompt (and the step-back prompt's worked example) opens every prompt of a pass; the prompts are built so
that what is shared comes first (system prompt, profile, retrieved items, then the input). An engine with a prefix
cache (vLLM's automatic prefix caching) computes a shared prefix once if the prompts that share it are scheduled
close together, before the cached blocks are evicted. Blocks arrive in rows' order (query by query, mode by mode),
which interleaves users; :class:`PrefixOrdered` sends each call's prompts sorted so that prompts sharing a prefix
are adjacent, and hands the completions back in the caller's order (greedy outputs do not depend on it).

:func:`cached_tokens` is the same cache as a model: prompts are cut into blocks of :data:`BLOCK` tokens, a block is
known by its content and everything before it (a hash chain, as vLLM keys its cache), and a block already seen is
not computed again. The dry-run engine reports these counts, so ``stepback plan`` estimates the saving before any
model runs; vLLM reports its own (``num_cached_tokens``). Both end in ``cached_prompt_tokens`` of the rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from stepback_ray.engines.base import Completion, Prompt, Request, SamplingParams

BLOCK = 16
"""Tokens per cache block (vLLM's default ``block_size``)."""


def sort_key(request: Prompt | Request) -> tuple[int, str]:
    """Requests with soft tokens last (their embeddings precede the text: nothing to share), then by the prompt as
    text, so that prompts with a common beginning sort next to each other."""
    r = request if isinstance(request, Request) else Request(request)
    text = r.prompt if isinstance(r.prompt, str) else json.dumps(r.prompt, ensure_ascii=False)
    return (int(r.soft_tokens is not None), text)


class PrefixOrdered:
    """An engine call (``generate(requests, params)``) that sends its requests sorted by :func:`sort_key` and
    returns the completions in the order the requests were given."""

    def __init__(self, call: Callable[[list, SamplingParams], list[Completion]]):
        self.call = call

    def __call__(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        order = sorted(range(len(requests)), key=lambda i: sort_key(requests[i]))
        done = self.call([requests[i] for i in order], params)
        out: list[Completion | None] = [None] * len(requests)
        for pos, i in enumerate(order):
            out[i] = done[pos]
        return out  # type: ignore[return-value]


class PrefixCacheModel:
    """The blocks a prefix cache holds, across the calls of one engine (bounded: forgotten whole when full, as a
    real cache evicts)."""

    def __init__(self, block: int = BLOCK, max_blocks: int = 1 << 20):
        self.block, self.max_blocks = block, max_blocks
        self.seen: set[bytes] = set()

    def cached(self, token_ids: Sequence[int]) -> int:
        """Prompt tokens served from the cache for this prompt (then its blocks are cached). At least the last
        token is always computed (the model needs its output), as in vLLM."""
        if len(self.seen) > self.max_blocks:
            self.seen.clear()
        parent = b""
        hits, hitting = 0, True
        for start in range(0, len(token_ids) - self.block + 1, self.block):
            parent = hashlib.blake2b(
                parent + repr(tuple(token_ids[start : start + self.block])).encode(), digest_size=16
            ).digest()
            if hitting and parent in self.seen:
                hits += 1
            else:
                hitting = False
                self.seen.add(parent)
        return min(hits * self.block, max(0, len(token_ids) - 1))


def cached_tokens(token_lists: Sequence[Sequence[int]], block: int = BLOCK) -> list[int]:
    """Per prompt, in the given order, the tokens a fresh prefix cache would serve."""
    model = PrefixCacheModel(block)
    return [model.cached(ids) for ids in token_lists]


def summary(sent: int, cached: int) -> dict[str, Any]:
    """Prompt tokens sent, served from the cache and computed, and the computed share."""
    return {
        "prompt_tokens": sent,
        "cached_prompt_tokens": cached,
        "computed_prompt_tokens": sent - cached,
        "computed_share": round((sent - cached) / sent, 4) if sent else None,
    }
