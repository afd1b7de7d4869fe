"""``python -m stepback_ray``: the ``stepback`` command (:mod:`stepback_ray.cli`)."""

from stepback_ray.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
