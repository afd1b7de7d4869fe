"""Facts measured from a user's history: the model-free half of a step-back profile.

A small LLM asked to describe a person's writing style tends to repeat whatever its prompt shows (the worked
example's style sentence, word for word). What the history itself says is more reliable and costs no LLM call:
how long the user's titles are, how often they take the "Name: description" form, whether they are in title case,
which words recur in them; for labelling tasks, which labels the user gives and how often; for ratings, how they
score. Each task says which helper measures it and which item field holds the user's own output
(:attr:`~stepback_ray.tasks.TaskSpec.habits`); the facts are computed over the whole history (not only the part
the LLM saw), rendered as a few short lines, and kept with the profile.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

Item = dict[str, str]


class Habits(Protocol):
    label: str
    """How the facts are headed in a profile ("Title habits")."""

    def __call__(self, items: list[Item]) -> list[str]:
        """Short factual lines about the user's own outputs in ``items`` (none if too few to tell)."""


MIN_ITEMS = 2
"""Fewer items than this say nothing about a habit: no facts."""
MAX_WORDS = 6
"""Recurring words listed at most."""

STOPWORDS = frozenset(
    """a an the and or but of for to in on at by with from via into onto over under as is are be
was were been being it its this that these those we our you your their his her they them he she i my me not no
do does did can could should would will shall may might must than then so such very more most less least about
after before between through during without within across against among toward towards up down out off new using
based how what why when where which who whom whose all any both each few other some own same too only just also
versus vs has have had""".split()
)

_WORD = re.compile(r"[A-Za-z][A-Za-z0-9'\-]*")


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def content_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` without stopwords and one- or two-letter tokens."""
    return [w.lower() for w in words(text) if len(w) > 2 and w.lower() not in STOPWORDS]


def _share(flags: list[bool]) -> str:
    return f"{sum(flags) or 'none'} of {len(flags)}"


def _length_fact(lengths: list[int], noun: str) -> str:
    q = statistics.quantiles(lengths, n=4, method="inclusive") if len(lengths) >= 2 else [lengths[0]] * 3
    lo, mid, hi = round(q[0]), round(statistics.median(lengths)), round(q[2])
    span = f"{lo}-{hi} words" if hi > lo else f"{mid} words"
    return f"{noun.capitalize()} are {span} long (median {mid})"


def _title_cased(text: str) -> bool | None:
    """Whether the longer words of ``text`` are capitalized (None: too few to tell)."""
    longer = [w for w in words(text) if len(w) > 3 and w.lower() not in STOPWORDS]
    if len(longer) < 2:
        return None
    return sum(w[0].isupper() for w in longer) >= 0.75 * len(longer)


def _texts(items: list[Item], field: str) -> list[str]:
    """The non-empty values of ``field`` in ``items``, stripped, in order."""
    return [t for t in ((it.get(field) or "").strip() for it in items) if t]


@dataclass(frozen=True)
class _FieldHabits:
    """Habits read from one field of the user's items."""

    field: str
    noun: str
    """What the values are called, plural ("titles", "categories")."""
    label: str
    """How the facts are headed in a profile ("Title habits")."""


@dataclass(frozen=True)
class TextHabits(_FieldHabits):
    """Habits of short texts the user wrote themselves (titles, headlines, subjects, tweets)."""

    def __call__(self, items: list[Item]) -> list[str]:
        texts = _texts(items, self.field)
        if len(texts) < MIN_ITEMS:
            return []
        n = len(texts)
        facts = [_length_fact([len(words(t)) for t in texts], self.noun)]
        colon = [":" in t for t in texts]
        if sum(colon) * 2 >= n:
            heads = [t.split(":", 1)[0].strip() for t in texts if ":" in t]
            short = [h for h in heads if len(words(h)) <= 2]
            form = f"{_share(colon)} {self.noun} have the form 'Name: description'"
            if short:
                form += f" (names such as {', '.join(dict.fromkeys(short[:3]))})"
            facts.append(form)
        elif n >= 4:
            facts.append(f"{_share(colon)} {self.noun} use a colon")
        cased = [c for c in (_title_cased(t) for t in texts) if c is not None]
        if len(cased) >= MIN_ITEMS:
            upper = sum(cased)
            if upper * 4 >= 3 * len(cased):
                facts.append("Written in Title Case")
            elif upper * 4 <= len(cased):
                facts.append("Written in sentence case (only the first word capitalized)")
        questions = [t.rstrip().endswith("?") for t in texts]
        if sum(questions) * 4 >= n:
            facts.append(f"{_share(questions)} {self.noun} are questions")
        counts = Counter(w for t in texts for w in set(content_words(t)))
        ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))  # ties alphabetical: the same text each run
        recurring = [f"{w} ({c})" for w, c in ranked[:MAX_WORDS] if c >= 2]
        if recurring:
            facts.append(f"Recurring words: {', '.join(recurring)}")
        return facts

    def exemplars(self, items: list[Item], n: int) -> list[str]:
        """The first ``n`` of the user's own texts in ``items`` (give them newest first)."""
        return _texts(items, self.field)[:n]


@dataclass(frozen=True)
class LabelHabits(_FieldHabits):
    """How often the user gives each label (movie tags, news categories)."""

    def __call__(self, items: list[Item]) -> list[str]:
        labels = _texts(items, self.field)
        if len(labels) < MIN_ITEMS:
            return []
        counts = Counter(labels).most_common(5)
        return [
            f"{self.noun.capitalize()} given over {len(labels)} items: "
            + ", ".join(f"{lab} ({c})" for lab, c in counts)
        ]


@dataclass(frozen=True)
class RatingHabits:
    """How the user scores (1-5 ratings)."""

    field: str
    label: str = "Rating habits"

    def __call__(self, items: list[Item]) -> list[str]:
        scores = []
        for it in items:
            try:
                scores.append(float(it.get(self.field, "")))
            except ValueError:
                continue
        if len(scores) < MIN_ITEMS:
            return []
        counts = Counter(int(round(s)) for s in scores)
        spread = ", ".join(f"{k}: {counts[k]}" for k in sorted(counts))
        return [f"Average score {statistics.mean(scores):.1f} over {len(scores)} reviews (scores given: {spread})"]


def render_facts(facts: list[str]) -> str:
    return "; ".join(facts)
