"""Read YAML mappings into dataclasses, checked by the dataclasses' own definitions.

A rules file's sections are dataclasses (rulebook.schema). Each field is a YAML key of its own name (or of
`key(name=...)`), its type says how the value is checked and converted (an expression, true/false, a
name, one of a few words, a string or a list of strings, a nested dataclass or a list of them), and a
field without a default is a key the mapping must give. So the set of known keys, the required keys and
the types are written once, where the engine reads them, and cannot drift from a hand-kept key list.
Every error is one line: the file and place (`where`), the key, and what it must be.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from functools import lru_cache
from typing import Any, Literal

from ..errors import TensorscaleError

NOTE = "note"  # every mapping may carry a note for its readers; it is never read


class ValidationError(TensorscaleError):
    pass


class Name(str):
    """A type for fields holding a name (a space, a regex group): a string, checked as one."""


class Identifier(str):
    """A type for fields holding a name that must be a Python identifier (a config key, a regex group)."""


class Strings(list):
    """A type for fields holding one string or a list of strings (read as a list)."""


def key(
    name: str | None = None,
    *,
    parse=None,
    missing: str | None = None,
    yaml: bool = True,
    inline=None,
    labels: bool = False,
    **field_options,
):
    """A dataclass field read from a YAML mapping.

    name: the YAML key, when it is not the field's name (`assert`, `from`, `match`). parse: a function
    (value, where, context) -> the field's value, for what a type alone cannot say (context holds the
    fields read before this one, and what the caller passed). missing: the error's text when a required
    key is absent (default "needs 'KEY'"). yaml=False: not a key, the caller gives it. inline: a
    dataclass whose keys sit in this same mapping (a rule's axes/ops/scale form its transform). labels:
    the value names the entry in later errors, e.g. "tensors[3] (model\\.norm\\.weight)"."""
    metadata = {"key": name, "parse": parse, "missing": missing, "yaml": yaml, "inline": inline, "labels": labels}
    return dataclasses.field(metadata=metadata, **field_options)


def _meta(field: dataclasses.Field, item: str):
    return field.metadata.get(item, {"yaml": True}.get(item))


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


@lru_cache(maxsize=None)
def yaml_keys(cls) -> tuple[str, ...]:
    """The keys a mapping read as `cls` may give (its own fields, inline ones, and `note`)."""
    keys = []
    for field in dataclasses.fields(cls):
        if _meta(field, "inline") is not None:
            keys.extend(k for k in yaml_keys(_meta(field, "inline")) if k != NOTE)
        elif _meta(field, "yaml"):
            keys.append(_meta(field, "key") or field.name)
    return tuple(dict.fromkeys([*keys, NOTE]))  # a key two fields read (scale) once


def check_keys(value: dict, known, where: str) -> None:
    extra = sorted(set(value) - set(known), key=str)
    if extra:
        raise ValidationError(f"{where}: unknown key {extra[0]!r} (known: {', '.join(sorted(known))})")


def mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValidationError(f"{where} must be a mapping")
    return value


def read(cls, value, where: str, context: dict | None = None, **given):
    """An instance of the dataclass `cls` from the YAML mapping `value`, checked field by field in the
    order the fields are declared (so the first problem is reported, always the same one)."""
    value = mapping(value, where)
    check_keys(value, yaml_keys(cls), where)
    return cls(**_read_fields(cls, value, where, {**(context or {}), **given}, given))


def _read_fields(cls, value: dict, where: str, context: dict, given: dict) -> dict:
    hints = typing.get_type_hints(cls)
    found: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            found[field.name] = given[field.name]
            continue
        inline = _meta(field, "inline")
        if inline is not None:
            found[field.name] = inline(**_read_fields(inline, value, where, {**context, **found}, {}))
            continue
        if not _meta(field, "yaml"):
            continue
        name = _meta(field, "key") or field.name
        if name not in value:
            if _required(field):
                missing = _meta(field, "missing") or f"needs {name!r}"
                raise ValidationError(f"{where}{'' if missing.startswith(':') else ' '}{missing}")
            # the default, so that later fields see it (the tensors of a file without spaces see {})
            found[field.name] = (
                field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            )
            continue
        parse = _meta(field, "parse")
        raw = value[name]
        if parse is not None:
            found[field.name] = parse(raw, f"{where}", {**context, **found, "key": name})
        else:
            found[field.name] = convert(hints[field.name], raw, name, where, context)
        if _meta(field, "labels"):
            where = f"{where} ({raw})"
    return found


def convert(hint, value, name: str, where: str, context: dict | None = None):
    """`value` checked against the type `hint` and converted to it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in args if arg is not type(None)]
        if value is None and len(options) < len(args):
            return None
        return convert(options[0] if len(options) == 1 else typing.Union[tuple(options)], value, name, where, context)
    if origin is Literal:
        if value not in args:
            words = f"{args[0]!r} or {args[1]!r}" if len(args) == 2 else f"one of {', '.join(map(str, args))}"
            raise ValidationError(f"{where}: {name} must be {words}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValidationError(f"{where}: {name} must be true or false")
        return value
    if hint is Identifier:
        if not isinstance(value, str) or not value.isidentifier():
            raise ValidationError(f"{where}.{name} must be a name, got {value!r}")
        return str(value)
    if hint is Name:
        if not isinstance(value, str):
            raise ValidationError(f"{where}: {name} must be a name")
        return str(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValidationError(f"{where}: {name} must be a string, got {value!r}")
        return value
    if hint is Strings:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationError(f"{where}.{name} must be a string or a list of strings")
        return list(value)
    if origin is list and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise ValidationError(f"{where}.{name} must be a list")
        return [read(args[0], item, f"{where}.{name}[{i}]", context) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return read(hint, value, f"{where}: {name}", context)
    if hint is Any:
        return value
    raise TypeError(f"no reader for {hint!r} (field {name})")  # a programming error, not a user's
