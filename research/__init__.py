"""One-off studies (see README.md here): run from the repository root as ``python -m research.<study>``; not part
of the installed package, nor of the default test suite."""
