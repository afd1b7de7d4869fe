"""The package's layers (``.importlinter``) hold, and a new upward import breaks them: ``lint-imports`` in CI is
what keeps the engines from importing the pipeline, the store from importing the pipeline, and any cycle out."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "stepback_ray", tmp_path / "stepback_ray", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    return tmp_path


def test_the_layers_hold_on_the_package(package_copy):
    proc = _lint(package_copy)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(
    "importer, line, broken",
    [
        ("engines/base.py", "import stepback_ray.pipeline", "The engines never import the pipeline"),
        ("store/layout.py", "from stepback_ray.pipeline import stages", "The store never imports the pipeline"),
        ("data/rows.py", "import stepback_ray.profiling", "Layers"),
        ("store/gate.py", "import stepback_ray.store.versions", "No import cycles"),
    ],
)
def test_an_import_against_the_layers_fails_lint_imports(package_copy, importer, line, broken):
    with open(package_copy / "stepback_ray" / importer, "a") as f:
        f.write(f"\n{line}  # an import against the layers\n")
    proc = _lint(package_copy)
    assert proc.returncode != 0
    # the contract's summary line (a long name wraps once) ends BROKEN; the others stay KEPT
    assert re.search(re.escape(broken) + r"[^\n]*(\n[^\n]*)?BROKEN", proc.stdout), proc.stdout[-3000:]
