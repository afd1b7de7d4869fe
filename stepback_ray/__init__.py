"""stepback-ray: personalize LLM output for many users as an offline Ray batch job.

The package reads top-down like the pipeline: ``data`` -> ``profiling`` -> ``prompting`` / ``retrieval`` ->
``engines`` -> ``metrics`` -> ``storage``, tied together by ``pipeline`` and driven by ``cli``.

An application that serves the profiles reads them with :func:`read_profiles` (``stepback_ray.read_profiles``,
:mod:`stepback_ray.store.reader`), imported on first use so that ``import stepback_ray`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "read_profiles"]


def __getattr__(name: str) -> Any:
    """``read_profiles`` imported when first asked for (it brings pyarrow)."""
    if name == "read_profiles":
        from stepback_ray.store.reader import read_profiles  # deferred: pyarrow, only for a reader

        return read_profiles
    raise AttributeError(f"module 'stepback_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "read_profiles"])
