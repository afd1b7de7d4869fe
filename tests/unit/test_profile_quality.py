"""Model-free profile measures and the habits measured from a history, on hand-made sets whose answers are known."""

from __future__ import annotations

import pytest

from stepback_ray.profiling import quality as pq
from stepback_ray.profiling import render_profile
from stepback_ray.tasks import TASKS
from stepback_ray.tasks.habits import LabelHabits, RatingHabits, TextHabits

LAMP5 = TASKS["LaMP_5"]

HISTORIES = {
    "astro": ["galaxy cluster redshift survey", "dark matter halo simulations", "galaxy rotation curves"],
    "bio": ["protein folding with language models", "gene expression atlas of mouse brain", "protein design"],
    "law": ["contract clause extraction for legal documents", "court ruling summarization", "legal citation graphs"],
    "chem": ["catalyst discovery by active learning", "reaction yield prediction", "catalyst screening"],
}


def test_identifiability_finds_each_user_from_a_profile_about_them():
    users = list(HISTORIES)
    profiles = [
        "galaxy, dark matter, redshift",
        "protein folding, gene expression",
        "legal documents, court rulings",
        "catalyst discovery, reaction yield",
    ]
    histories = [" ".join(HISTORIES[u]) for u in users]
    got = pq.identifiability(profiles, histories)
    assert got == {"users": 4, "top1": 1.0, "mrr": 1.0, "chance_top1": 0.25, "chance_mrr": 0.5208}


def test_identifiability_of_shuffled_or_generic_profiles_is_not_better_than_chance():
    users = list(HISTORIES)
    histories = [" ".join(HISTORIES[u]) for u in users]
    # each profile describes the next user: every user is found last but one... never first
    shifted = ["protein folding", "legal documents court", "catalyst reaction", "galaxy dark matter"]
    got = pq.identifiability(shifted, histories)
    assert got["top1"] == 0.0 and got["mrr"] < got["chance_mrr"]
    # the same generic profile for everyone (the worked example copied): ties rank everyone last
    generic = ["Short titles that name the method first"] * 4
    got = pq.identifiability(generic, histories)
    assert got["top1"] == 0.0 and got["mrr"] == 0.25
    # mixed: two right, two empty
    got = pq.identifiability(["galaxy redshift", "", "court ruling", ""], histories)
    assert got["top1"] == 0.5


def test_identifiability_needs_two_users():
    assert pq.identifiability(["x"], ["x"])["top1"] is None


def test_grounding_counts_keywords_found_in_the_users_own_history():
    got = pq.grounding(
        [["protein folding", "gene expression", "quantum gravity"], ["legal documents", "torts"]],
        [" ".join(HISTORIES["bio"]), " ".join(HISTORIES["law"])],
    )
    assert got == {"users": 2, "keywords_grounded": round((2 / 3 + 1 / 2) / 2, 4)}
    assert pq.grounding([[], ["the", "of"]], ["a", "b"]) == {"users": 0, "keywords_grounded": None}


def test_copied_from_example_catches_the_worked_example_and_its_prefixes():
    schema = LAMP5.profile
    example_style = schema.example_profile["style"]
    assert pq.copied_field({"style": example_style}, schema)
    assert pq.copied_field({"style": example_style[:30]}, schema)  # a prefix, cut by the token limit
    assert pq.copied_field({"keywords": list(schema.example_profile["keywords"])}, schema)
    assert not pq.copied_field({"style": "Long descriptive titles about galaxy surveys."}, schema)
    assert not pq.copied_field({"style": "Short"}, schema)  # too short to call a copy
    assert pq.copied_field({"style": schema.contrast_profile["style"]}, schema)  # the contrasting example too


def test_measure_over_users_reports_every_measure():
    schema = LAMP5.profile
    users = [
        (
            {"keywords": ["galaxy", "redshift"], "topics": ["cosmology"], "style": schema.example_profile["style"]},
            [{"id": "a1", "title": "Galaxy cluster redshift survey", "abstract": "We survey galaxy clusters."}],
        ),
        (
            {"keywords": ["protein folding"], "topics": ["biology"], "style": "Plain descriptive titles."},
            [{"id": "b1", "title": "Protein folding with language models", "abstract": "We fold proteins."}],
        ),
        (None, [{"id": "c1", "title": "Court ruling summarization", "abstract": "Legal text."}]),
        (None, []),
    ]  # an empty history is left out
    got = pq.measure(LAMP5, users, lambda p: render_profile(p, LAMP5, habits=False), lambda p: render_profile(p, LAMP5))
    assert got["identifiability"]["users"] == 3 and got["identifiability"]["top1"] == pytest.approx(2 / 3, abs=1e-4)
    assert got["grounding"] == {"users": 2, "keywords_grounded": 1.0}
    assert got["copied_from_example"] == 0.5


def test_title_habits_measure_length_colon_case_and_recurring_words():
    items = [
        {"title": t}
        for t in (
            "GraphNet: Message Passing for Molecules",
            "MolGen: Diffusion Models for Molecules",
            "Scaling Laws of Molecule Property Prediction Models",
            "Atlas: A Benchmark for Molecules",
        )
    ]
    facts = TextHabits("title", "titles", "Title habits")(items)
    assert facts[0] == "Titles are 5-6 words long (median 5)"
    assert facts[1] == "3 of 4 titles have the form 'Name: description' (names such as GraphNet, MolGen, Atlas)"
    assert "Written in Title Case" in facts
    assert facts[-1] == "Recurring words: molecules (3), models (2)"
    lower = [
        {"title": t}
        for t in (
            "a study of things in the world today",
            "another study of more things here",
            "yet more things to study in depth",
        )
    ]
    facts = TextHabits("title", "titles", "Title habits")(lower)
    assert "none of 3 titles use a colon" not in facts  # under four texts: no colon fact either way
    assert "Written in sentence case (only the first word capitalized)" in facts
    assert "Recurring words: study (3), things (3)" in facts
    assert TextHabits("title", "titles", "Title habits")([{"title": "One"}]) == []  # too few to tell


def test_label_and_rating_habits():
    tags = [{"tag": t} for t in ("comedy", "comedy", "action", "classic", "comedy")]
    assert LabelHabits("tag", "tags", "Tagging habits")(tags) == [
        "Tags given over 5 items: comedy (3), action (1), classic (1)"
    ]
    scores = [{"score": s} for s in ("5", "4", "5", "not a number", "1")]
    assert RatingHabits("score")(scores) == ["Average score 3.8 over 4 reviews (scores given: 1: 1, 4: 1, 5: 2)"]


def test_every_task_with_habits_measures_its_own_output_field():
    """Each task's habits read a field its items must carry (a typo would silently measure nothing)."""
    for task in TASKS.values():
        if task.habits is not None:
            assert task.habits.field in task.item_fields, task.name


def test_identifiability_over_histories_without_a_searchable_word_is_none_not_a_crash():
    got = pq.identifiability(["graph networks", "robots"], ["the", "of a"])
    assert got["top1"] is None and got["users"] == 2
