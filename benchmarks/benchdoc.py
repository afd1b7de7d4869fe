"""What every benchmark script shares: a description of the machine, and rewriting the script's own section of
``docs/benchmarks.md`` (between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``) without touching the rest."""

from __future__ import annotations

import os
import platform
from pathlib import Path


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


def write_section(path: Path, name: str, title: str, section: str) -> None:
    """Replace the ``name`` section of the markdown file at ``path``; a new one goes at the end of the part under
    its ``## title`` heading (a new heading at the end of the file if there is none). ``section`` must start and
    end with the markers of ``name``."""
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
