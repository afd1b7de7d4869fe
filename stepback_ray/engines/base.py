"""The engine interface every LLM backend implements.

An engine takes a batch of prompts and sampling parameters and returns one :class:`Completion` per prompt, in
order, with token counts and time. A prompt is either a list of chat messages (``{"role", "content"}``; a final
``assistant`` message is a *prefill* the model continues) or a plain string used verbatim. Engines are built
inside the process that uses them (a Ray actor), from an :class:`~stepback_ray.config.EngineConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, str]
Prompt = str | list[Message]


@dataclass(frozen=True)
class Request:
    """One prompt with what travels with it: Persona-Plug soft tokens (a ``[k, hidden]`` array in the model's
    embedding space), placed before the prompt's own token embeddings and counted as prompt tokens. A plain
    :data:`Prompt` given to an engine is a request without soft tokens."""

    prompt: Prompt
    soft_tokens: Any = None


def split_requests(requests: Sequence[Prompt | Request]) -> tuple[list[Prompt], list | None]:
    """The prompts of ``requests`` and, if any carries soft tokens, each one's soft tokens (None where it has
    none); None when no request has any (the engine's plain path)."""
    reqs = [r if isinstance(r, Request) else Request(r) for r in requests]
    soft = [r.soft_tokens for r in reqs]
    return [r.prompt for r in reqs], soft if any(x is not None for x in soft) else None


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    min_new_tokens: int = 0
    """End-of-sequence is ignored before this many tokens (equal to max_new_tokens: fixed-length output)."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    """Generation ends once any of these strings appears; the returned text is cut before it."""
    json_schema: dict | None = None
    """Constrain the output to this JSON schema (only engines with ``supports_json_schema``)."""
    n: int = 1
    """Completions per prompt (sampled: with ``temperature`` above 0); all of them in ``Completion.samples``."""


@dataclass
class EnginePhases:
    """Where an engine's time went, summed over its calls since it was built: seconds per phase and the work each
    phase did, for a profile of a run against the machine's limits (``python -m benchmarks.bench_demo --profile``). An
    engine that can tell its phases apart fills it (the transformers engine); the others leave it empty."""

    seconds: dict[str, float] = field(default_factory=dict)
    """Per phase: ``tokenize`` (render and tokenize), ``prefill``, ``decode``, ``finish`` (the texts); ``generate``
    where one ``generate`` call did both prefill and decode (the transformers engine's unsplit path)."""
    prefill_tokens: int = 0
    """Prompt tokens the prefill computed (a shared opening once; each prompt's last token is the decode's)."""
    prefill_pairs: int = 0
    """Query-key pairs the prefill's causal attention covers (padding not counted): the attention's work."""
    decode_batches: list[tuple[int, int, int]] = field(default_factory=list)
    """Each decode batch's (rows, steps, cache positions before the first step): a step computes every row and
    reads every row's cache."""

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    """``stop`` (end of sequence or a stop string), ``length`` (max_new_tokens reached) or ``error``."""
    seconds: float
    """This request's share of the wall time of the engine call that served it."""
    error: str | None = None
    samples: list[str] = field(default_factory=list)
    """With ``n`` above 1: every completion's text (``text`` is the first); the token count covers them all."""
    cached_tokens: int = 0
    """Of ``prompt_tokens``, those the engine's prefix cache served instead of computing (:mod:`.prefix`)."""


@runtime_checkable
class PromptTools(Protocol):
    """What prompt building needs from a model: its context size, prompt family ("chat" for instruct models with
    a chat template, "plain" for base models), chat rendering and token arithmetic."""

    max_context: int
    family: str

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees for ``prompt`` (chat template applied)."""

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` takes inside a prompt (no special tokens added)."""

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens (unchanged if it already fits)."""

    def cut_many(self, texts: list[str], max_tokens: int) -> list[tuple[str, int]]:
        """:meth:`truncate` of each text with the token count of the result, batched."""


@runtime_checkable
class Engine(PromptTools, Protocol):
    model_id: str
    supports_json_schema: bool

    def generate(self, requests: list[Prompt | Request], params: SamplingParams) -> list[Completion]:
        """One completion per request (a prompt, or a :class:`Request` with soft tokens), in order."""

    def close(self) -> None:
        """Release the model (memory, devices)."""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """Cut ``text`` before the first stop string; report whether one was found."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if 0 <= i < cut:
            cut = i
    return text[:cut], cut < len(text)
