"""pydantic's validation errors as one line that names the key path, with a "did you mean"."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def describe(err: ValidationError, cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One line for the first error of a pydantic ValidationError, naming the key path."""
    errors = err.errors(include_url=False)
    # An unknown key usually explains the rest (a misspelt d_model leaves the default in place), so it comes first.
    errors.sort(key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = _key_path(cls, first["loc"])
    path = ".".join(prefix + loc) or "(top level)"
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        known = _fields_at(cls, loc[:-1])
        hint = did_you_mean(loc[-1], known) or (f"; known keys: {', '.join(known)}" if known else "")
        return f"{path}: unknown key{hint}{more}"
    if first["type"] == "missing":
        return f"{path}: missing required key{more}"
    message = first["msg"]
    message = message[0].lower() + message[1:]
    for noise in ("Value error, ", "value error, "):
        message = message.replace(noise, "")
    return f"{path}: {message}, got {first.get('input')!r}{more}"


def _key_path(cls: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The error location as config keys: drop the member tags pydantic adds inside a union (`str`, ...)."""
    parts: list[str] = []
    current: Any = cls
    skip_tag = False
    for part in loc:
        if skip_tag:
            skip_tag = False
            continue
        parts.append(str(part))
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        field = fields.get(part) if isinstance(part, str) else None
        if field is None:
            current = None
            continue
        members = [a for a in typing.get_args(field.annotation) if a is not type(None)]
        current = _section_class(field.annotation)
        is_union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
        skip_tag = current is None and is_union and len(members) > 1
    return tuple(parts)


def _fields_at(cls: Any, loc: tuple[str, ...]) -> list[str]:
    """The field names of the (nested) section at `loc`, for "did you mean" hints."""
    current: Any = cls
    for part in loc:
        fields = getattr(current, "model_fields", None) if isinstance(current, type) else None
        field = fields.get(part) if fields else None
        if field is None:
            return []
        current = _section_class(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _section_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_class(arg)
        if found is not None:
            return found
    return None


def did_you_mean(word: str, known: Any) -> str:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def describe_kind(value: Any) -> str:
    """How a YAML value reads to a user: a mapping, a list, a string, int, ..."""
    names: dict[type, str] = {dict: "a mapping", list: "a list", str: "a string"}
    return names.get(type(value), type(value).__name__)
