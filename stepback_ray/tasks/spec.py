"""The shape of a task: :class:`TaskSpec`, everything task-specific the stages read, so they stay task-agnostic."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from stepback_ray.tasks.habits import Habits
from stepback_ray.tasks.parsing import clean_one_line
from stepback_ray.tasks.profile_schemas import ProfileSchema

Item = dict[str, str]

MOVIE_TAGS = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)
NEWS_CATEGORIES = (
    "food & drink",
    "sports",
    "education",
    "parents",
    "religion",
    "travel",
    "business",
    "crime",
    "science & technology",
    "culture & arts",
    "entertainment",
    "politics",
    "women",
    "style & beauty",
    "healthy living",
)
"""In the order of the official LaMP evaluation script's label list (it scores 'LaMP_2' with this list)."""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["generation", "classification", "rating"]
    item_fields: tuple[str, ...]
    """Fields every history item must carry for this task."""
    corpus_text: Callable[[Item], str]
    """Item -> retrieval document (the official LaMP corpus)."""
    query_text: Callable[[str], str]
    """Task input -> retrieval query (the official LaMP extraction)."""
    profile_item: Callable[[Item], str]
    """Item -> text shown in the step-back profile prompt."""
    pattern: Callable[[Item], str]
    """Item -> the official LaMP inline pattern (used for base models, joined with ', and ')."""
    system: str
    """Instruction for chat models."""
    profile: ProfileSchema
    metric: Literal["rouge", "accuracy_f1", "mae_rmse"]
    example: Callable[[Item], tuple[str, str]] | None = None
    """Item -> (input, output) in the task's own shape: a few-shot turn from the user's own history. ``None``
    when history items have no output of this task's kind (LaMP_1, LaMP_7): they are shown as context instead."""
    context_label: str = ""
    """Heading for history items shown as context (tasks without ``example``)."""
    parse: Callable[[str], str | None] = clean_one_line
    """Raw model text -> the answer (``None``: no valid answer could be read)."""
    labels: tuple[str, ...] = ()
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int | None = None
    """Task default for generation.max_new_tokens (``None``: the job's setting)."""
    answer_prefix: str = "Answer:"
    """What a plain (base-model) prompt ends with, for the model to continue."""
    pattern_tail: str = ". "
    """Text between the joined inline patterns and the input in the official LaMP prompt."""
    multi_author: bool = False
    output_noun: str = "answer"
    """What the output is called in merge prompts ("title", "abstract", ...)."""
    compose_plain: Callable[[list[str], str], str] | None = None
    """Official LaMP composition of inline patterns and input (default: joined patterns, tail, input)."""
    habits: Habits | None = None
    """What is measured from the history beside the LLM's profile: the habits of the user's own outputs of this
    task's kind (``None``: the items hold nothing of the kind, as LaMP_1's paper titles for a citation choice)."""
    plug_text: Callable[[Item], str] | None = None
    """Item -> the text Persona-Plug's encoder embeds, where the PPlug code's format differs from ``corpus_text``."""
    official_name: str | None = None
    """The ``task`` official LaMP files write for this task, where it differs from ``name``."""

    @property
    def file_task(self) -> str:
        """The task name an official outputs file carries (LaMP_2 for both LaMP_2 label sets)."""
        return self.official_name or self.name

    def plug_item(self, item: Item) -> str:
        return (self.plug_text or self.corpus_text)(item)

    def gold_problem(self, gold: str) -> str | None:
        """Why ``gold`` cannot be scored for this task (None: it can). Checked when the input is read, so a bad
        gold fails (LaMP files) or is quarantined (datasets) before any engine work, not at scoring."""
        if self.metric == "mae_rmse":
            try:
                value = float(gold)
            except ValueError:
                return f"not a number: {gold[:40]!r} (task {self.name} scores ratings)"
            if not math.isfinite(value):
                return f"not a finite number: {gold!r}"
        return None

    def plain(self, patterns: list[str], text: str) -> str:
        """The official LaMP inline prompt for a base model: the user's items as patterns, then the input."""
        if not patterns:
            return text
        if self.compose_plain is not None:
            return self.compose_plain(patterns, text)
        return f"{', and '.join(patterns)}{self.pattern_tail}{text}"
