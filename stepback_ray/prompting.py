"""Generation prompts per mode: what the model sees when it writes a user's output.

For chat models the prompt is a conversation, ordered so that what is shared comes first (good for prefix
caching): the task instruction, then the user's step-back profile, then the retrieved history items as few-shot
turns (input -> the user's own output, best match last), then the query input.

Token budget: the instruction and the input are never cut. If the prompt does not fit the context with room for
the answer, retrieved items are dropped from the least relevant up, and the row records that it was truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import RetrievalConfig
from .data.rows import Query
from .engines.base import Message, PromptTools
from .retrieval import bm25_top_k
from .tasks import TaskSpec

MODES = ("none", "rag", "profile", "profile+rag")


def mode_uses(mode: str) -> tuple[bool, bool]:
    """(uses the profile, uses retrieval) for a generation mode."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    return mode in ("profile", "profile+rag"), mode in ("rag", "profile+rag")


@dataclass
class BuiltPrompt:
    messages: list[Message]
    retrieved_ids: list[str] = field(default_factory=list)
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


def system_prompt(task: TaskSpec, profile_text: str | None) -> str:
    if not profile_text:
        return task.system
    person = task.profile.person
    return (f"{task.system}\n\nProfile of the {person}:\n{profile_text}\n"
            f"Write it the way this {person} would.")


def build_prompt(task: TaskSpec, query: Query, mode: str, profile_text: str | None, retrieval: RetrievalConfig,
                 tools: PromptTools, max_new_tokens: int) -> BuiltPrompt:
    use_profile, use_rag = mode_uses(mode)
    notes: list[str] = []
    if use_profile and not profile_text:
        notes.append("no profile (empty history): generated without one")
    shots: list[tuple[str, str, str]] = []  # (item id, input, output), best match first
    if use_rag:
        if not query.profile:
            notes.append("no history to retrieve from")
        else:
            docs = [task.corpus_text(it) for it in query.profile]
            for i in bm25_top_k(task.query_text(query.input), docs, retrieval.top_k):
                item = query.profile[i]
                shot_in, shot_out = task.example(item)
                shots.append((item["id"], tools.truncate(shot_in, retrieval.max_item_tokens), shot_out))

    def assemble(n_shots: int) -> list[Message]:
        msgs: list[Message] = [{"role": "system", "content": system_prompt(task, profile_text if use_profile else None)}]
        for _, shot_in, shot_out in reversed(shots[:n_shots]):  # best match closest to the query
            msgs += [{"role": "user", "content": shot_in}, {"role": "assistant", "content": shot_out}]
        msgs.append({"role": "user", "content": query.input})
        return msgs

    n = len(shots)
    messages = assemble(n)
    while n > 0 and tools.count_tokens(tools.render(messages)) + max_new_tokens > tools.max_context:
        n -= 1
        messages = assemble(n)
    truncated = n < len(shots)
    if truncated:
        notes.append(f"truncated: {len(shots) - n} of {len(shots)} retrieved items dropped to fit the context")
    return BuiltPrompt(messages, [s[0] for s in shots[:n]], truncated, notes)
