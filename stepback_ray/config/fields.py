"""What the job spec's sections are built from: strict sections, the numeric types, and the speed-only marking.

A field marked :data:`SPEED_ONLY` (``Field(..., json_schema_extra=SPEED_ONLY)``) changes only speed, capacity,
fault injection or access, never a result: a run resumed with another value goes on where it stopped (a smaller
batch after an out-of-memory crash, a rotated credential, the fault switched off). Every unmarked key must match
on a resume. The marking lives on the field itself, so a new key is a results key until someone says otherwise,
and :func:`marked_keys` reads the dotted keys off the models (a marked section counts whole).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict
from pydantic.fields import FieldInfo


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


Int = Annotated[int, Strict()]
"""An integer as written: YAML's ``true`` is not 1 (``--set limit=true`` would otherwise run one user), nor is
``5.0`` or ``"5"`` an integer."""
Number = Annotated[float, BeforeValidator(_not_a_boolean)]
"""A number (an integer is one too), never a boolean."""
Share = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=0.0, le=1.0)]
"""A share between 0 and 1 (a number, never a boolean)."""

SPEED_ONLY: dict[str, Any] = {"speed_only": True}
"""``json_schema_extra`` of a field that never changes a result (it also shows in the spec's JSON schema)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def is_speed_only(field: FieldInfo) -> bool:
    extra = field.json_schema_extra
    return isinstance(extra, dict) and extra.get("speed_only") is True


def _section(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def walk_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every dotted key of ``model`` with its field: the leaves, and a section marked speed-only as one key (its
    keys are not walked). Sections are entered; a field that is not a section is a leaf."""
    for name, field in model.model_fields.items():
        section = _section(field)
        if section is not None and not is_speed_only(field):
            yield from walk_keys(section, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def marked_keys(model: type[BaseModel]) -> tuple[str, ...]:
    """The dotted keys of ``model`` marked :data:`SPEED_ONLY`, in declaration order."""
    return tuple(key for key, field in walk_keys(model) if is_speed_only(field))
