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

import math

import re
from dataclasses import dataclass
from typing import Callable, Literal

from .history_facts import Habits, LabelHabits, RatingHabits, TextHabits

Item = dict[str, str]

# ----------------------------------------------------------------------------------------------- helpers


def after(marker: str) -> Callable[[str], str]:
    """Official LaMP query extraction: the text after the first ``marker`` (the whole input if absent)."""

    def extract(text: str) -> str:
        i = text.find(marker)
        return text[i + len(marker):].strip() if i >= 0 else text.strip()

    return extract


def quoted(text: str) -> list[str]:
    """The double-quoted strings of ``text``, in order (LaMP_1 inputs quote the title and both references)."""
    return re.findall(r'"([^"]*)"', text)


def _citation_query(text: str) -> str:
    """LaMP_1's official retrieval query: the two candidate references (quoted strings 2 and 3)."""
    q = quoted(text)
    return f"{q[1]} {q[2]}" if len(q) >= 3 else text


_PREFIX = re.compile(r"^\s*(title|headline|answer|output|subject|paraphrase|tweet|abstract|tag|category|score)"
                     r"\s*[:：-]\s*", re.IGNORECASE)


def clean_one_line(text: str) -> str:
    """First non-empty line, without a leading ``Title:``-style label and without wrapping quotes/markup."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line.strip())
    line = line.strip().strip("*").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line.strip("\u201c\u201d\"").strip()


def clean_paragraph(text: str) -> str:
    """A paragraph answer (an abstract): the text up to the first blank line, label removed, spaces folded."""
    body = text.strip().split("\n\n")[0]
    body = _PREFIX.sub("", body.strip())
    return " ".join(body.split())


def label_parser(labels: tuple[str, ...]) -> Callable[[str], str | None]:
    """Map a free-text answer to one of ``labels``: exact match first, else the earliest label named in the
    answer (longest first on ties, so 'dark comedy' beats 'comedy'); ``None`` if no label appears."""
    by_lower = {lab.lower(): lab for lab in labels}

    def parse(text: str) -> str | None:
        t = clean_one_line(text).lower().strip(" .")
        if t in by_lower:
            return by_lower[t]
        low = text.lower()
        hits = [(low.find(lab), -len(lab), lab) for lab in by_lower if lab in low]
        return by_lower[min(hits)[2]] if hits else None

    return parse


def parse_citation(text: str) -> str | None:
    m = re.search(r"\[\s*([12])\s*\]", text) or re.match(r"\s*([12])\b", text)
    return f"[{m.group(1)}]" if m else None


def parse_score(text: str) -> str | None:
    m = re.search(r"(?<![\d.])([1-5])(?:\.0+)?(?![\d.])", text)
    return m.group(1) if m else None


# ----------------------------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ProfileSchema:
    """The fields of a step-back profile for one task family, with worked examples for few-shot prompting.
    Every family has the same three fields (keywords, topics, style); the labels and the instruction differ.

    ``example_*`` is the worked example. ``contrast_*`` is a second one about a person whose style is the opposite:
    shown together (``profile.example: contrast``), the two say that the style field is read off the items, where
    one example alone is copied by a small model word for word."""

    family: str
    person: str
    """Who the history belongs to, as the prompts call them ("author", "journalist", ...)."""
    labels: dict[str, str]
    instruction: str
    example_items: tuple[str, ...]
    example_profile: dict[str, object]
    contrast_items: tuple[str, ...]
    contrast_profile: dict[str, object]
    fields: tuple[str, ...] = ("keywords", "topics", "style")

    def examples(self, kind: str) -> list[tuple[tuple[str, ...], dict[str, object]]]:
        """The worked examples (items, profile) a step-back prompt shows for ``profile.example`` = ``kind``."""
        worked = [(self.example_items, self.example_profile)]
        return {"none": [], "worked": worked, "contrast": worked + [(self.contrast_items, self.contrast_profile)]}[kind]


def _schema(family: str, person: str, what: str, labels: tuple[str, str, str], style_q: str,
            example_items: tuple[str, ...], example_profile: dict[str, object],
            contrast_items: tuple[str, ...], contrast_profile: dict[str, object]) -> ProfileSchema:
    kw, tp, st = labels
    return ProfileSchema(
        family=family, person=person, labels={"keywords": kw, "topics": tp, "style": st},
        instruction=(f"You read {what} and step back to describe the {person}. Answer with one JSON object with "
                     f'the keys "keywords" ({kw.lower()}), "topics" ({tp.lower()}) and "style" ({style_q}).'),
        example_items=example_items, example_profile=example_profile, contrast_items=contrast_items,
        contrast_profile=contrast_profile)


SCHOLARLY = _schema(
    "scholarly", "author", "the papers an author wrote",
    ("Keywords", "Research topics", "Title style"), "one sentence on how the author phrases titles",
    ("Title: Sparse Mixture-of-Experts for Low-Resource Speech Recognition\nAbstract: We study mixture-of-experts "
     "acoustic models when only a few hours of transcribed speech are available. A sparse router with load "
     "balancing improves word error rate on six low-resource languages.",
     "Title: SpeechPrune: Token Pruning for Efficient Speech Transformers\nAbstract: Speech transformers spend "
     "most compute on redundant frames. We prune acoustic tokens with a learned saliency score, halving inference "
     "cost with no loss in accuracy."),
    {"keywords": ["speech recognition", "mixture-of-experts", "low-resource languages", "token pruning"],
     "topics": ["efficient speech models", "multilingual ASR"],
     "style": "Short titles that name the method first, often a coined name followed by a colon."},
    ("Title: On the Convergence of Adaptive Gradient Methods for Nonconvex Stochastic Optimization\nAbstract: We "
     "prove that adaptive step sizes converge to stationary points under weaker noise assumptions than before.",
     "Title: A Theoretical Analysis of Learning Rate Warmup in the Training of Deep Residual Networks\nAbstract: "
     "We explain why warmup stabilizes early training by bounding the sharpness of the loss at initialization."),
    {"keywords": ["adaptive gradient methods", "nonconvex optimization", "learning rate warmup", "convergence"],
     "topics": ["optimization theory", "training dynamics"],
     "style": "Long descriptive titles that state the question studied in full, with no coined names or colons."})

NEWS = _schema(
    "news", "journalist", "the articles a journalist wrote",
    ("Recurring subjects", "Beats", "Headline style"), "one sentence on the tone and style of the headlines",
    ("Headline: This Dog Waited 3 Years At The Shelter. Then Everything Changed.\nArticle: A pit bull mix that "
     "nobody wanted finally found a home with a retired firefighter.",
     "Headline: Watch A Toddler Lose It Over Her First Snowfall\nArticle: Her reaction is pure joy, and the "
     "internet can't get enough."),
    {"keywords": ["pets", "viral videos", "feel-good stories"], "topics": ["animals", "parenting", "internet culture"],
     "style": "Warm, upbeat headlines in title case that tease the story with a hook."},
    ("Headline: Senate passes budget bill after overnight session\nArticle: The bill funds the government through "
     "September and now goes to the House.",
     "Headline: Fed holds rates steady, signals one cut this year\nArticle: Officials cited cooling inflation but "
     "a still strong labor market."),
    {"keywords": ["budget", "interest rates", "Congress"], "topics": ["politics", "economy"],
     "style": "Plain, factual headlines in sentence case that state the news with no hook."})

MOVIES = _schema(
    "movies", "viewer", "the movies a viewer tagged",
    ("Favourite tags", "Kinds of movies", "Tagging style"), "one sentence on how the viewer chooses tags",
    ("Movie: A retired hitman seeks revenge after thieves kill his dog.\nTag: action",
     "Movie: A detective hunts a serial killer who stages his murders after the seven deadly sins.\nTag: twist ending"),
    {"keywords": ["action", "twist ending"], "topics": ["crime thrillers", "revenge stories"],
     "style": "Tags the dominant genre unless the plot has a memorable surprise."},
    ("Movie: A young wizard discovers his heritage at a school of magic.\nTag: based on a book",
     "Movie: A lawyer defends a black man falsely accused in the segregated South.\nTag: based on a book"),
    {"keywords": ["based on a book"], "topics": ["literary adaptations", "coming-of-age stories"],
     "style": "Tags where the story comes from rather than its genre."})

REVIEWS = _schema(
    "reviews", "reviewer", "the product reviews a person wrote",
    ("Recurring aspects", "Products reviewed", "Rating style"), "one sentence on how strictly the reviewer scores",
    ("Review: Battery died after two weeks and support never answered.\nScore: 1",
     "Review: Does what it says, nothing more. Fine for the price.\nScore: 3"),
    {"keywords": ["battery life", "customer support", "value for money"], "topics": ["electronics", "gadgets"],
     "style": "A strict reviewer who rarely gives 5 and punishes poor support."},
    ("Review: Love it! Arrived early and the color is perfect.\nScore: 5",
     "Review: A bit smaller than I expected but still great.\nScore: 5"),
    {"keywords": ["fast delivery", "color", "size"], "topics": ["home decor", "clothing"],
     "style": "A generous reviewer who gives 5 unless something is clearly broken."})

EMAIL = _schema(
    "email", "writer", "the emails a person wrote",
    ("Recurring subjects", "Work topics", "Subject-line style"), "one sentence on how the writer phrases subjects",
    ("Subject: Q3 budget review moved to Friday\nEmail: Hi all, the budget review is moved to Friday at 10.",
     "Subject: Re: server outage\nEmail: The database is back up; root cause was a full disk."),
    {"keywords": ["budget", "meetings", "outages"], "topics": ["finance planning", "IT operations"],
     "style": "Short, factual subjects that state the news, often replies."},
    ("Subject: Thank you so much for a wonderful evening with the whole team!\nEmail: Dear Anna, what a lovely "
     "dinner; everyone is still talking about it.",
     "Subject: Invitation to our annual charity gala on the 12th of May\nEmail: Dear friends, we would be "
     "delighted to welcome you."),
    {"keywords": ["dinners", "invitations", "charity events"], "topics": ["events", "community"],
     "style": "Long, warm subjects that say the whole message in one polite sentence."})

TWEETS = _schema(
    "tweets", "person", "the tweets a person wrote",
    ("Recurring subjects", "Interests", "Writing style"), "one sentence on tone, slang, emoji and length",
    ("Tweet: cannot believe it's monday again ugh need coffee asap",
     "Tweet: best concert of my life last night!!! my ears are still ringing"),
    {"keywords": ["mondays", "coffee", "concerts"], "topics": ["daily life", "music"],
     "style": "Casual lower-case tweets with exclamation marks and little punctuation."},
    ("Tweet: Our new report on urban air quality is out today. Key findings in the thread below.",
     "Tweet: Grateful to the volunteers who planted 300 trees in Riverside Park this weekend."),
    {"keywords": ["air quality", "reports", "volunteering"], "topics": ["environment", "city life"],
     "style": "Formal, complete sentences with correct capitalization and no emoji."})


# ----------------------------------------------------------------------------------------------- tasks

MOVIE_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
              "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story")
NEWS_CATEGORIES = ("food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
                   "science & technology", "culture & arts", "entertainment", "politics", "women",
                   "style & beauty", "healthy living")
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


def _after_title(patterns: list[str], text: str) -> str:
    """LaMP_1's official composition: the author's titles are inserted right after the word 'title'."""
    i = text.find("title")
    if i < 0:
        return text
    return text[:i + 5] + ", and " + ", and ".join(patterns) + text[i + 5:]


_SCHOLARLY_ITEM = ("title", "abstract")
TITLE_HABITS = TextHabits("title", "titles", "Title habits")


def _paper_item(it: Item) -> str:
    return f"Title: {it['title']}\nAbstract: {it['abstract']}"


TASKS: dict[str, TaskSpec] = {
    "LaMP_1": TaskSpec(
        name="LaMP_1", kind="classification", item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}", query_text=_citation_query,
        profile_item=_paper_item, pattern=lambda it: f'"{it["title"]}"',
        system="You pick which of two references an author is more likely to cite. Answer with [1] or [2] only.",
        context_label="Papers this author has written", profile=SCHOLARLY, metric="accuracy_f1",
        parse=parse_citation, labels=("[1]", "[2]"), max_new_tokens=4, compose_plain=_after_title),
    "LaMP_2": TaskSpec(
        name="LaMP_2", kind="classification", item_fields=("description", "tag"),
        corpus_text=lambda it: it["description"], query_text=after("description:"),
        profile_item=lambda it: f"Movie: {it['description']}\nTag: {it['tag']}",
        pattern=lambda it: f'the tag for the movie: "{it["description"]}" is "{it["tag"]}" ',
        example=lambda it: ("Which tag does this movie relate to among the following tags? Just answer with the tag "
                            f"name without further explanation. tags: [{', '.join(MOVIE_TAGS)}] description: "
                            f"{it['description']}", it["tag"]),
        system="You tag movies the way this viewer does. Answer with one tag from the list, nothing else.",
        profile=MOVIES, metric="accuracy_f1", parse=label_parser(MOVIE_TAGS), labels=MOVIE_TAGS, max_new_tokens=8,
        habits=LabelHabits("tag", "tags", "Tagging habits")),
    "LaMP_2_news": TaskSpec(
        name="LaMP_2_news", kind="classification", item_fields=("text", "category"),
        corpus_text=lambda it: f"{it.get('title', '')} {it['text']}".strip(), query_text=after("article:"),
        profile_item=lambda it: f"Article: {it['text']}\nCategory: {it['category']}",
        pattern=lambda it: f'the category for the article: "{it["text"]}" is "{it["category"]}" ',
        example=lambda it: ("Which category does this article relate to among the following categories? Just answer "
                            f"with the category name without further explanation. categories: "
                            f"[{', '.join(NEWS_CATEGORIES)}] article: {it['text']}", it["category"]),
        system="You file news articles into categories the way this journalist does. Answer with one category "
               "from the list, nothing else.",
        profile=NEWS, metric="accuracy_f1", parse=label_parser(NEWS_CATEGORIES), labels=NEWS_CATEGORIES,
        plug_text=lambda it: f"{it['text']} {it.get('title', '')}".strip(), official_name="LaMP_2",
        max_new_tokens=8, habits=LabelHabits("category", "categories", "Filing habits")),
    "LaMP_3": TaskSpec(
        name="LaMP_3", kind="rating", item_fields=("text", "score"),
        corpus_text=lambda it: it["text"], query_text=after("review:"),
        profile_item=lambda it: f"Review: {it['text']}\nScore: {it['score']}",
        pattern=lambda it: f'{it["score"]} is the score for "{it["text"]}" ',
        example=lambda it: ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, "
                            f"3, 4, or 5 without further explanation. review: {it['text']}", it["score"]),
        system="You predict the score (1 to 5) this reviewer gives. Answer with a single digit.",
        profile=REVIEWS, metric="mae_rmse", parse=parse_score, labels=("1", "2", "3", "4", "5"), max_new_tokens=4,
        habits=RatingHabits("score")),
    "LaMP_4": TaskSpec(
        name="LaMP_4", kind="generation", item_fields=("title", "text"),
        corpus_text=lambda it: f"{it['title']} {it['text']}", query_text=after("article:"),
        plug_text=lambda it: f"{it['text']} {it['title']}",
        profile_item=lambda it: f"Headline: {it['title']}\nArticle: {it['text']}",
        pattern=lambda it: f'"{it["title"]}" is the title for "{it["text"]}" ',
        example=lambda it: (f"Generate a headline for the following article: {it['text']}", it["title"]),
        system="You write the headline of a news article from its text. Reply with the headline only.",
        profile=NEWS, metric="rouge", answer_prefix="Headline:", output_noun="headline",
        habits=TextHabits("title", "headlines", "Headline habits")),
    "LaMP_5": TaskSpec(
        name="LaMP_5", kind="generation", item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}", query_text=after("paper:"),
        profile_item=_paper_item, pattern=lambda it: f'"{it["title"]}" is a title for "{it["abstract"]}" ',
        example=lambda it: (f"Generate a title for the following abstract of a paper: {it['abstract']}", it["title"]),
        system="You write the title of a scientific paper from its abstract. Reply with the title only.",
        profile=SCHOLARLY, metric="rouge", answer_prefix="Title:", pattern_tail=". Following the given patterns ",
        output_noun="title", habits=TITLE_HABITS),
    "LaMP_6": TaskSpec(
        name="LaMP_6", kind="generation", item_fields=("text", "title"),
        corpus_text=lambda it: it["text"], query_text=after(":"),
        profile_item=lambda it: f"Subject: {it['title']}\nEmail: {it['text']}",
        pattern=lambda it: f'"{it["title"]}" is the title for "{it["text"]}" ',
        example=lambda it: (f"Generate a subject for the following email: {it['text']}", it["title"]),
        system="You write the subject line of an email from its body. Reply with the subject only.",
        profile=EMAIL, metric="rouge", answer_prefix="Subject:", output_noun="subject",
        habits=TextHabits("title", "subjects", "Subject-line habits")),
    "LaMP_7": TaskSpec(
        name="LaMP_7", kind="generation", item_fields=("text",),
        corpus_text=lambda it: it["text"], query_text=after(":"),
        profile_item=lambda it: f"Tweet: {it['text']}", pattern=lambda it: f'"{it["text"]}" ',
        system="You paraphrase a tweet in this person's own voice. Reply with the paraphrased tweet only.",
        context_label="Tweets this person has written", profile=TWEETS, metric="rouge",
        answer_prefix="Paraphrase:", pattern_tail=" are written by a person. Following the given patterns ",
        output_noun="paraphrase", habits=TextHabits("text", "tweets", "Tweet habits")),
    "PSW_title": TaskSpec(
        name="PSW_title", kind="generation", item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}", query_text=after("paper:"),
        profile_item=_paper_item, pattern=lambda it: f'"{it["title"]}" is a title for "{it["abstract"]}" ',
        example=lambda it: (f"Generate a title for the following abstract of a paper: {it['abstract']}", it["title"]),
        system="You write the title of a scientific paper from its abstract. Reply with the title only.",
        profile=SCHOLARLY, metric="rouge", answer_prefix="Title:", pattern_tail=". Following the given patterns ",
        multi_author=True, output_noun="title", habits=TITLE_HABITS),
    "PSW_abstract": TaskSpec(
        name="PSW_abstract", kind="generation", item_fields=_SCHOLARLY_ITEM,
        corpus_text=lambda it: f"{it['title']} {it['abstract']}", query_text=after("titled:"),
        profile_item=_paper_item, pattern=lambda it: f'"{it["abstract"]}" is the abstract for "{it["title"]}" ',
        example=lambda it: (f"Write the abstract of a paper titled: {it['title']}", it["abstract"]),
        system="You write the abstract of a scientific paper from its title. Reply with the abstract only, as one "
               "paragraph.",
        profile=SCHOLARLY, metric="rouge", parse=clean_paragraph, stop=("\n\n",), max_new_tokens=192,
        answer_prefix="Abstract:", pattern_tail=". Following the given patterns ", multi_author=True,
        output_noun="abstract", habits=TextHabits("abstract", "abstracts", "Abstract habits")),
}

TASK_ALIASES = {"LaMP-1": "LaMP_1", "LaMP-2": "LaMP_2", "LaMP-2-old": "LaMP_2_news", "LaMP_2_old": "LaMP_2_news",
                "LaMP-3": "LaMP_3", "LaMP-4": "LaMP_4", "LaMP-5": "LaMP_5", "LaMP-6": "LaMP_6", "LaMP-7": "LaMP_7"}


def same_task(file_task: str, task: str) -> bool:
    """Whether a file that names ``file_task`` holds ``task``'s data: official outputs name LaMP_2 for both label
    sets, and PSW files name their variant."""
    canon = TASK_ALIASES.get(file_task, file_task).replace("-", "_")
    return canon == task or (task in TASKS and canon == TASKS[task].file_task)


def get_task(name: str) -> TaskSpec:
    from .errors import ConfigError

    name = TASK_ALIASES.get(name, name)
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None
