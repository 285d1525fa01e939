"""Reading configs: YAML files (composed with ``base:``), dotted ``--set`` overrides, and errors
that name the file and the key. Types and values are checked by pydantic.

Every config section is a ``pydantic.dataclasses.dataclass`` declared with ``SECTION`` (unknown
keys forbidden, NaN and infinity refused); a section's own cross-field rules live in its
``__post_init__``. Loading validates the merged tree strictly (an integer setting refuses
``true`` and ``"3"``), as JSON, so lists become tuples where a section declares tuples.

Composition: a file may start with ``base: other.yaml`` (a path relative to it, or a list of
them), merged first; several ``--config`` files merge in order; ``--set`` overrides come last.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import to_jsonable_python

SECTION = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
BASE_KEY = "base"


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names it."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-5`` is a number, not the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader: no tags, no objects)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (lists instead of tuples) for YAML/JSON and for MLflow params."""
    return to_jsonable_python(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def from_dict(cls: type, data: Any, source: str = "config") -> Any:
    """Build config ``cls`` from nested plain data; missing keys keep their defaults.

    ``source`` names where the data came from (a file, ``--set``) for error messages.
    """
    try:
        text = json.dumps(data, default=str)
    except ValueError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        return TypeAdapter(cls).validate_json(text, strict=True)
    except ValidationError as error:
        raise ConfigError(_describe(error.errors()[0], cls, data, source)) from None


def updated(config: Any, source: str = "", **changes: Any) -> Any:
    """``dataclasses.replace`` with the error a user can read: a ``ConfigError`` naming the key."""
    try:
        return dataclasses.replace(config, **changes)
    except ValidationError as error:
        raise ConfigError(_describe(error.errors()[0], type(config), changes, source)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"degradation.jpeg_range=[40,90]"`` -> ``("degradation.jpeg_range", [40, 90])``.

    The value is read as YAML, so numbers, booleans, lists and ``null`` keep their types.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. degradation.jpeg_range=[40,90]")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {error}") from None
    return key.strip(), value


def merge_override(data: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in nested dict ``data`` (creating sections as needed)."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}=...: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its ``base:`` files merged under it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path}: its base files include itself")
    try:
        data = yaml_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    bases = data.pop(BASE_KEY, [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str):
            raise ConfigError(f"config file {path}: {BASE_KEY} must name files, got {base!r}")
        merged = deep_merge(merged, read_yaml(path.parent / base, (*seen, path.resolve())))
    return deep_merge(merged, data)


def load_config(cls: type, paths: str | Path | list[str | Path] | None = None, overrides: list[str] = ()) -> Any:
    """Defaults of ``cls``, then each YAML file in order, then ``--set`` overrides."""
    paths = [] if paths is None else [paths] if isinstance(paths, (str, Path)) else list(paths)
    data: dict[str, Any] = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    source = " + ".join(str(path) for path in paths) or "defaults"
    if overrides:
        for text in overrides:
            key, value = parse_override(text)
            merge_override(data, key, value)
        source = f"{source} with --set overrides"
    return from_dict(cls, data, source=source)


# --- error messages ------------------------------------------------------------------------------


def _describe(error: dict[str, Any], cls: type, data: Any, source: str) -> str:
    loc = error["loc"]
    kind = error["type"]
    prefix = f"{source}: " if source else ""
    if kind == "unexpected_keyword_argument":
        fields = _field_names(_type_at(cls, loc[:-1]))
        return f"{prefix}unknown key {_dotted(loc)} (known: {', '.join(fields)})"
    if kind == "value_error":  # a section's own rule (__post_init__)
        message = error["msg"].removeprefix("Value error, ")
        return f"{prefix}{_dotted(loc) + ': ' if loc else ''}{message}"
    if kind in ("missing", "too_short", "too_long") and loc and isinstance(loc[-1], int) or kind in (
            "too_short", "too_long"):
        field_loc = loc[:-1] if loc and isinstance(loc[-1], int) else loc
        expected = len(typing.get_args(_type_at(cls, field_loc)))
        return f"{prefix}{_dotted(field_loc)}: expected {expected} values, got {_value_at(data, field_loc)!r}"
    where = f"{prefix}{_dotted(loc) or '<top level>'}"
    value = error.get("input")
    expectations = {
        "int_type": "expected an integer", "int_from_float": "expected an integer",
        "float_type": "expected a number", "finite_number": "expected a finite number",
        "bool_type": "expected true or false", "string_type": "expected a string",
        "dataclass_type": "expected a section (mapping)", "dict_type": "expected a mapping",
        "list_type": "expected a list", "tuple_type": "expected a list",
    }
    if kind in expectations:
        return f"{where}: {expectations[kind]}, got {value!r}"
    if kind == "literal_error":
        return f"{where}: {value!r} is not one of {error['ctx']['expected']}"
    return f"{where}: {error['msg']}"


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def _type_at(cls: Any, loc: tuple) -> Any:
    node = cls
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(node) if a is not Ellipsis]
            node = args[min(part, len(args) - 1)] if args else Any
        elif dataclasses.is_dataclass(node):
            node = typing.get_type_hints(node).get(part, Any)
        else:
            args = [a for a in typing.get_args(node) if dataclasses.is_dataclass(a)]
            node = typing.get_type_hints(args[0]).get(part, Any) if args else Any
    return node


def _field_names(node: Any) -> list[str]:
    candidates = [node, *typing.get_args(node)]
    for candidate in candidates:
        if dataclasses.is_dataclass(candidate):
            return [f.name for f in dataclasses.fields(candidate)]
    return []


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data
