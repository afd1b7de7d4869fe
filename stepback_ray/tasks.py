"""What each personalization task is: one :class:`TaskSpec` per task.

A task spec says how a history item becomes text (for retrieval, for few-shot turns and for the profile prompt,
following the official LaMP per-task formats), which part of the input is the retrieval query, how the model is
instructed, how its raw output is cleaned, and which metric scores it. Everything task-specific lives here, so
the pipeline stages stay task-agnostic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Literal

Item = dict[str, str]


def _after(marker: str) -> Callable[[str], str]:
    """Official LaMP query extraction: the text after the first ``marker`` (the whole input if absent)."""

    def extract(text: str) -> str:
        i = text.find(marker)
        return text[i + len(marker):].strip() if i >= 0 else text.strip()

    return extract


_PREFIX = re.compile(r"^\s*(title|headline|answer|output|subject)\s*[:：-]\s*", re.IGNORECASE)


def clean_one_line(text: str) -> str:
    """First non-empty line, without a leading ``Title:``-style label and without wrapping quotes/markup."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line.strip())
    line = line.strip().strip("*").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    line = line.strip("\u201c\u201d\"").strip()
    return line


@dataclass(frozen=True)
class ProfileSchema:
    """The fields of a step-back profile for one task family, with a worked example for few-shot prompting."""

    family: str
    person: str
    """Who the history belongs to, as the prompts call them ("author", "journalist", ...)."""
    fields: tuple[str, ...]
    labels: dict[str, str]
    instruction: str
    example_items: tuple[Item, ...]
    example_profile: dict[str, object]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["generation", "classification", "rating"]
    item_fields: tuple[str, ...]
    """Fields every history item must carry for this task."""
    corpus_text: Callable[[Item], str]
    """Item -> retrieval document (official LaMP corpus)."""
    query_text: Callable[[str], str]
    """Task input -> retrieval query (official LaMP extraction)."""
    example: Callable[[Item], tuple[str, str]]
    """Item -> (input, output) in the task's own shape: a few-shot turn from the user's own history."""
    profile_item: Callable[[Item], str]
    """Item -> text shown in the step-back profile prompt."""
    system: str
    """Instruction for chat models."""
    profile: ProfileSchema
    metric: Literal["rouge", "accuracy_f1", "mae_rmse"]
    clean: Callable[[str], str] = clean_one_line
    stop: tuple[str, ...] = ("\n",)
    labels: tuple[str, ...] = field(default=())


SCHOLARLY = ProfileSchema(
    family="scholarly",
    person="author",
    fields=("keywords", "topics", "style"),
    labels={"keywords": "Keywords", "topics": "Research topics", "style": "Title style"},
    instruction=(
        "You read the papers an author wrote and step back to describe the author. Answer with one JSON object "
        'with the keys "keywords" (recurring technical keywords), "topics" (the author\'s research topics) and '
        '"style" (one sentence on how the author phrases titles).'
    ),
    example_items=(
        {"title": "Sparse Mixture-of-Experts for Low-Resource Speech Recognition",
         "abstract": "We study mixture-of-experts acoustic models when only a few hours of transcribed speech are "
                     "available. A sparse router with load balancing improves word error rate on six low-resource "
                     "languages."},
        {"title": "SpeechPrune: Token Pruning for Efficient Speech Transformers",
         "abstract": "Speech transformers spend most compute on redundant frames. We prune acoustic tokens with a "
                     "learned saliency score, halving inference cost with no loss in accuracy."},
    ),
    example_profile={
        "keywords": ["speech recognition", "mixture-of-experts", "low-resource languages", "token pruning"],
        "topics": ["efficient speech models", "multilingual ASR"],
        "style": "Short titles that name the method first, often a coined name followed by a colon.",
    },
)

NEWS = ProfileSchema(
    family="news",
    person="journalist",
    fields=("keywords", "topics", "style"),
    labels={"keywords": "Recurring subjects", "topics": "Beats", "style": "Headline style and tone"},
    instruction=(
        "You read the articles a journalist wrote and step back to describe the journalist. Answer with one JSON "
        'object with the keys "keywords" (recurring subjects), "topics" (the journalist\'s beats) and "style" '
        "(one sentence on the tone and style of the journalist's headlines)."
    ),
    example_items=(
        {"title": "This Dog Waited 3 Years At The Shelter. Then Everything Changed.",
         "text": "A pit bull mix that nobody wanted finally found a home with a retired firefighter."},
        {"title": "Watch A Toddler Lose It Over Her First Snowfall",
         "text": "Her reaction is pure joy, and the internet can't get enough."},
    ),
    example_profile={
        "keywords": ["pets", "viral videos", "feel-good stories"],
        "topics": ["animals", "parenting", "internet culture"],
        "style": "Warm, upbeat headlines in title case that tease the story with a hook.",
    },
)

_GEN_SYSTEM_PAPER = "You write the title of a scientific paper from its abstract. Reply with the title only."
_GEN_SYSTEM_NEWS = "You write the headline of a news article from its text. Reply with the headline only."

TASKS: dict[str, TaskSpec] = {
    "LaMP_4": TaskSpec(
        name="LaMP_4",
        kind="generation",
        item_fields=("title", "text"),
        corpus_text=lambda it: f"{it['title']} {it['text']}",
        query_text=_after("article:"),
        example=lambda it: (f"Generate a headline for the following article: {it['text']}", it["title"]),
        profile_item=lambda it: f"Headline: {it['title']}\nArticle: {it['text']}",
        system=_GEN_SYSTEM_NEWS,
        profile=NEWS,
        metric="rouge",
    ),
    "LaMP_5": TaskSpec(
        name="LaMP_5",
        kind="generation",
        item_fields=("title", "abstract"),
        corpus_text=lambda it: f"{it['title']} {it['abstract']}",
        query_text=_after("paper:"),
        example=lambda it: (f"Generate a title for the following abstract of a paper: {it['abstract']}", it["title"]),
        profile_item=lambda it: f"Title: {it['title']}\nAbstract: {it['abstract']}",
        system=_GEN_SYSTEM_PAPER,
        profile=SCHOLARLY,
        metric="rouge",
    ),
}


def get_task(name: str) -> TaskSpec:
    from .errors import ConfigError

    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
