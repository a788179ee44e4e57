"""A pydantic validation error as one line a user can act on, naming keys, not classes.

Locations lose pydantic's union tags (``literal['auto','none']``, ``constrained-int``)
and our model class names; messages lose ``instance of RoiConfig``; the alternatives of
a union are said together (``'auto', or an integer``).
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from .errors import ConfigError

README_WORKFLOW = "see 'The workflow file' in the README"
TAG_PREFIXES = ("function-", "tagged-", "literal[", "constrained-")  # pydantic's union tags
TAGS = {"int", "float", "str", "bool", "list", "dict", "tuple"}


def config_error(
    error: ValidationError, root: type[BaseModel], where: str, prefix: tuple[str, ...] = ()
) -> ConfigError:
    """The first problem of ``error`` (validating ``root``) as a :class:`ConfigError`."""
    errors = error.errors()
    first = errors[0]
    key = _key(first, prefix)
    if first["type"] == "literal_error":  # a mapping given for a union: its own problem
        deeper = [e for e in errors if _key(e, prefix).startswith(key + ".")]
        first, key = (deeper[0], _key(deeper[0], prefix)) if deeper else (first, key)
    if first["type"] == "extra_forbidden":
        return ConfigError(f"unknown key {key!r}", where, _did_you_mean(key.split("."), root))
    if first["type"] == "missing":
        return ConfigError(f"missing key {key!r}", where, f"add it ({README_WORKFLOW})")
    alternatives = [_plain(e["msg"]) for e in errors if _key(e, prefix) == key]
    message = "Input should be " + ", or ".join(dict.fromkeys(alternatives))
    if first["type"] == "value_error" or not all(m for m in alternatives):
        message = first["msg"].removeprefix("Value error, ")
    got = "" if first["type"] == "value_error" else f" (got {_short(first.get('input'))})"
    return ConfigError(f"invalid value for {key}: {message}{got}", where, README_WORKFLOW)


def _key(error: Any, prefix: tuple[str, ...]) -> str:
    loc = [*prefix] + [
        str(p)
        for p in error["loc"]
        if not str(p).startswith(TAG_PREFIXES) and p not in TAGS and not _is_model_name(p)
    ]
    return ".".join(loc) or "workflow"


def _plain(message: str) -> str:
    """``Input should be a valid dictionary or instance of RoiConfig`` -> ``a mapping``;
    empty where the message does not say what the input should be."""
    if not message.startswith("Input should be "):
        return ""
    text = message.removeprefix("Input should be ").split(", unable to")[0]
    text = re.sub(r" or instance of \w+", "", text)
    return text.replace("a valid dictionary", "a mapping").replace("a valid integer", "an integer")


def _is_model_name(part: Any) -> bool:
    """A union member's class name (e.g. ``Scaling``) in an error location: not a key."""
    return isinstance(part, str) and part[:1].isupper() and any(c.islower() for c in part)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _did_you_mean(loc: list[str], root: type[BaseModel]) -> str:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _submodel(field.annotation) if field else None
    known = list(model.model_fields) if model else []
    close = difflib.get_close_matches(loc[-1], known, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known keys: {', '.join(known)}" if known else "remove it"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    candidates = getattr(annotation, "__args__", (annotation,))
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None
