"""Shared pieces for the recipe schemas: the strict base model and error formatting.

Every schema module of this package (recipe.py, data.py, serve.py, ...) builds on `Strict`, so an unknown key anywhere
in a recipe is an error, and `format_errors` turns pydantic's errors into lines a user can act on:
`stages[1].lora.r: must be > 0` or `stages[0].lorra: unknown key; did you mean 'lora'?`.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Base for every recipe block: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def yaml_path(loc: tuple[Any, ...]) -> str:
    """('stages', 1, 'lora', 'r') -> 'stages[1].lora.r' (the way a user points into a YAML file)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _unwrap(tp: Any) -> list[Any]:
    """The model classes an annotation can hold (through Optional, list[...], dict[..., ...], unions)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(tp)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, set, dict):
        args = typing.get_args(tp)
        if origin is dict:
            args = args[1:]
        return [m for a in args for m in _unwrap(a)]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Walk `loc` (minus its last part) from the root model to the model class that owns the last key."""
    current: list[type[BaseModel]] = [root]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for model in current:
            field = _field_by_key(model, part)
            if field is not None:
                nxt += _unwrap(field.annotation)
        if not nxt:
            # A dict key (e.g. a dataset name): the models stay the dict's value models, already unwrapped.
            nxt = current
        current = nxt
    return current[0] if current else None


def _field_by_key(model: type[BaseModel], key: str):
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required key is missing",
}


def format_errors(exc: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[str]:
    """One line per problem, each starting with the YAML path it concerns."""
    lines = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            model = _model_at(root, tuple(err["loc"]))
            known = _keys(model) if model else []
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            allowed = f"; allowed keys: {', '.join(known)}" if known else ""
            hint = f"; did you mean '{guess[0]}'?" if guess else allowed
            lines.append(f"{yaml_path(loc)}: unknown key{hint}")
            continue
        template = _MESSAGES.get(kind)
        ctx = err.get("ctx") or {}
        msg = template.format(**ctx) if template else err["msg"]
        if kind.startswith("value_error"):
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{yaml_path(loc)}: {msg}")
    return lines


def did_you_mean(key: str, known: list[str]) -> str:
    guess = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean '{guess[0]}'?" if guess else ""
