"""Loading a job spec: the YAML file, its relative paths, ``--set`` overrides, and one-line errors naming the key.

Relative input paths written in a job file are resolved against the job file's folder (so a spec works from
any working directory); input paths given with ``--set`` and the output location are resolved against the
current directory, as a shell user expects. URIs with a scheme (``s3://...``) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from stepback_ray.config.sections import StorageConfig
from stepback_ray.config.spec import URI_SCHEME, JobSpec
from stepback_ray.errors import ConfigError

_PATH_KEYS = (
    ("input", "questions"),
    ("input", "outputs"),
    ("input", "path"),
    ("pplug", "train_questions"),
    ("pplug", "train_outputs"),
    ("pplug", "val_questions"),
    ("pplug", "val_outputs"),
)


_LOCATION_KEYS = {
    "input.questions",
    "input.outputs",
    "input.path",
    "output",
    "profile_store.uri",
    "pplug.checkpoint",
    "pplug.train_questions",
    "pplug.train_outputs",
    "pplug.val_questions",
    "pplug.val_outputs",
}


def _is_local_relative(p: str) -> bool:
    return not URI_SCHEME.match(p) and not os.path.isabs(p)


def _resolve_paths(data: dict[str, Any], base: Path, notes: dict[str, str], source: str) -> None:
    for keys in _PATH_KEYS:
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
            if node is None:
                break
        else:
            if isinstance(node, dict) and isinstance(node.get(keys[-1]), str) and _is_local_relative(node[keys[-1]]):
                notes[".".join(keys)] = (
                    f"written {node[keys[-1]]!r} in {source}: a relative path in a job file is read from the job "
                    "file's folder"
                )
                node[keys[-1]] = os.path.normpath(str(base / node[keys[-1]]))


_SET_RULE = "a relative path on the command line is read from the current directory"


def _resolve_override(key: str, value: Any, notes: dict[str, str]) -> Any:
    """A ``--set`` value with its relative local paths made absolute against the current directory (also those
    inside a section given whole, ``--set input={format: jsonl, path: x}``); ``notes`` says which were."""
    for dotted in [k for k in notes if k == key or k.startswith(key + ".")]:
        del notes[dotted]  # given again on the command line
    if isinstance(value, str):
        if key in _LOCATION_KEYS and _is_local_relative(value):
            notes[key] = f"given as {value!r} with --set: {_SET_RULE}"
            return os.path.abspath(value)
        return value
    if isinstance(value, dict):
        return {k: _resolve_override(f"{key}.{k}", v, notes) for k, v in value.items()}
    return value


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``key.sub=value`` strings -> (key, YAML-parsed value). ``limit=5`` gives an int, ``modes=[none]`` a list."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"]
            if msg.startswith("Value error, "):
                msg = msg[len("Value error, ") :]
            if "input" in e and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "; ".join(lines)


def load_job(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None, data: dict[str, Any] | None = None
) -> JobSpec:
    """Read a job spec file (or take ``data``), apply ``--set`` overrides and validate everything."""
    source = str(path) if path is not None else "<job spec>"
    notes: dict[str, str] = {}
    if data is None:
        if path is None:
            raise ConfigError("no job spec given")
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: job spec not found")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a job spec is a YAML mapping of keys to values")
        _resolve_paths(data, p.resolve().parent, notes, source)
    else:
        data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, _resolve_override(key, value, notes))
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e)) from None
    job._path_notes = notes
    return job


def storage_config(overrides: list[str]) -> StorageConfig:
    """Storage settings alone, from ``storage.KEY=VALUE`` overrides (commands that read a finished run)."""
    data: dict[str, Any] = {}
    for key, value in parse_overrides(overrides):
        if not key.startswith("storage."):
            raise ConfigError(f"--set {key}: only storage.* settings apply here")
        data[key[len("storage.") :]] = value
    try:
        return StorageConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error("--set", e).replace("--set: ", "--set storage.")) from None
