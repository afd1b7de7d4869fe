"""Benchmarks, fault drills and data tools of stepback-ray, run from the repository root as modules::

    python -m benchmarks.bench_demo --help

Each benchmark prints machine-readable JSON and, with ``--write``, keeps its record (a small JSON file) under
``docs/results/`` and regenerates the results page, ``docs/results.md``, from every record
(``results_page``). Run outputs go to the git-ignored ``runs/``. Not part of the installed ``stepback_ray``
package."""
