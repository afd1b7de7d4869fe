"""Prompt formatting with a model's tokenizer alone: render chat prompts, count and cut tokens.

Prompt building runs in CPU stages, apart from the engine actors (which should spend their time on the
accelerator), but it must see exactly what the engine will see. Both sides use this class: the CPU stages load
only the tokenizer (fast, no weights) and the engines reuse it for their own rendering.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from stepback_ray.config import EngineConfig
from stepback_ray.engines.base import Completion, Prompt, SamplingParams
from stepback_ray.engines.models import resolve_model, resolve_tokenizer
from stepback_ray.errors import StepbackError


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str) -> tuple[Any, int | None]:
    """The tokenizer of the model folder ``path`` (left padding, a pad token) and its context length, loaded once
    per process: a job builds a formatter in every prompt stage and in its engine, and ``from_pretrained`` is slow
    enough to count when it is repeated. Shared safely, also by the threads of an engine actor serving blocks side
    by side (``ray.engine_coalesce``): nothing here changes the tokenizer after this load (no call sets its padding
    or truncation), and encoding only reads it.

    A folder whose ``tokenizer_config.json`` names its tokenizer class (every converted packaged model does) gets
    that class by name, and its context length is read from ``config.json``: ``AutoTokenizer`` and ``AutoConfig``
    find the same class and number, but import the model configurations and torch with them, which cost a fresh
    process (a CLI call, a Ray worker) seconds before the tokenizer is even read."""
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().is_dir():
        raise OSError(f"no such folder: {path}")  # (AutoTokenizer would import torch to say so)
    cls, context = _named_tokenizer_class(path), _context_length(path)
    if cls is None or context is None:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    else:
        tokenizer = cls.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, context


def _read_json(path: str, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(path) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _named_tokenizer_class(path: str) -> Any:
    """The class ``tokenizer_config.json`` names, as transformers exports it (None: not named, or not known)."""
    name = (_read_json(path, "tokenizer_config.json") or {}).get("tokenizer_class")
    if not isinstance(name, str) or not name.isidentifier():
        return None
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError):
        return None


def _context_length(path: str) -> int | None:
    """``max_position_embeddings`` of the folder's ``config.json`` (None: not there, e.g. a nested config)."""
    value = (_read_json(path, "config.json") or {}).get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


PLAN_TOKENIZER_ADVICE = (
    "a dry run (stepback plan) needs only its tokenizer: set engine.tokenizer to a local one of the same vocabulary "
    "(a tokenizer or model folder, or a packaged: model such as packaged:qwen2.5-coder-0.5b-instruct for Qwen2.5 "
    "models), or download the model into the hub cache on a machine with network"
)


def tokenizer_path(config: EngineConfig) -> tuple[str, str]:
    """Where the prompts of ``config`` are tokenized from, and the key that names it: a real engine's model; for the
    dry-run engine, which loads no weights, a tokenizer alone (``engine.tokenizer`` when set, else the model's)."""
    if config.kind != "dry-run":
        return resolve_model(config.model), f"model {config.model!r}"
    if config.tokenizer:
        return resolve_tokenizer(config.tokenizer, "engine.tokenizer"), f"engine.tokenizer {config.tokenizer!r}"
    return resolve_tokenizer(config.model, "engine.model", PLAN_TOKENIZER_ADVICE), f"model {config.model!r}"


class PromptFormatter:
    def __init__(self, config: EngineConfig, path: str | None = None):
        named = f"model {config.model!r}"
        if path is None:
            path, named = tokenizer_path(config)
        try:
            self.tokenizer, model_ctx = load_tokenizer(path)
        except OSError as e:
            raise StepbackError(f"cannot load the tokenizer of {named}: {str(e).splitlines()[0]}") from None
        self.path = path
        # the Rust tokenizer, called directly: the transformers wrapper adds its own work to every call, which
        # counts on short texts, and encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never read
        self._fast = getattr(self.tokenizer, "backend_tokenizer", None)
        self._ids_batch = None
        if self._fast is not None:
            self._ids_batch = getattr(self._fast, "encode_batch_fast", None) or self._fast.encode_batch
        model_ctx = model_ctx or 2048
        self.max_context = min(config.max_model_len or model_ctx, model_ctx)
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        family = config.prompt_family
        self.family = family if family != "auto" else ("chat" if has_template else "plain")
        if self.family == "chat" and not has_template:
            raise StepbackError(f"engine.prompt_family is 'chat' but model {config.model!r} has no chat template")

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees. A final ``assistant`` message is continued, not closed."""
        if isinstance(prompt, str):
            return prompt
        if self.family == "chat":
            prefill = prompt[-1]["role"] == "assistant"
            return self.tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=not prefill, continue_final_message=prefill
            )
        return render_plain(prompt)

    def encode(self, text: str) -> list[int]:
        if self._ids_batch is not None:
            return self._ids_batch([text], add_special_tokens=False)[0].ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts in one batched call (the Rust tokenizer spreads it over the cores)."""
        if not texts:
            return []
        if self._ids_batch is not None:
            return [e.ids for e in self._ids_batch(texts, add_special_tokens=False)]
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def _cut(self, ids: list[int], max_tokens: int) -> str:
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).rstrip() + " ..."

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encode(text)
        return text if len(ids) <= max_tokens else self._cut(ids, max_tokens)

    def cut_many(self, texts: list[str], max_tokens: int) -> list[tuple[str, int]]:
        """Each text as :meth:`truncate` cuts it, with its exact token count, in two batched tokenizer calls
        (all texts, then the cut ones) instead of two calls per text: history packing for a million users is
        mostly this."""
        ids = self.encode_many(texts)
        out = [(t, len(i)) for t, i in zip(texts, ids)]
        long = [k for k, i in enumerate(ids) if len(i) > max_tokens]
        cut = [self._cut(ids[k], max_tokens) for k in long]
        for k, text, cut_ids in zip(long, cut, self.encode_many(cut)):
            out[k] = (text, len(cut_ids))
        return out


def render_plain(messages: list[dict[str, str]]) -> str:
    """Chat messages as plain text for base models without a chat template: the instruction, then each example
    input followed by its output, then the final input and an open line for the answer."""
    parts = []
    for m in messages:
        text = m["content"].strip()
        parts.append(text + ("\n\n" if m["role"] == "assistant" else "\n"))
    if messages and messages[-1]["role"] == "assistant":
        return "".join(parts).rstrip("\n")
    return "".join(parts)


class FormattedEngine:
    """What every engine shares: its prompt tools (render, token counts, cuts) from one :class:`PromptFormatter`
    built from the engine config, and the context check that turns an over-long prompt into an error row instead
    of an engine failure. An engine subclasses this, calls :meth:`_init_prompt_tools` first in its constructor and
    implements ``generate`` and ``close``."""

    supports_json_schema = False

    def _init_prompt_tools(self, config: EngineConfig) -> None:
        self.config = config
        self.model_id = config.model
        self.formatter = PromptFormatter(config)
        self.tokenizer = self.formatter.tokenizer
        self.max_context = self.formatter.max_context
        self.family = self.formatter.family

    def render(self, prompt: Prompt) -> str:
        return self.formatter.render(prompt)

    def count_tokens(self, text: str) -> int:
        return self.formatter.count_tokens(text)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self.formatter.truncate(text, max_tokens)

    def cut_many(self, texts: list[str], max_tokens: int) -> list[tuple[str, int]]:
        return self.formatter.cut_many(texts, max_tokens)

    def fit_context(self, lengths: list[int], params: SamplingParams) -> tuple[list[Completion | None], list[int]]:
        """Per prompt (``lengths`` in tokens, soft tokens included) an error completion where prompt and
        ``max_new_tokens`` exceed the context, else None; and the indexes of the prompts that fit."""
        results: list[Completion | None] = [None] * len(lengths)
        runnable = []
        for i, n in enumerate(lengths):
            if n + params.max_new_tokens > self.max_context:
                results[i] = Completion(
                    "",
                    n,
                    0,
                    "error",
                    0.0,
                    error=f"prompt has {n} tokens; with {params.max_new_tokens} new "
                    f"tokens it exceeds the context of {self.max_context}",
                )
            else:
                runnable.append(i)
        return results, runnable
