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
