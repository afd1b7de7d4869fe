"""What every benchmark shares: a description of the machine, and keeping its record, the small JSON file the
results page (``docs/results.md``, :mod:`benchmarks.results_page`) is generated from, under ``docs/results/``.

A benchmark never edits a page: it writes its record and regenerates the page, so two benchmarks cannot overwrite
each other's text and the page cannot say what no record holds."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
"""Where the records live: ``<benchmark>/<name>.json`` (``engines/transformers-coalesced.json``)."""


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


def save_record(name: str, record: dict, root: Path = RESULTS) -> Path:
    """Keep ``record`` as ``<root>/<name>.json`` (``name`` like ``engines/transformers-coalesced``), replacing
    the record of the same name: a benchmark's current figure is its latest run of that name."""
    path = root / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def publish(name: str, record: dict) -> Path:
    """Save ``record`` (:func:`save_record`) and regenerate the results page from every record; returns the
    record's path."""
    from benchmarks import results_page

    path = save_record(name, record)
    results_page.write()
    return path
