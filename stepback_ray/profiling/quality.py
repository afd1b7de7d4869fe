"""Model-free measures of how personal a run's profiles are, cheap enough for every nightly pass.

- **Identifiability**: for each user, every user of the sample is ranked by BM25 between this user's profile text
  (the query) and each user's whole history (one document per user). A profile that carries personal signal
  ranks its own user first; one that says what any profile says ranks them at chance. Reported as top-1 accuracy
  and mean reciprocal rank, each beside its chance level (1/N and H_N/N), for the LLM's fields alone and for the
  profile as the prompts see it (with the habits measured from the history, which are personal by construction).
- **Grounding**: the share of a profile's keywords whose words all occur in the user's own history; a keyword
  that does not is invented, or copied from the prompt.
- **Copied from the example**: the share of profiles with a field equal to (or a long prefix of) the worked
  example's: the failure a small model shows when the example anchors its answer instead of showing the format.

The sample is at most :data:`SAMPLE_USERS` users (whole chunks, in chunk order: a chunk is a hash shard, so this is
a sample independent of the input order); the chance levels are those of its size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stepback_ray.generation.retrieval import bm25_index, query_terms
from stepback_ray.tasks import ProfileSchema, TaskSpec
from stepback_ray.tasks.habits import content_words

SAMPLE_USERS = 1000


def _ranks(queries: list[str], documents: list[str]) -> list[int] | None:
    """The 1-based rank of document i for query i, under BM25 over ``documents`` (ties count against it); None
    when no document has a searchable word (nothing to rank by)."""
    index = bm25_index(documents)
    if index is None:
        return None
    ranks = []
    for i, q in enumerate(queries):
        tokens = query_terms(q)
        if not tokens:
            ranks.append(len(documents))  # says nothing: last
            continue
        scores = np.asarray(index.get_scores(tokens), dtype=float)
        ranks.append(int((scores >= scores[i]).sum()))
    return ranks


def identifiability(profile_texts: list[str], histories: list[str]) -> dict[str, Any]:
    """Top-1 accuracy and MRR of finding each user's history from their profile text, with chance levels (all
    None when there is nothing to identify by: under two users, or histories without a searchable word)."""
    n = len(profile_texts)
    ranked = _ranks(profile_texts, histories) if n >= 2 else None
    if ranked is None:
        return {"users": n, "top1": None, "mrr": None, "chance_top1": None, "chance_mrr": None}
    ranks = np.asarray(ranked)
    harmonic = float(np.sum(1.0 / np.arange(1, n + 1)))
    return {
        "users": n,
        "top1": round(float((ranks == 1).mean()), 4),
        "mrr": round(float((1.0 / ranks).mean()), 4),
        "chance_top1": round(1.0 / n, 4),
        "chance_mrr": round(harmonic / n, 4),
    }


def grounded(keyword: str, history_words: set[str]) -> bool:
    words = content_words(keyword)
    return bool(words) and all(w in history_words for w in words)


def grounding(keywords: list[list[str]], histories: list[str]) -> dict[str, Any]:
    """Mean over users (with keywords) of the share of their keywords grounded in their own history."""
    shares = []
    for kws, hist in zip(keywords, histories):
        kws = [k for k in kws if content_words(k)]
        if kws:
            vocab = set(content_words(hist))
            shares.append(sum(grounded(k, vocab) for k in kws) / len(kws))
    return {"users": len(shares), "keywords_grounded": round(float(np.mean(shares)), 4) if shares else None}


def _norm(value: Any) -> str:
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return " ".join(str(value or "").lower().split()).strip(" .")


def copied_field(profile: dict[str, Any], schema: ProfileSchema) -> bool:
    """Whether any field of ``profile`` repeats a worked example's (equal, or one a prefix of the other): the worked
    example or the contrasting one, whichever the prompt showed."""
    for name in schema.fields:
        mine = _norm(profile.get(name))
        for example in (schema.example_profile, schema.contrast_profile):
            theirs = _norm(example.get(name))
            if len(mine) >= 12 and (mine == theirs or theirs.startswith(mine) or mine.startswith(theirs)):
                return True
    return False


def measure(
    task: TaskSpec, users: list[tuple[dict[str, Any] | None, list[dict[str, str]]]], render_llm: Any, render_full: Any
) -> dict[str, Any]:
    """All measures over ``users`` (profile dict or None, history items). ``render_llm`` / ``render_full`` turn a
    profile into the text of the LLM's fields alone / the text the prompts show."""
    schema = task.profile
    users = [(p, items) for p, items in users if items]  # an empty history has nothing to be identified by
    keyword_field = next((f for f in schema.fields if isinstance(schema.example_profile.get(f), list)), None)
    histories = [" ".join(task.corpus_text(it) for it in items) for _, items in users]
    profiles = [p or {} for p, _ in users]
    with_profile = [p for p in profiles if p]
    return {
        "identifiability": identifiability([render_llm(p) if p else "" for p in profiles], histories),
        "identifiability_with_habits": identifiability([render_full(p) if p else "" for p in profiles], histories),
        "grounding": grounding(
            [list(p.get(keyword_field) or []) if keyword_field else [] for p in profiles], histories
        ),
        "copied_from_example": round(sum(copied_field(p, schema) for p in with_profile) / len(with_profile), 4)
        if with_profile
        else None,
    }
