"""The JSON Schema subset structured answers are checked against (pure, no imports of
the rest of the guard, so the guard's config can validate a schema at load)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

SUPPORTED_KEYWORDS = frozenset(
    [
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "enum",
        "const",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minProperties",
        "maxProperties",
        "anyOf",
        "oneOf",
        "allOf",
        "not",
        "$ref",
        "$defs",
        "definitions",
        "$schema",
        "$id",
        "title",
        "description",
        "default",
        "examples",
        "format",
        "strict",
    ]
)
_SCHEMA_CHILDREN = ("items", "not", "additionalProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")


def _subschemas(schema: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    for key in _SCHEMA_CHILDREN:
        if isinstance(schema.get(key), dict):
            yield key, schema[key]
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            yield f"{key}[{i}]", sub
    for key in _SCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            yield f"{key}.{name}", sub


def check_schema_supported(schema: Any, where: str = "schema") -> None:
    """Raise ValueError naming the first unsupported keyword or malformed part."""
    if not isinstance(schema, dict):
        raise ValueError(f"{where}: a schema must be a mapping")
    unknown = sorted(set(schema) - SUPPORTED_KEYWORDS)
    if unknown:
        raise ValueError(f"{where}: unsupported JSON Schema keywords {unknown}")
    ref = schema.get("$ref")
    if ref is not None and not re.fullmatch(r"#/(?:\$defs|definitions)/[^/]+", str(ref)):
        raise ValueError(f"{where}: only local '#/$defs/<name>' references are supported")
    if "pattern" in schema:
        re.compile(str(schema["pattern"]))
    for name, sub in _subschemas(schema):
        check_schema_supported(sub, f"{where}.{name}")


@dataclass(frozen=True, slots=True)
class SchemaVerdict:
    """Pass/fail with paths and keywords only: never the offending values."""

    ok: bool
    errors: tuple[str, ...] = ()


_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


class _Validator:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.errors: list[str] = []

    def check(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if len(self.errors) >= 10:
            return
        if "$ref" in schema:
            _, group, name = str(schema["$ref"]).split("/", 2)
            self.check(value, self.root[group][name], path)
        for check in (
            self._type,
            self._enum,
            self._combinators,
            self._string,
            self._number,
            self._array,
            self._object,
        ):
            check(value, schema, path)

    def _fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")

    def _type(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        want = schema.get("type")
        if want is None:
            return
        names = [want] if isinstance(want, str) else list(want)
        if not any(_TYPES[n](value) for n in names if n in _TYPES):
            self._fail(path, f"expected type {'|'.join(names)}")

    def _enum(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if "enum" in schema and not any(_same(value, e) for e in schema["enum"]):
            self._fail(path, "not one of the enum values")
        if "const" in schema and not _same(value, schema["const"]):
            self._fail(path, "not the const value")

    def _combinators(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        for sub in schema.get("allOf") or ():
            self.check(value, sub, path)
        if "anyOf" in schema and not any(self._passes(value, s) for s in schema["anyOf"]):
            self._fail(path, "matches none of anyOf")
        if "oneOf" in schema and sum(self._passes(value, s) for s in schema["oneOf"]) != 1:
            self._fail(path, "does not match exactly one of oneOf")
        if "not" in schema and self._passes(value, schema["not"]):
            self._fail(path, "matches a 'not' schema")

    def _passes(self, value: Any, schema: Mapping[str, Any]) -> bool:
        sub = _Validator(self.root)
        sub.check(value, schema, "")
        return not sub.errors

    def _string(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if not isinstance(value, str):
            return
        if len(value) < schema.get("minLength", 0):
            self._fail(path, "shorter than minLength")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            self._fail(path, "longer than maxLength")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            self._fail(path, "does not match pattern")

    def _number(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if not _TYPES["number"](value):
            return
        broken: dict[str, Callable[[Any], bool]] = {
            "minimum": lambda b: bool(value < b),
            "maximum": lambda b: bool(value > b),
            "exclusiveMinimum": lambda b: bool(value <= b),
            "exclusiveMaximum": lambda b: bool(value >= b),
        }
        for key, check in broken.items():
            if key in schema and check(schema[key]):
                self._fail(path, f"violates {key}")

    def _array(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if not isinstance(value, list):
            return
        if len(value) < schema.get("minItems", 0):
            self._fail(path, "fewer than minItems")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            self._fail(path, "more than maxItems")
        if schema.get("uniqueItems") and len(
            {orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in value}
        ) != len(value):
            self._fail(path, "items are not unique")
        prefix = schema.get("prefixItems") or ()
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items")
            if isinstance(sub, dict):
                self.check(item, sub, f"{path}[{i}]")

    def _object(self, value: Any, schema: Mapping[str, Any], path: str) -> None:
        if not isinstance(value, dict):
            return
        props = schema.get("properties") or {}
        for name in schema.get("required") or ():
            if name not in value:
                self._fail(path, f"missing required property {name!r}")
        if len(value) < schema.get("minProperties", 0):
            self._fail(path, "fewer than minProperties")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            self._fail(path, "more than maxProperties")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                self.check(item, props[name], f"{path}.{name}")
            elif extra is False:
                self._fail(path, "has a property not allowed by additionalProperties")
            elif isinstance(extra, dict):
                self.check(item, extra, f"{path}.{name}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def validate_json_schema(instance: Any, schema: Mapping[str, Any]) -> SchemaVerdict:
    """Validate a decoded JSON value (e.g. a tool_use input) against the schema subset."""
    v = _Validator(schema)
    v.check(instance, schema, "$")
    return SchemaVerdict(not v.errors, tuple(v.errors))


def validate_structured(text: str, schema: Mapping[str, Any]) -> SchemaVerdict:
    """Validate an answer's text: it must be JSON (surrounding whitespace allowed)."""
    try:
        instance = orjson.loads(text.strip())
    except orjson.JSONDecodeError:
        return SchemaVerdict(False, ("$: not valid JSON",))
    return validate_json_schema(instance, schema)
