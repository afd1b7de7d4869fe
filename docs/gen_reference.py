"""Writes the site's two generated references from the code: the job spec's keys from the pydantic models
(``docs/reference/configuration.md``) and the ``stepback`` command's subcommands and options from its argument
parser (``docs/reference/cli.md``).

    python docs/gen_reference.py            write both pages (only when they changed)
    python docs/gen_reference.py --print    print them instead

``mkdocs.yml`` names this file as a hook: every ``mkdocs build`` (and ``make docs``) writes the pages first, so the
site always shows the code it was built from. The pages are not committed (``.gitignore``); ``tests/unit/
test_docs.py`` holds the configuration page to every key of ``JobSpec`` and the CLI page to every subcommand.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # a checkout without the package installed
    sys.path.insert(0, str(REPO))

from pydantic import BaseModel, SecretStr  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

PAGES = {"configuration": "reference/configuration.md", "cli": "reference/cli.md"}
DOCS = REPO / "docs"


# ---- configuration -------------------------------------------------------------------------------------------


def _constraints(metadata: list[Any]) -> str:
    marks = []
    for m in metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("min_length", "at least")):
            value = getattr(m, attr, None)
            if value is not None:
                marks.append(f"{sign} {value:g}" if isinstance(value, (int, float)) else f"{sign} {value}")
        if getattr(m, "pattern", None):
            marks.append(f"matches `{m.pattern}`")
    return ", ".join(marks)


def type_name(annotation: Any) -> str:
    """A job-spec type as a reader of YAML thinks of it: ``integer``, ``number``, ``'a' | 'b'``, ``... or null``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner = type_name(args[0])
        extra = _constraints(list(args[1:]))
        return f"{inner} ({extra})" if extra else inner
    if origin in (typing.Union, types.UnionType):
        parts = [type_name(a) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return f"{text} or null" if type(None) in args else text
    if origin is typing.Literal:
        names = [f"`{a}`" for a in args]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        if args and _model_of(args[1]) is not None:
            return "mapping of a name to a section (its keys below)"
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    simple = {int: "integer", float: "number", str: "text", bool: "boolean", SecretStr: "secret text"}
    if annotation in simple:
        return simple[annotation]
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return str(annotation)


def field_type(field: FieldInfo) -> str:
    text = type_name(field.annotation)
    extra = _constraints(field.metadata)
    return f"{text} ({extra})" if extra else text


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def default_of(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{_yaml(field.default_factory())}`"
    if field.default is PydanticUndefined:
        return "required"
    return f"`{_yaml(field.default)}`"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _mapped_model(annotation: Any) -> type[BaseModel] | None:
    """The section type of a ``dict[str, Section]`` field (``ray.stages``), else None."""
    if typing.get_origin(annotation) is dict:
        args = typing.get_args(annotation)
        return _model_of(args[1]) if len(args) == 2 else None
    return None


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel], list[tuple[str, Any]]]]:
    """The spec's sections, depth first: (dotted prefix, model, its leaf keys as (dotted key, field)). A
    ``dict[str, Section]`` field is a section whose keys read ``<prefix>.<name>.<key>``."""
    leaves, nested = [], []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        mapped = _mapped_model(field.annotation)
        if sub is not None:
            nested += sections(sub, f"{prefix}{name}.")
        elif mapped is not None:
            leaves.append((f"{prefix}{name}", field))
            nested += sections(mapped, f"{prefix}{name}.<name>.")
        else:
            leaves.append((f"{prefix}{name}", field))
    return [(prefix.rstrip("."), model, leaves), *nested]


def _doc(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    if doc.startswith(f"{model.__name__}(") or "A base class for creating Pydantic models" in doc:
        return ""  # no docstring of its own (pydantic's or the generated signature)
    text = " ".join(doc.strip().split("\n\n")[0].split())
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: "`" + m.group(1).rsplit(".", 1)[-1] + "`", text)  # Sphinx roles
    return _cell(text.replace("``", "`"))


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, ``|`` escaped, and ``<``/``>`` outside code spans as entities
    (``packaged:<name>`` would otherwise be read as an HTML tag)."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def configuration_page() -> str:
    from stepback_ray.config import JobSpec
    from stepback_ray.config.fields import is_speed_only

    out = [
        "# Configuration reference",
        "",
        "<!-- generated by docs/gen_reference.py from stepback_ray/config: edit the fields' descriptions there -->",
        "",
        "Every key of a job spec, generated from the pydantic models in `stepback_ray/config/` when the site is "
        "built. A job spec is a YAML file (see `jobs/`); any key can be overridden on the command line with "
        "`--set key.sub=value` (the value is read as YAML: `--set modes=[none,rag]`, `--set ray.address=null`). "
        "The whole spec is validated before anything runs: an unknown key or a bad value is one line naming the key "
        "(exit 2). How relative paths are read is in [Jobs and inputs](../jobs.md#paths).",
        "",
        "**speed-only**: the key changes only speed, capacity, fault injection or access, never a result, so a run "
        "resumed with the same `run_id` may change it (a smaller batch after running out of memory). Every other "
        "key must match the run's first start.",
        "",
    ]
    for prefix, model, leaves in sections(JobSpec):
        if not leaves:
            continue
        title = f"`{prefix}`" if prefix else "Top level"
        out += [f"## {title}", ""]
        doc = _doc(model)
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | description |", "|---|---|---|---|"]
        for key, field in leaves:
            desc = _cell(field.description or "")
            if is_speed_only(field):
                desc = f"{desc} *(speed-only)*" if desc else "*(speed-only)*"
            out.append(f"| `{key}` | {_cell(field_type(field))} | {_cell(default_of(field))} | {desc} |")
        out.append("")
        if prefix in DECLARED:
            out += DECLARED[prefix]()
    return "\n".join(out)


def strategies_table() -> list[str]:
    """The co-author strategies ``multi_author.strategy`` names, from their one declaration
    (``stepback_ray/modes.py``): what each prompt holds and how one output comes out."""
    from stepback_ray.config import JobSpec
    from stepback_ray.modes import AUTHOR_STRATEGIES

    default = JobSpec.model_fields["multi_author"].default_factory().strategy
    out = [
        "The strategies (declared in `stepback_ray/modes.py`; the results page compares them on PSW):",
        "",
        "| strategy | profiles in a prompt | authors profiled | items retrieved from | proposals, then "
        "| what it does |",
        "|---|---|---|---|---|---|",
    ]
    for name, st in AUTHOR_STRATEGIES.items():
        label = f"`{name}`" + (" (default)" if name == default else "")
        if st.proposals:  # one proposal prompt per author, each with that author's own profile and history
            profiles, pool = "each author's own (a prompt each)", "each author's own"
            then = f"the lead merges ({st.merge})" if st.merge else ("one is chosen" if st.choose else "-")
        else:
            profiles, pool, then = st.profiles, st.pool, "no proposals"
        profiled = "every author" if st.coauthor_profiles else "lead authors only"
        out.append(f"| {label} | {profiles} | {profiled} | {pool} | {then} | {_cell(st.doc)} |")
    return [*out, ""]


DECLARED = {"multi_author": strategies_table}
"""Sections followed by a table of what their key names, generated from where those things are declared."""


# ---- command line --------------------------------------------------------------------------------------------


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), sp) for name, sp in action.choices.items()]
    return []


def _option_row(action: argparse.Action) -> str:
    if action.option_strings:
        name = ", ".join(f"`{s}`" for s in action.option_strings)
        if action.nargs != 0:
            metavar = action.metavar or (
                "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
            )
            name += f" `{metavar}`"
    else:
        name = f"`{action.metavar or action.dest}`"
    notes = []
    if action.required or (not action.option_strings and action.nargs not in ("?", "*")):
        notes.append("required")
    elif not action.option_strings:
        notes.append("optional")
    if isinstance(action, argparse._AppendAction):
        notes.append("repeatable")
    if action.choices and action.option_strings:
        notes.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    if action.default not in (None, [], False, argparse.SUPPRESS) and action.nargs != 0:
        notes.append(f"default `{_yaml(action.default)}`")
    try:  # argparse's own expansion of %(default)s, %(prog)s, ... in a help text
        help_text = (action.help or "") % {**vars(action), "prog": "stepback"}
    except (KeyError, TypeError, ValueError):
        help_text = action.help or ""
    return f"| {name} | {_cell(help_text)} | {'; '.join(notes)} |"


def _commands(parser: argparse.ArgumentParser, prefix: str = "stepback") -> list[tuple[str, str, Any]]:
    """Every command under ``parser``, depth first: (its full name, its help, its parser); a command with
    subcommands of its own (``stepback store versions``) is followed by them."""
    out = []
    for name, summary, sp in _subcommands(parser):
        out.append((f"{prefix} {name}", summary, sp))
        out += _commands(sp, f"{prefix} {name}")
    return out


def _anchor(command: str) -> str:
    return command.replace(" ", "-")


def _command_section(command: str, summary: str, sp: argparse.ArgumentParser) -> list[str]:
    sp.formatter_class = functools.partial(argparse.HelpFormatter, width=100)
    out = [f"## `{command}`", ""]
    if summary:
        out += [f"{summary[:1].upper()}{summary[1:]}.", ""]
    out += ["```text", sp.format_usage().strip(), "```", ""]
    rows = [a for a in sp._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if rows:
        out += ["| argument | what it is | notes |", "|---|---|---|", *map(_option_row, rows), ""]
    return out


def cli_page() -> str:
    import stepback_ray.cli as cli

    parser = cli.build_parser()
    commands = _commands(parser)
    out = [
        "# Command-line reference",
        "",
        "<!-- generated by docs/gen_reference.py from stepback_ray.cli.build_parser(): edit the parser there -->",
        "",
        "Every subcommand of `stepback` and its options, generated from the argument parser when the site is built. "
        "`python -m stepback_ray ...` is the same command. "
        "What each exit status means is in [Errors and exit codes](../errors.md).",
        "",
        "| command | what it does |",
        "|---|---|",
        *[f"| [`{name}`](#{_anchor(name)}) | {_cell(summary)} |" for name, summary, _ in commands],
        "",
    ]
    top = [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    if top:
        out += ["## `stepback`", "", "| argument | what it is | notes |", "|---|---|---|", *map(_option_row, top), ""]
    for name, summary, sp in commands:
        out += _command_section(name, summary, sp)
    return "\n".join(out)


# ---- writing -------------------------------------------------------------------------------------------------


def pages() -> dict[str, str]:
    return {PAGES["configuration"]: configuration_page(), PAGES["cli"]: cli_page()}


def write(docs_dir: Path = DOCS) -> list[str]:
    """Write the generated pages under ``docs_dir``; only those whose text changed (``mkdocs serve`` would
    otherwise rebuild forever). Returns the pages written."""
    written = []
    for rel, text in pages().items():
        path = docs_dir / rel
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(rel)
    return written


def on_pre_build(config: Any) -> None:
    """The mkdocs hook (``hooks:`` in mkdocs.yml): the references are written before the site reads its files."""
    write(Path(config["docs_dir"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--print", action="store_true", help="print the pages instead of writing them")
    args = parser.parse_args(argv)
    if args.print:
        for rel, text in pages().items():
            print(f"<!-- {rel} -->\n{text}")
        return 0
    for rel in write():
        print(f"wrote docs/{rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
