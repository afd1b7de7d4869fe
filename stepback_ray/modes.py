"""Generation modes: what each one puts in front of the model, declared once.

A mode is a combination of personal context: the user's step-back profile, items retrieved from their history, a
Persona-Plug soft token, and whether that context is borrowed from another user (a *donor*: the controls that keep
the prompt's shape and change only the person). The config, the prompt builder and the pipeline all read these
specs; a new mode is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModeSpec:
    name: str
    profile: bool = False
    """The prompt holds the step-back profile."""
    retrieval: bool = False
    """The prompt holds items retrieved from the history."""
    plug: bool = False
    """A Persona-Plug soft token goes before the prompt (needs ``pplug.checkpoint``)."""
    donor: bool = False
    """The profile, history and soft token are another user's (a control: same format, wrong person)."""
    doc: str = ""


MODE_SPECS: dict[str, ModeSpec] = {
    m.name: m
    for m in (
        ModeSpec("none", doc="the task input only"),
        ModeSpec("rag", retrieval=True, doc="the user's top-k history items"),
        ModeSpec("profile", profile=True, doc="the user's step-back profile"),
        ModeSpec("profile+rag", profile=True, retrieval=True, doc="both: Step-Back Profiling"),
        ModeSpec(
            "random-profile",
            profile=True,
            retrieval=True,
            donor=True,
            doc="profile+rag built from another user's profile and history (isolates the person)",
        ),
        ModeSpec("pplug", plug=True, doc="the input with the user's Persona-Plug soft token"),
        ModeSpec("pplug+profile", profile=True, plug=True, doc="the soft token and the step-back profile"),
        ModeSpec(
            "pplug-random",
            plug=True,
            donor=True,
            doc="the input with another user's soft token (isolates the person from the trained instruction)",
        ),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODE_SPECS)


def mode_spec(name: str) -> ModeSpec:
    try:
        return MODE_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; modes: {', '.join(MODE_NAMES)}") from None


def _context(spec: ModeSpec) -> tuple[bool, bool, bool]:
    return spec.profile, spec.retrieval, spec.plug


def donor_control(name: str) -> str:
    """The control of a personal mode: the donor mode with the same context (``profile+rag`` -> ``random-profile``,
    ``pplug`` -> ``pplug-random``), the same prompt with another person in it."""
    own = mode_spec(name)
    controls = {_context(s): s.name for s in MODE_SPECS.values() if s.donor}
    if own.donor or _context(own) not in controls:
        with_one = [m for m, s in MODE_SPECS.items() if not s.donor and _context(s) in controls]
        raise ValueError(f"mode {name!r} has no donor control; modes with one: {', '.join(with_one)}")
    return controls[_context(own)]


@dataclass(frozen=True)
class AuthorStrategy:
    """How a co-authored query (PSW) combines its authors: whose profiles the prompt shows, whose history items are
    retrieved, whether each author proposes an output first, and how one final output comes out of the proposals.
    ``multi_author.strategy`` names one; the prompt builder and the generation pass read these fields, never the
    name."""

    name: str
    proposals: bool = False
    """Each author proposes an output from their own profile and history (one prompt per author)."""
    merge: str | None = None
    """With proposals, the lead author's merge call: ``proposals`` (the proposals and the lead's profile),
    ``context`` (the lead's own prompt, with their retrieved items and the input, and the proposals after the
    input) or ``keep`` (the proposals, and leave to keep one of them word for word); None: no merge call."""
    choose: bool = False
    """With proposals and no merge: keep the proposal that agrees most with the others and with the lead's own
    past outputs and profile (:mod:`stepback_ray.generation.selection`; no engine call)."""
    profiles: str = "lead"
    """One prompt's profiles: ``lead`` (the first author's) or ``all`` (every author's, in byline order)."""
    pool: str = "lead"
    """One prompt's retrieval pool: ``lead`` (the first author's history), ``union`` (every author's, each item
    once) or ``byline`` (every author's, each item's score weighted by its best byline position:
    ``multi_author.byline_decay`` to the power of the position, the lead's 1)."""
    doc: str = ""

    @property
    def coauthor_profiles(self) -> bool:
        """Whether a prompt shows a co-author's profile: when it does not, only lead authors are profiled."""
        return self.proposals or self.profiles == "all"


AUTHOR_STRATEGIES: dict[str, AuthorStrategy] = {
    s.name: s
    for s in (
        AuthorStrategy("single", doc="the lead author's profile and history alone (the single-author baseline)"),
        AuthorStrategy(
            "lead-merge",
            proposals=True,
            merge="proposals",
            doc="each author proposes from their own profile and history; the lead author merges the proposals",
        ),
        AuthorStrategy(
            "context-merge",
            proposals=True,
            merge="context",
            doc="as lead-merge, but the merge is the lead's own prompt (profile, retrieved items, input) with the "
            "proposals after the input",
        ),
        AuthorStrategy(
            "keep-merge",
            proposals=True,
            merge="keep",
            doc="as lead-merge, but the lead may keep one proposal word for word instead of rewriting",
        ),
        AuthorStrategy(
            "consensus",
            proposals=True,
            choose=True,
            doc="each author proposes; the proposal agreeing most with the others and with the lead's past "
            "outputs and profile is kept (no merge call)",
        ),
        AuthorStrategy(
            "concat",
            profiles="all",
            pool="union",
            doc="one prompt with every author's profile in byline order and items retrieved from all histories",
        ),
        AuthorStrategy(
            "byline-rag",
            pool="byline",
            doc="one prompt with the lead's profile and items retrieved from every author's history, weighted by "
            "byline position",
        ),
    )
}
AUTHOR_STRATEGY_NAMES: tuple[str, ...] = tuple(AUTHOR_STRATEGIES)
