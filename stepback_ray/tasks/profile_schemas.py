"""The fields of a step-back profile per task family (scholarly, news, movies, reviews, email, tweets), each with
a worked example and a contrasting one for few-shot prompting."""

from __future__ import annotations

from dataclasses import dataclass


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


def _schema(
    family: str,
    person: str,
    what: str,
    labels: tuple[str, str, str],
    style_q: str,
    example_items: tuple[str, ...],
    example_profile: dict[str, object],
    contrast_items: tuple[str, ...],
    contrast_profile: dict[str, object],
) -> ProfileSchema:
    kw, tp, st = labels
    return ProfileSchema(
        family=family,
        person=person,
        labels={"keywords": kw, "topics": tp, "style": st},
        instruction=(
            f"You read {what} and step back to describe the {person}. Answer with one JSON object with "
            f'the keys "keywords" ({kw.lower()}), "topics" ({tp.lower()}) and "style" ({style_q}).'
        ),
        example_items=example_items,
        example_profile=example_profile,
        contrast_items=contrast_items,
        contrast_profile=contrast_profile,
    )


SCHOLARLY = _schema(
    "scholarly",
    "author",
    "the papers an author wrote",
    ("Keywords", "Research topics", "Title style"),
    "one sentence on how the author phrases titles",
    (
        "Title: Sparse Mixture-of-Experts for Low-Resource Speech Recognition\nAbstract: We study mixture-of-experts "
        "acoustic models when only a few hours of transcribed speech are available. A sparse router with load "
        "balancing improves word error rate on six low-resource languages.",
        "Title: SpeechPrune: Token Pruning for Efficient Speech Transformers\nAbstract: Speech transformers spend "
        "most compute on redundant frames. We prune acoustic tokens with a learned saliency score, halving inference "
        "cost with no loss in accuracy.",
    ),
    {
        "keywords": ["speech recognition", "mixture-of-experts", "low-resource languages", "token pruning"],
        "topics": ["efficient speech models", "multilingual ASR"],
        "style": "Short titles that name the method first, often a coined name followed by a colon.",
    },
    (
        "Title: On the Convergence of Adaptive Gradient Methods for Nonconvex Stochastic Optimization\nAbstract: We "
        "prove that adaptive step sizes converge to stationary points under weaker noise assumptions than before.",
        "Title: A Theoretical Analysis of Learning Rate Warmup in the Training of Deep Residual Networks\nAbstract: "
        "We explain why warmup stabilizes early training by bounding the sharpness of the loss at initialization.",
    ),
    {
        "keywords": ["adaptive gradient methods", "nonconvex optimization", "learning rate warmup", "convergence"],
        "topics": ["optimization theory", "training dynamics"],
        "style": "Long descriptive titles that state the question studied in full, with no coined names or colons.",
    },
)

NEWS = _schema(
    "news",
    "journalist",
    "the articles a journalist wrote",
    ("Recurring subjects", "Beats", "Headline style"),
    "one sentence on the tone and style of the headlines",
    (
        "Headline: This Dog Waited 3 Years At The Shelter. Then Everything Changed.\nArticle: A pit bull mix that "
        "nobody wanted finally found a home with a retired firefighter.",
        "Headline: Watch A Toddler Lose It Over Her First Snowfall\nArticle: Her reaction is pure joy, and the "
        "internet can't get enough.",
    ),
    {
        "keywords": ["pets", "viral videos", "feel-good stories"],
        "topics": ["animals", "parenting", "internet culture"],
        "style": "Warm, upbeat headlines in title case that tease the story with a hook.",
    },
    (
        "Headline: Senate passes budget bill after overnight session\nArticle: The bill funds the government through "
        "September and now goes to the House.",
        "Headline: Fed holds rates steady, signals one cut this year\nArticle: Officials cited cooling inflation but "
        "a still strong labor market.",
    ),
    {
        "keywords": ["budget", "interest rates", "Congress"],
        "topics": ["politics", "economy"],
        "style": "Plain, factual headlines in sentence case that state the news with no hook.",
    },
)

MOVIES = _schema(
    "movies",
    "viewer",
    "the movies a viewer tagged",
    ("Favourite tags", "Kinds of movies", "Tagging style"),
    "one sentence on how the viewer chooses tags",
    (
        "Movie: A retired hitman seeks revenge after thieves kill his dog.\nTag: action",
        "Movie: A detective hunts a serial killer who stages his murders after the seven deadly sins."
        "\nTag: twist ending",
    ),
    {
        "keywords": ["action", "twist ending"],
        "topics": ["crime thrillers", "revenge stories"],
        "style": "Tags the dominant genre unless the plot has a memorable surprise.",
    },
    (
        "Movie: A young wizard discovers his heritage at a school of magic.\nTag: based on a book",
        "Movie: A lawyer defends a black man falsely accused in the segregated South.\nTag: based on a book",
    ),
    {
        "keywords": ["based on a book"],
        "topics": ["literary adaptations", "coming-of-age stories"],
        "style": "Tags where the story comes from rather than its genre.",
    },
)

REVIEWS = _schema(
    "reviews",
    "reviewer",
    "the product reviews a person wrote",
    ("Recurring aspects", "Products reviewed", "Rating style"),
    "one sentence on how strictly the reviewer scores",
    (
        "Review: Battery died after two weeks and support never answered.\nScore: 1",
        "Review: Does what it says, nothing more. Fine for the price.\nScore: 3",
    ),
    {
        "keywords": ["battery life", "customer support", "value for money"],
        "topics": ["electronics", "gadgets"],
        "style": "A strict reviewer who rarely gives 5 and punishes poor support.",
    },
    (
        "Review: Love it! Arrived early and the color is perfect.\nScore: 5",
        "Review: A bit smaller than I expected but still great.\nScore: 5",
    ),
    {
        "keywords": ["fast delivery", "color", "size"],
        "topics": ["home decor", "clothing"],
        "style": "A generous reviewer who gives 5 unless something is clearly broken.",
    },
)

EMAIL = _schema(
    "email",
    "writer",
    "the emails a person wrote",
    ("Recurring subjects", "Work topics", "Subject-line style"),
    "one sentence on how the writer phrases subjects",
    (
        "Subject: Q3 budget review moved to Friday\nEmail: Hi all, the budget review is moved to Friday at 10.",
        "Subject: Re: server outage\nEmail: The database is back up; root cause was a full disk.",
    ),
    {
        "keywords": ["budget", "meetings", "outages"],
        "topics": ["finance planning", "IT operations"],
        "style": "Short, factual subjects that state the news, often replies.",
    },
    (
        "Subject: Thank you so much for a wonderful evening with the whole team!\nEmail: Dear Anna, what a lovely "
        "dinner; everyone is still talking about it.",
        "Subject: Invitation to our annual charity gala on the 12th of May\nEmail: Dear friends, we would be "
        "delighted to welcome you.",
    ),
    {
        "keywords": ["dinners", "invitations", "charity events"],
        "topics": ["events", "community"],
        "style": "Long, warm subjects that say the whole message in one polite sentence.",
    },
)

TWEETS = _schema(
    "tweets",
    "person",
    "the tweets a person wrote",
    ("Recurring subjects", "Interests", "Writing style"),
    "one sentence on tone, slang, emoji and length",
    (
        "Tweet: cannot believe it's monday again ugh need coffee asap",
        "Tweet: best concert of my life last night!!! my ears are still ringing",
    ),
    {
        "keywords": ["mondays", "coffee", "concerts"],
        "topics": ["daily life", "music"],
        "style": "Casual lower-case tweets with exclamation marks and little punctuation.",
    },
    (
        "Tweet: Our new report on urban air quality is out today. Key findings in the thread below.",
        "Tweet: Grateful to the volunteers who planted 300 trees in Riverside Park this weekend.",
    ),
    {
        "keywords": ["air quality", "reports", "volunteering"],
        "topics": ["environment", "city life"],
        "style": "Formal, complete sentences with correct capitalization and no emoji.",
    },
)
