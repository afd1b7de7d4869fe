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


def _walk_keys(model, prefix=""):
    """Every dotted key of a pydantic model, walked here on its own (not with the generator's walk): sections are
    entered, a ``dict[str, Section]`` field is itself a key and its section's keys read ``<field>.<name>.<key>``."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _walk_keys(annotation, f"{prefix}{name}.")
            continue
        yield f"{prefix}{name}", field
        if typing.get_origin(annotation) is dict:
            value = typing.get_args(annotation)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                yield from _walk_keys(value, f"{prefix}{name}.<name>.")


def test_the_configuration_reference_has_a_row_for_every_key_of_the_job_spec_with_a_description():
    from stepback_ray.config import JobSpec

    page = _load(REPO / "docs" / "gen_reference.py").configuration_page()
    rows, in_keys_table = {}, False
    for line in page.splitlines():  # the rows of the key tables (other tables, such as the strategies', follow)
        if line.startswith("| key | type |"):
            in_keys_table = True
        elif not line.startswith("|"):
            in_keys_table = False
        elif in_keys_table and line.startswith("| `"):
            rows[line.split("`")[1]] = line
    keys = dict(_walk_keys(JobSpec))
    assert len(keys) > 100  # the walk reached the nested sections (engine.vllm, profile_store.gate, ray.stages...)
    missing = sorted(set(keys) - set(rows))
    assert not missing, f"keys of JobSpec missing from the configuration reference: {missing}"
    undescribed = sorted(k for k, f in keys.items() if not (f.description or "").strip())
    assert not undescribed, f"give these JobSpec fields a description (the reference shows it): {undescribed}"
    assert set(rows) == set(keys)  # nor a row for a key the spec does not have
    assert "| `engine.vllm.tensor_parallel_size` | integer (≥ 1) | `1` | GPUs per engine" in page
    assert "| `ray.num_shards` | integer or `auto` | `auto` |" in page
    from stepback_ray.modes import AUTHOR_STRATEGIES

    for name, strategy in AUTHOR_STRATEGIES.items():  # what multi_author.strategy names, from its declaration
        assert f"| `{name}`" in page and strategy.doc in page


def test_the_cli_reference_has_every_command_and_option_of_the_parser():
    import argparse

    from stepback_ray.cli import build_parser

    page = _load(REPO / "docs" / "gen_reference.py").cli_page()

    def commands(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix} {name}", sub
                    yield from commands(sub, f"{prefix} {name}")

    found = list(commands(build_parser(), "stepback"))
    assert {"stepback run", "stepback profile", "stepback forget", "stepback score"} <= {name for name, _ in found}
    for name, sub in found:
        section = page.split(f"## `{name}`\n", 1)
        assert len(section) == 2, f"{name} has no section in the command-line reference"
        body = section[1].split("\n## ", 1)[0]
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            shown = action.option_strings[0] if action.option_strings else (action.metavar or action.dest)
            assert f"`{shown}`" in body, f"{name}: {shown} missing from the command-line reference"


def test_every_page_of_the_site_navigation_exists_and_every_page_is_in_it():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = []

    def collect(entries):
        for entry in entries:
            for value in entry.values():
                if isinstance(value, list):
                    collect(value)
                else:
                    pages.append(value)

    collect(config["nav"])
    generated = {f"reference/{name}.md" for name in ("configuration", "cli")}
    assert generated <= set(pages)
    missing = [p for p in pages if p not in generated and not (REPO / "docs" / p).is_file()]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"
    written = {p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md")} - generated
    drafts = {p for p in written if p.startswith("_drafts/")}  # excluded from the site (exclude_docs)
    assert written - drafts <= set(pages), "a page under docs/ is missing from the nav in mkdocs.yml"


def test_the_readme_is_short_and_its_links_into_the_repository_exist():
    import re

    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", readme) if "://" not in t]
    assert any(t.startswith("docs/") for t in links)
    broken = [t for t in links if not (REPO / t.split("#")[0]).exists()]
    assert not broken, f"README links to files that do not exist: {broken}"
