"""Choosing among sampled candidates: consensus, and agreement with the person the output is for.

With ``generation.candidates: k`` above 1 each query gets the greedy answer plus ``k - 1`` sampled ones (same
prompt), and one is kept. Every mode scores a candidate by **consensus**: its mean similarity to the other
candidates (minimum-Bayes-risk selection under the task's own metric, which favours the answer the model keeps
coming back to). Modes that use a profile add **agreement with the person**: the candidate's mean similarity to
the user's own past outputs of the task's kind (their titles, headlines, labels, scores) and to the LLM's fields of
their step-back profile. A profile shown to a small model as text tends to be copied into the answer; used to pick
among the model's own candidates it cannot be, and the random-profile control (the same selection with another
user's profile and outputs) tells the person apart from the selection itself.

Similarity is the task's metric on one pair: ROUGE-1 F for text, equality for labels, closeness for ratings.
An unparseable candidate is never chosen over a parseable one; ties keep the earlier candidate (the greedy one
first), so with one candidate, or identical ones, the greedy answer stands.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stepback_ray.data.rows import most_recent_first
from stepback_ray.evaluation.metrics import rating_value, rouge
from stepback_ray.tasks import TaskSpec

MAX_OWN_OUTPUTS = 32
"""Newest past outputs of the user a candidate is compared with (a long history costs time, says little more)."""


@dataclass
class PersonalRefs:
    """What a candidate is compared with for one query under one mode (empty: consensus alone)."""

    outputs: list[str] = field(default_factory=list)
    """The users' own past outputs of the task's kind."""
    profiles: list[str] = field(default_factory=list)
    """The LLM's fields of their step-back profiles, as text (text tasks only)."""

    def to_list(self) -> list[list[str]]:
        return [self.outputs, self.profiles]

    @classmethod
    def from_list(cls, value: list[list[str]] | None) -> PersonalRefs:
        return cls(*[list(v or []) for v in value]) if value else cls()


def personal_refs(task: TaskSpec, people: list, llm_fields: dict[str, str]) -> PersonalRefs:
    """The refs of the people (:class:`~stepback_ray.generation.prompting.Persona`) whose context a prompt uses:
    each one's newest :data:`MAX_OWN_OUTPUTS` own outputs of the task's kind, and the LLM's fields of their profile."""

    name = getattr(task.habits, "field", None)
    refs = PersonalRefs()
    for person in people:
        if name:
            refs.outputs += [
                it[name] for it in most_recent_first(person.history)[:MAX_OWN_OUTPUTS] if (it.get(name) or "").strip()
            ]
        if llm_fields.get(person.user_id):
            refs.profiles.append(llm_fields[person.user_id])
    return refs


def similarity(task: TaskSpec, a: str, b: str) -> float:
    """The task's metric on one pair, as a similarity in [0, 1]."""
    if task.metric == "rouge":
        return rouge(a, b)[0]
    if task.metric == "accuracy_f1":
        return float(a.strip().lower() == b.strip().lower())
    try:
        return 1.0 - min(4.0, abs(rating_value(a, b) - float(b))) / 4.0
    except ValueError:
        return 0.0


def _mean_similarity(task: TaskSpec, candidate: str, refs: list[str]) -> float:
    return float(np.mean([similarity(task, candidate, r) for r in refs])) if refs else 0.0


def scores(task: TaskSpec, candidates: list[str | None], refs: PersonalRefs) -> list[float]:
    """Each candidate's selection score (``None``, an unparseable candidate, scores -inf)."""
    ok = [c for c in candidates if c is not None]
    out = []
    for i, c in enumerate(candidates):
        if c is None:
            out.append(float("-inf"))
            continue
        others = [d for j, d in enumerate(candidates) if j != i and d is not None]
        value = _mean_similarity(task, c, others) if len(ok) > 1 else 0.0
        value += _mean_similarity(task, c, refs.outputs)
        if task.metric == "rouge":
            value += _mean_similarity(task, c, refs.profiles)
        out.append(value)
    return out


def choose(task: TaskSpec, candidates: list[str | None], refs: PersonalRefs) -> int:
    """The index of the candidate to keep (the first on ties; 0 when none parses)."""
    s = scores(task, candidates, refs)
    return int(np.argmax(s)) if s and max(s) > float("-inf") else 0
