"""What every benchmark shares: a description of the machine, rewriting the benchmark's own section of
``docs/benchmarks.md`` (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``) without touching the rest, and
keeping the section's record (its JSON report) beside the page in ``docs/results/``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shown(path: Path | str) -> str:
    """``path`` as the docs show it: relative to the repository root when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def machine() -> str:
    """This machine in a few words: architecture, cores, memory, GPU."""
    import psutil

    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{gpu}, Python {platform.python_version()}"
    )


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def result_path(page: Path, name: str) -> Path:
    """Where the record of section ``name`` of the markdown file ``page`` is kept: ``<page's folder>/results/``,
    ``bench:variant`` as ``bench/variant.json`` (``docs/results/bench_engines/transformers-split.json``)."""
    return page.parent / "results" / (name.replace(":", "/") + ".json")


def write_section(path: Path, name: str, title: str, section: str, record: dict | None = None) -> None:
    """Replace the ``name`` section of the markdown file at ``path``; a new one goes at the end of the part under
    its ``## title`` heading (a new heading at the end of the file if there is none). ``section`` must start and
    end with the markers of ``name``. ``record``: the benchmark's JSON report the section was made from, saved at
    :func:`result_path` (benchmarks that keep their own records per run or per set pass none)."""
    if record is not None:
        saved = result_path(path, name)
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(record, indent=1) + "\n")
    start, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end) :]
    elif f"\n## {title}\n" in text:
        at = text.index(f"\n## {title}\n") + len(f"\n## {title}\n")
        nxt = text.find("\n## ", at)
        cut = len(text) if nxt < 0 else nxt
        text = text[:cut].rstrip() + "\n\n" + section + "\n" + text[cut:]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + section + "\n"
    path.write_text(text)
