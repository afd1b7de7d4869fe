"""What each personalization task is: one :class:`TaskSpec` per task.

A task spec says how a history item becomes text (for retrieval, for few-shot turns, for the profile prompt and
for the official LaMP inline pattern), which part of the input is the retrieval query, how the model is
instructed, how its raw output is parsed, and which metric scores it. Everything task-specific lives here, so the
pipeline stages stay task-agnostic.

Tasks: LaMP_1 (citation choice), LaMP_2 (movie tags), LaMP_2_news (the older news-category LaMP_2), LaMP_3
(review score), LaMP_4 (news headline), LaMP_5 (paper title), LaMP_6 (email subject), LaMP_7 (tweet
paraphrase), PSW_title and PSW_abstract (multi-author scientific writing).
"""

from __future__ import annotations

from stepback_ray.errors import ConfigError
from stepback_ray.tasks.habits import LabelHabits, RatingHabits, TextHabits
from stepback_ray.tasks.parsing import (
    after,
    citation_query,
    clean_paragraph,
    label_parser,
    parse_citation,
    parse_score,
)
from stepback_ray.tasks.profile_schemas import EMAIL, MOVIES, NEWS, REVIEWS, SCHOLARLY, TWEETS, ProfileSchema
from stepback_ray.tasks.spec import MOVIE_TAGS, NEWS_CATEGORIES, Item, TaskSpec

__all__ = [
    "MOVIE_TAGS",
    "NEWS_CATEGORIES",
    "TASKS",
    "TASK_ALIASES",
    "Item",
    "ProfileSchema",
    "TaskSpec",
    "get_task",
    "same_task",
]


def _after_title(patterns: list[str], text: str) -> str:
    """LaMP_1's official composition: the author's titles are inserted right after the word 'title'."""
    i = text.find("title")
    if i < 0:
        return text
    return text[: i + 5] + ", and " + ", and ".join(patterns) + text[i + 5 :]


_SCHOLARLY_ITEM = ("title", "abstract")
TITLE_HABITS = TextHabits("title", "titles", "Title habits")


def _paper_item(it: Item) -> str:
    return f"Title: {it['title']}\nAbstract: {it['abstract']}"


TASKS: dict[str, TaskSpec] = {
    "LaMP_1": TaskSpec(
        name="LaMP_1",
        kind="classification",
        item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}",
        query_text=citation_query,
        profile_item=_paper_item,
        pattern=lambda it: f'"{it["title"]}"',
        system="You pick which of two references an author is more likely to cite. Answer with [1] or [2] only.",
        context_label="Papers this author has written",
        profile=SCHOLARLY,
        metric="accuracy_f1",
        parse=parse_citation,
        labels=("[1]", "[2]"),
        max_new_tokens=4,
        compose_plain=_after_title,
    ),
    "LaMP_2": TaskSpec(
        name="LaMP_2",
        kind="classification",
        item_fields=("description", "tag"),
        corpus_text=lambda it: it["description"],
        query_text=after("description:"),
        profile_item=lambda it: f"Movie: {it['description']}\nTag: {it['tag']}",
        pattern=lambda it: f'the tag for the movie: "{it["description"]}" is "{it["tag"]}" ',
        example=lambda it: (
            "Which tag does this movie relate to among the following tags? Just answer with the tag "
            f"name without further explanation. tags: [{', '.join(MOVIE_TAGS)}] description: "
            f"{it['description']}",
            it["tag"],
        ),
        system="You tag movies the way this viewer does. Answer with one tag from the list, nothing else.",
        profile=MOVIES,
        metric="accuracy_f1",
        parse=label_parser(MOVIE_TAGS),
        labels=MOVIE_TAGS,
        max_new_tokens=8,
        habits=LabelHabits("tag", "tags", "Tagging habits"),
    ),
    "LaMP_2_news": TaskSpec(
        name="LaMP_2_news",
        kind="classification",
        item_fields=("text", "category"),
        corpus_text=lambda it: f"{it.get('title', '')} {it['text']}".strip(),
        query_text=after("article:"),
        profile_item=lambda it: f"Article: {it['text']}\nCategory: {it['category']}",
        pattern=lambda it: f'the category for the article: "{it["text"]}" is "{it["category"]}" ',
        example=lambda it: (
            "Which category does this article relate to among the following categories? Just answer "
            f"with the category name without further explanation. categories: "
            f"[{', '.join(NEWS_CATEGORIES)}] article: {it['text']}",
            it["category"],
        ),
        system="You file news articles into categories the way this journalist does. Answer with one category "
        "from the list, nothing else.",
        profile=NEWS,
        metric="accuracy_f1",
        parse=label_parser(NEWS_CATEGORIES),
        labels=NEWS_CATEGORIES,
        plug_text=lambda it: f"{it['text']} {it.get('title', '')}".strip(),
        official_name="LaMP_2",
        max_new_tokens=8,
        habits=LabelHabits("category", "categories", "Filing habits"),
    ),
    "LaMP_3": TaskSpec(
        name="LaMP_3",
        kind="rating",
        item_fields=("text", "score"),
        corpus_text=lambda it: it["text"],
        query_text=after("review:"),
        profile_item=lambda it: f"Review: {it['text']}\nScore: {it['score']}",
        pattern=lambda it: f'{it["score"]} is the score for "{it["text"]}" ',
        example=lambda it: (
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
            f"3, 4, or 5 without further explanation. review: {it['text']}",
            it["score"],
        ),
        system="You predict the score (1 to 5) this reviewer gives. Answer with a single digit.",
        profile=REVIEWS,
        metric="mae_rmse",
        parse=parse_score,
        labels=("1", "2", "3", "4", "5"),
        max_new_tokens=4,
        habits=RatingHabits("score"),
    ),
    "LaMP_4": TaskSpec(
        name="LaMP_4",
        kind="generation",
        item_fields=("title", "text"),
        corpus_text=lambda it: f"{it['title']} {it['text']}",
        query_text=after("article:"),
        plug_text=lambda it: f"{it['text']} {it['title']}",
        profile_item=lambda it: f"Headline: {it['title']}\nArticle: {it['text']}",
        pattern=lambda it: f'"{it["title"]}" is the title for "{it["text"]}" ',
        example=lambda it: (f"Generate a headline for the following article: {it['text']}", it["title"]),
        system="You write the headline of a news article from its text. Reply with the headline only.",
        profile=NEWS,
        metric="rouge",
        answer_prefix="Headline:",
        output_noun="headline",
        habits=TextHabits("title", "headlines", "Headline habits"),
    ),
    "LaMP_5": TaskSpec(
        name="LaMP_5",
        kind="generation",
        item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}",
        query_text=after("paper:"),
        profile_item=_paper_item,
        pattern=lambda it: f'"{it["title"]}" is a title for "{it["abstract"]}" ',
        example=lambda it: (f"Generate a title for the following abstract of a paper: {it['abstract']}", it["title"]),
        system="You write the title of a scientific paper from its abstract. Reply with the title only.",
        profile=SCHOLARLY,
        metric="rouge",
        answer_prefix="Title:",
        pattern_tail=". Following the given patterns ",
        output_noun="title",
        habits=TITLE_HABITS,
    ),
    "LaMP_6": TaskSpec(
        name="LaMP_6",
        kind="generation",
        item_fields=("text", "title"),
        corpus_text=lambda it: it["text"],
        query_text=after(":"),
        profile_item=lambda it: f"Subject: {it['title']}\nEmail: {it['text']}",
        pattern=lambda it: f'"{it["title"]}" is the title for "{it["text"]}" ',
        example=lambda it: (f"Generate a subject for the following email: {it['text']}", it["title"]),
        system="You write the subject line of an email from its body. Reply with the subject only.",
        profile=EMAIL,
        metric="rouge",
        answer_prefix="Subject:",
        output_noun="subject",
        habits=TextHabits("title", "subjects", "Subject-line habits"),
    ),
    "LaMP_7": TaskSpec(
        name="LaMP_7",
        kind="generation",
        item_fields=("text",),
        corpus_text=lambda it: it["text"],
        query_text=after(":"),
        profile_item=lambda it: f"Tweet: {it['text']}",
        pattern=lambda it: f'"{it["text"]}" ',
        system="You paraphrase a tweet in this person's own voice. Reply with the paraphrased tweet only.",
        context_label="Tweets this person has written",
        profile=TWEETS,
        metric="rouge",
        answer_prefix="Paraphrase:",
        pattern_tail=" are written by a person. Following the given patterns ",
        output_noun="paraphrase",
        habits=TextHabits("text", "tweets", "Tweet habits"),
    ),
    "PSW_title": TaskSpec(
        name="PSW_title",
        kind="generation",
        item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}",
        query_text=after("paper:"),
        profile_item=_paper_item,
        pattern=lambda it: f'"{it["title"]}" is a title for "{it["abstract"]}" ',
        example=lambda it: (f"Generate a title for the following abstract of a paper: {it['abstract']}", it["title"]),
        system="You write the title of a scientific paper from its abstract. Reply with the title only.",
        profile=SCHOLARLY,
        metric="rouge",
        answer_prefix="Title:",
        pattern_tail=". Following the given patterns ",
        multi_author=True,
        output_noun="title",
        habits=TITLE_HABITS,
    ),
    "PSW_abstract": TaskSpec(
        name="PSW_abstract",
        kind="generation",
        item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}",
        query_text=after("titled:"),
        profile_item=_paper_item,
        pattern=lambda it: f'"{it["abstract"]}" is the abstract for "{it["title"]}" ',
        example=lambda it: (f"Write the abstract of a paper titled: {it['title']}", it["abstract"]),
        system="You write the abstract of a scientific paper from its title. Reply with the abstract only, as one "
        "paragraph.",
        profile=SCHOLARLY,
        metric="rouge",
        parse=clean_paragraph,
        stop=("\n\n",),
        max_new_tokens=192,
        answer_prefix="Abstract:",
        pattern_tail=". Following the given patterns ",
        multi_author=True,
        output_noun="abstract",
        habits=TextHabits("abstract", "abstracts", "Abstract habits"),
    ),
}

TASK_ALIASES = {
    "LaMP-1": "LaMP_1",
    "LaMP-2": "LaMP_2",
    "LaMP-2-old": "LaMP_2_news",
    "LaMP_2_old": "LaMP_2_news",
    "LaMP-3": "LaMP_3",
    "LaMP-4": "LaMP_4",
    "LaMP-5": "LaMP_5",
    "LaMP-6": "LaMP_6",
    "LaMP-7": "LaMP_7",
}


def same_task(file_task: str, task: str) -> bool:
    """Whether a file that names ``file_task`` holds ``task``'s data: official outputs name LaMP_2 for both label
    sets, and PSW files name their variant."""
    canon = TASK_ALIASES.get(file_task, file_task).replace("-", "_")
    return canon == task or (task in TASKS and canon == TASKS[task].file_task)


def get_task(name: str) -> TaskSpec:
    name = TASK_ALIASES.get(name, name)
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
