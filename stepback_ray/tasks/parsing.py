"""How a task reads its input and the model's output: the official LaMP query extraction and the parsers that
turn raw model text into an answer (``None`` when no valid answer can be read)."""

from __future__ import annotations

import re
from collections.abc import Callable


def after(marker: str) -> Callable[[str], str]:
    """Official LaMP query extraction: the text after the first ``marker`` (the whole input if absent)."""

    def extract(text: str) -> str:
        i = text.find(marker)
        return text[i + len(marker) :].strip() if i >= 0 else text.strip()

    return extract


def quoted(text: str) -> list[str]:
    """The double-quoted strings of ``text``, in order (LaMP_1 inputs quote the title and both references)."""
    return re.findall(r'"([^"]*)"', text)


def citation_query(text: str) -> str:
    """LaMP_1's official retrieval query: the two candidate references (quoted strings 2 and 3)."""
    q = quoted(text)
    return f"{q[1]} {q[2]}" if len(q) >= 3 else text


_PREFIX = re.compile(
    r"^\s*(title|headline|answer|output|subject|paraphrase|tweet|abstract|tag|category|score)"
    r"\s*[:：-]\s*",
    re.IGNORECASE,
)


def clean_one_line(text: str) -> str:
    """First non-empty line, without a leading ``Title:``-style label and without wrapping quotes/markup."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = _PREFIX.sub("", line.strip())
    line = line.strip().strip("*").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    return line.strip('\u201c\u201d"').strip()


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
