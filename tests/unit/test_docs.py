"""The docs that are generated from the code are up to date with it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_module_map_lists_every_module_of_the_package_in_its_layer():
    module_map = _load(REPO / "docs" / "module_map.py")
    table = module_map.module_map()
    listed = {line.split("`")[1] for line in table.splitlines()[2:]}
    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / "stepback_ray").rglob("*.py")}
    assert listed == on_disk  # every module belongs to a declared layer, and no layer names a missing one
    assert module_map.main(["--check"]) == 0, "run: python docs/module_map.py --write"
