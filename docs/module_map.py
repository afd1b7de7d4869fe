"""Writes the module map of docs/architecture.md from the code: every module of ``stepback_ray``, grouped by the
layers that ``.importlinter`` declares, with the first sentence of its docstring.

    python docs/module_map.py            print the map
    python docs/module_map.py --write    rewrite the map between the markers in docs/architecture.md
    python docs/module_map.py --check    exit 1 when docs/architecture.md is out of date (CI)
"""

from __future__ import annotations

import argparse
import ast
import configparser
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "stepback_ray"
PAGE = REPO / "docs" / "architecture.md"
START, END = "<!-- module-map:start -->", "<!-- module-map:end -->"


def layers() -> list[list[str]]:
    """The layers of ``.importlinter``'s layers contract, top first; each a list of sibling names."""
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    raw = config["importlinter:contract:layers"]["layers"]
    return [[name.strip() for name in re.split(r"[|:]", line)] for line in raw.strip().splitlines() if line.strip()]


def summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", first)
    text = match.group(1) if match else first
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text)  # Sphinx roles
    return text.replace("``", "`").replace("|", "\\|")


def module_map() -> str:
    rows = ["| layer | module | what it holds |", "|---|---|---|"]
    rows.append(f"| (the package) | `stepback_ray/__init__.py` | {summary(PACKAGE / '__init__.py')} |")
    for siblings in layers():
        layer = ", ".join(siblings)
        for name in siblings:
            target = PACKAGE / name
            files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                rows.append(f"| {layer} | `{rel}` | {summary(f)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    table = module_map()
    if not (args.write or args.check):
        print(table)
        return 0
    page = PAGE.read_text()
    before, rest = page.split(START, 1)
    _, after = rest.split(END, 1)
    updated = f"{before}{START}\n{table}\n{END}{after}"
    if args.check:
        if updated != page:
            print(f"{PAGE.relative_to(REPO)}: the module map is out of date; run python docs/module_map.py --write")
            return 1
        return 0
    PAGE.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
