"""Generation prompts per mode, model family and number of authors: what the model sees when it writes.

**Chat models** get a conversation ordered so that what is shared comes first (good for prefix caching): the
task instruction with the step-back profile, then the retrieved history items (as few-shot turns input -> the
user's own output, best match last; or, for tasks whose items have no output of the task's kind, as a context
list), then the query input. **Base models** (no chat template) get the official LaMP inline pattern prompt with
the profile as a preamble and an answer label to continue.

Modes: ``none`` (input only), ``rag`` (retrieved items), ``profile`` (step-back profile), ``profile+rag`` (both:
the paper's method) and ``random-profile`` (``profile+rag`` with another user's profile and history: the same
format with the wrong person, the control that tells personalization from prompt format).

Co-authored queries (PSW) follow ``multi_author.strategy``, declared in :data:`stepback_ray.modes.AUTHOR_STRATEGIES`:
a strategy with proposals builds one prompt per author (each from that author's own profile and history), then,
once the proposals exist, a merge prompt for the first author (:func:`merge_prompt`: the proposals; or the lead's
own prompt with the proposals after the input; or the proposals with leave to keep one word for word), or no merge
at all where the generation pass keeps the proposal that agrees most (``consensus``). A strategy without proposals
builds one prompt: the lead's profile or every author's in byline order, and items retrieved from the lead's
history, from every author's, or from every author's weighted by byline position. ``single`` uses the lead author's
alone (the baseline for "several authors' profiles beat one").

Token budget: the instruction and the input are never cut. If a prompt does not fit the context with room for the
answer, retrieved items are dropped from the least relevant up, and the row records that it was truncated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stepback_ray.config import MultiAuthorConfig, RetrievalConfig
from stepback_ray.data.rows import Item, Query
from stepback_ray.engines.base import Message, Prompt, PromptTools
from stepback_ray.generation.retrieval import Retriever, authors_pool, top_k, weighted
from stepback_ray.modes import AUTHOR_STRATEGIES, MODE_NAMES, mode_spec
from stepback_ray.tasks import TaskSpec

MODES = MODE_NAMES


def mode_uses(mode: str) -> tuple[bool, bool]:
    """(uses a profile, uses retrieval) for a generation mode."""
    spec = mode_spec(mode)
    return spec.profile, spec.retrieval


def uses_plug(mode: str) -> bool:
    """Whether the mode puts a Persona-Plug soft token before the prompt."""
    return mode_spec(mode).plug


def uses_donor(mode: str) -> bool:
    """Whether the mode borrows another user's context (the controls)."""
    return mode_spec(mode).donor


@dataclass
class Persona:
    """One user's personal context for a prompt: whose it is, their profile text, their history."""

    user_id: str
    profile_text: str | None
    history: list[Item]


@dataclass
class BuiltPrompt:
    prompt: Prompt
    text: str
    """The prompt rendered for the engine (as it was counted against the context)."""
    retrieved_ids: list[str] = field(default_factory=list)
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass
class GenerationPlan:
    """The prompts for one (query, mode): one prompt, or one proposal per author plus a merge afterwards."""

    prompts: list[BuiltPrompt]
    merge: dict[str, Any] | None = None
    """With one proposal per author: how they become one output (``kind``, the merge prompt's kind, or None where
    the pass keeps one proposal, ``choose``) and what the merge prompt needs besides the proposals (built once
    they exist)."""
    notes: list[str] = field(default_factory=list)
    people: list[Persona] = field(default_factory=list)
    """Whose personal context the prompts use (the lead alone, or every author; a donor's under the controls)."""

    @property
    def retrieved_ids(self) -> list[str]:
        return [i for p in self.prompts for i in p.retrieved_ids]

    @property
    def truncated(self) -> bool:
        return any(p.truncated for p in self.prompts)

    def all_notes(self) -> list[str]:
        return self.notes + [n for p in self.prompts for n in p.notes]


def system_prompt(task: TaskSpec, profile_text: str | None) -> str:
    if not profile_text:
        return task.system
    person = task.profile.person
    return f"{task.system}\n\nProfile of the {person}:\n{profile_text}\nWrite it the way this {person} would."


def _retrieve(
    task: TaskSpec, text: str, pool: list[Item], k: int, retriever: Retriever, weights: list[float] | None = None
) -> list[Item]:
    if not pool or k <= 0:
        return []
    docs = [task.corpus_text(it) for it in pool]
    scores = retriever.scores(task.query_text(text), docs)
    return [pool[i] for i in top_k(weighted(scores, weights) if weights is not None else scores, k)]


def _assemble(
    task: TaskSpec,
    tools: PromptTools,
    text: str,
    profile_text: str | None,
    items: list[Item],
    retrieval: RetrievalConfig,
) -> Prompt:
    """One prompt for ``text`` with an optional profile and retrieved ``items`` (best first)."""
    cut = retrieval.max_item_tokens
    if getattr(tools, "family", "chat") == "plain":
        patterns = [tools.truncate(task.pattern(it), cut) for it in items]
        preamble = f"Profile of the {task.profile.person}:\n{profile_text}\n\n" if profile_text else ""
        return f"{preamble}{task.plain(patterns, text)}\n{task.answer_prefix}"
    msgs: list[Message] = [{"role": "system", "content": system_prompt(task, profile_text)}]
    if task.example is not None:
        for it in reversed(items):  # best match closest to the query
            shot_in, shot_out = task.example(it)
            msgs += [
                {"role": "user", "content": tools.truncate(shot_in, cut)},
                {"role": "assistant", "content": shot_out},
            ]
        msgs.append({"role": "user", "content": text})
    elif items:
        listing = "\n".join(f"- {tools.truncate(task.profile_item(it), cut)}" for it in items)
        msgs.append({"role": "user", "content": f"{task.context_label}:\n{listing}\n\n{text}"})
    else:
        msgs.append({"role": "user", "content": text})
    return msgs


def fit_prompt(
    task: TaskSpec,
    tools: PromptTools,
    text: str,
    profile_text: str | None,
    items: list[Item],
    retrieval: RetrievalConfig,
    max_new_tokens: int,
) -> BuiltPrompt:
    """The prompt with as many of ``items`` (best first) as fit the context next to the answer."""
    n = len(items)
    prompt = _assemble(task, tools, text, profile_text, items, retrieval)
    rendered = tools.render(prompt)
    while n > 0 and tools.count_tokens(rendered) + max_new_tokens > tools.max_context:
        n -= 1
        prompt = _assemble(task, tools, text, profile_text, items[:n], retrieval)
        rendered = tools.render(prompt)
    built = BuiltPrompt(prompt, rendered, [it["id"] for it in items[:n]], n < len(items))
    if built.truncated:
        built.notes.append(f"truncated: {len(items) - n} of {len(items)} retrieved items dropped to fit the context")
    return built


def personas(
    query: Query, mode: str, profiles: dict[str, str], donors: dict[str, dict[str, Any]]
) -> tuple[list[Persona], list[str]]:
    """The persona behind each of the query's users under ``mode`` (a donor's for the controls)."""
    notes: list[str] = []
    out = []
    for uid, pool in zip(query.user_ids, query.histories):
        if uses_donor(mode):
            d = donors.get(uid)
            if d is None:
                notes.append(f"no other user to borrow a profile from for {uid}: generated without one")
                out.append(Persona(uid, None, []))
            else:
                out.append(Persona(d["donor"], profiles.get(d["donor"]) or None, d["history"]))
        else:
            out.append(Persona(uid, profiles.get(uid) or None, pool))
    return out, notes


def plan_generation(
    task: TaskSpec,
    query: Query,
    mode: str,
    profiles: dict[str, str],
    donors: dict[str, dict[str, Any]],
    retrieval: RetrievalConfig,
    multi: MultiAuthorConfig,
    retriever: Retriever,
    tools: PromptTools,
    max_new_tokens: int,
) -> GenerationPlan:
    """All prompts for one query under one mode."""
    use_profile, use_rag = mode_uses(mode)
    people, notes = personas(query, mode, profiles, donors)
    if use_profile and not any(p.profile_text for p in people):
        notes.append("no profile (empty history): generated without one")
    if use_rag and not any(p.history for p in people):
        notes.append("no history to retrieve from")

    def prompt_for(profile_text: str | None, pool: list[Item], weights: list[float] | None = None) -> BuiltPrompt:
        items = _retrieve(task, query.input, pool, retrieval.top_k, retriever, weights) if use_rag else []
        if use_rag and pool and retrieval.top_k > 0 and not items:
            notes.append("nothing retrieved: no history item has a searchable word")
        return fit_prompt(
            task, tools, query.input, profile_text if use_profile else None, items, retrieval, max_new_tokens
        )

    strategy = AUTHOR_STRATEGIES[multi.strategy]
    lead_alone = not strategy.proposals and strategy.profiles == "lead" and strategy.pool == "lead"
    if len(people) == 1 or mode == "none" or uses_plug(mode) or lead_alone:
        # one author's prompt: the only one, or the lead (the plug serves the lead author alone)
        lead = people[0]
        return GenerationPlan([prompt_for(lead.profile_text, lead.history)], notes=notes, people=[lead])
    if not strategy.proposals:
        profile_text = people[0].profile_text
        if strategy.profiles == "all":
            blocks = [
                f"Author {i + 1}{' (lead)' if i == 0 else ''}, {uid}:\n{p.profile_text}"
                for i, (uid, p) in enumerate(zip(query.user_ids, people))
                if p.profile_text
            ]
            profile_text = "\n\n".join(blocks) or None
        if strategy.pool == "lead":
            pool, weights = people[0].history, None
        else:
            decay = multi.byline_decay if strategy.pool == "byline" else None
            pool, weights = authors_pool([p.history for p in people], decay)
        return GenerationPlan([prompt_for(profile_text, pool, weights)], notes=notes, people=people)
    proposals = [prompt_for(p.profile_text, p.history) for p in people]
    merge = {
        "strategy": strategy.name,
        "kind": strategy.merge,
        "choose": strategy.choose,
        "input": query.input,
        "authors": list(query.user_ids),
        "lead_profile": people[0].profile_text if use_profile else None,
    }
    if strategy.merge == "context":
        merge["lead_prompt"] = proposals[0].prompt
    return GenerationPlan(proposals, merge=merge, notes=notes, people=people)


def needs_merge_call(merge: dict[str, Any] | None) -> bool:
    """Whether a plan's proposals go to a merge call (lead-merge and its variants), not kept as one (consensus).
    A merge recorded before the strategies had kinds is a lead-merge."""
    return merge is not None and merge.get("kind", "proposals") is not None


def keeps_a_proposal(merge: dict[str, Any] | None) -> bool:
    """Whether the pass keeps one of the plan's proposals as the output (``consensus``)."""
    return merge is not None and bool(merge.get("choose"))


def merge_prompt(task: TaskSpec, tools: PromptTools, merge: dict[str, Any], proposals: list[str]) -> Prompt:
    """The lead author's step: combine the co-authors' proposals into the final output. ``merge["kind"]``:
    ``proposals`` (the proposals, the input and the lead's profile), ``keep`` (the same, with leave to keep one
    proposal word for word) or ``context`` (the lead's own proposal prompt, with their retrieved items, and the
    proposals after the input)."""
    noun = task.output_noun
    kind = merge.get("kind") or "proposals"
    listing = "\n".join(
        f"Author {i + 1}{' (you, the lead author)' if i == 0 else ''}: {p.strip()}" for i, p in enumerate(proposals)
    )
    proposed = f"Your co-authors each proposed a {noun} for this paper:\n{listing}"
    plain = getattr(tools, "family", "chat") == "plain"
    if kind == "context":
        ask = f"{proposed}\nWrite the final {noun}, keeping what is best in the proposals."
        lead_prompt = merge["lead_prompt"]
        if plain:
            head = lead_prompt[: -len(task.answer_prefix)] if lead_prompt.endswith(task.answer_prefix) else lead_prompt
            return f"{head}{ask}\n{task.answer_prefix}"
        msgs = [dict(m) for m in lead_prompt]
        msgs[0]["content"] += "\nYou are the lead author of this paper."
        msgs[-1]["content"] += f"\n\n{ask}"
        return msgs
    if kind == "keep":
        ask = (
            f"{proposed}\n\n{merge['input']}\nIf one proposal is already the best {noun} for this paper, reply "
            f"with it exactly as written; otherwise write a better {noun}."
        )
    else:
        ask = f"{proposed}\n\n{merge['input']}\nWrite the final {noun}, keeping what is best in the proposals."
    if plain:
        pre = f"Profile of the lead author:\n{merge['lead_profile']}\n\n" if merge.get("lead_profile") else ""
        return f"{pre}{ask}\n{task.answer_prefix}"
    system = system_prompt(task, merge.get("lead_profile")) + "\nYou are the lead author of this paper."
    return [{"role": "system", "content": system}, {"role": "user", "content": ask}]


def rendered_merge_prompt(task: TaskSpec, tools: PromptTools, merge: dict[str, Any], raw_proposals: list[str]) -> str:
    """The lead-author merge prompt as the engine sees it: each co-author's raw proposal parsed as the task's
    answer (kept as written where it does not parse), then :func:`merge_prompt`, rendered."""
    return tools.render(merge_prompt(task, tools, merge, [task.parse(t) or t for t in raw_proposals]))
