"""Benchmarks, fault drills and data tools of stepback-ray, run from the repository root as modules::

    python -m benchmarks.bench_demo --help

Each benchmark prints machine-readable JSON and, with ``--write docs/benchmarks.md``, rewrites only its own section
of that page (``benchdoc``). Run outputs go to the git-ignored ``runs/``; the small result records a section is
built from are kept under ``docs/results/``. Not part of the installed ``stepback_ray`` package."""
