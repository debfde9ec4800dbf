"""The config's JSON Schema and YAML plumbing: validation, line numbers, defaults.

The schema (mxrules.schema.json) is the one place a setting's name, type, limits
and default are written; `default` reads them for the dataclasses in
mxrules.config, the manual mxrules.yaml(5) prints them.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from .errors import ConfigProblem

# -- YAML with line numbers and no silent duplicate keys ------------------

class Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: Loader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def line_of(root: yaml.Node | None, tokens: list[str | int],
             key: str | None = None) -> int | None:
    """The 1-based line of the YAML node at `tokens`, or of its nearest parent.

    With `key`, the line of that key in the mapping found (an unknown key).
    """
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for token in tokens:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == token:
                    nxt = v
                    break
        elif (isinstance(node, yaml.SequenceNode) and isinstance(token, int)
              and 0 <= token < len(node.value)):
            nxt = node.value[token]
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    if key is not None and isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            if k.value == key:
                return int(k.start_mark.line) + 1
    return line


def dotted(tokens: list[str | int]) -> str:
    out = ""
    for token in tokens:
        out += f"[{token}]" if isinstance(token, int) else (f".{token}" if out else str(token))
    return out


# -- the schema ------------------------------------------------------------

@cache
def schema() -> dict[str, Any]:
    text = resources.files("mxrules").joinpath("mxrules.schema.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _key(path: str) -> dict[str, Any]:
    """The schema of a key by dotted path: `worker.threads`, `$defs.rule.enabled`."""
    node = schema()
    parts = path.split(".")
    if parts[0] == "$defs":
        node, parts = node["$defs"][parts[1]], parts[2:]
    for part in parts:
        node = node["properties"][part]
    return node


def _typed(key: dict[str, Any], value: Any) -> Any:
    # A `number` is a float, so `2` and `2.0` are one value to the programs.
    return float(value) if key.get("type") == "number" else value


def default(path: str) -> Any:
    """The schema's default for the key at `path`; KeyError if it has none."""
    key = _key(path)
    return _typed(key, key["default"])


def value(data: Any, path: str) -> Any:
    """The config's value at `path`, else the schema's default, else None."""
    key = _key(path)
    for part in path.split("."):
        if not isinstance(data, dict) or part not in data:
            return _typed(key, key["default"]) if "default" in key else None
        data = data[part]
    return _typed(key, data)


def _ecma_anchors(pattern: str) -> str:
    """A JSON Schema (ECMA-262) regex for Python's `re`: `$` means the very end.

    Python's `$` also matches before a final newline, which would let
    `header_value: "x\\n"` through `^[^\\r\\n]*$`: a header injection.
    """
    out, escaped, in_class = [], False, False
    for ch in pattern:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
    return "".join(out)


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Any:
    if validator.is_type(instance, "string") and not re.search(_ecma_anchors(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@cache
def _validator_class() -> Any:
    base = jsonschema.validators.validator_for(schema())
    return jsonschema.validators.extend(base, {"pattern": _pattern})


@cache
def _validator(sub: str | None = None) -> jsonschema.protocols.Validator:
    # One validator per (sub)schema for the process: a new one would resolve its
    # $refs afresh, 1 ms per SES filter or rule validated, 100 s for 100,000 filters.
    full = schema()
    target = full if sub is None else {**full["$defs"][sub], "$defs": full["$defs"]}
    return _validator_class()(target)


def _explain(error: jsonschema.ValidationError) -> str:
    """A schema error in words a person acts on."""
    inst = error.instance
    desc = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(inst) - set(allowed)) if isinstance(inst, dict) else []
        is_action = set(allowed) == set(schema()["$defs"]["action"]["properties"])
        what = "action" if is_action else "key"
        names = ", ".join(repr(e) for e in extra)
        return f"unknown {what} {names} (expected one of: {', '.join(allowed)})"
    if error.validator in ("minProperties", "maxProperties") and desc:
        return f"must be {desc}"
    if error.validator == "required":
        return str(error.message).replace("is a required property", "is required")
    if error.validator == "pattern":
        return f"{inst!r} is not valid: expected {desc}" if desc else str(error.message)
    if error.validator == "maxLength":
        return f"too long ({len(inst)} characters, at most {error.validator_value})" + (
            f": {desc}" if desc else "")
    if error.validator == "enum":
        choices = ", ".join(str(v) for v in error.validator_value)
        return f"{inst!r} is not one of: {choices}"
    if error.validator == "type":
        return f"must be of type {error.validator_value} (got {type(inst).__name__})"
    if error.validator == "propertyNames":
        return f"name {inst!r} is not valid"
    return str(error.message)


def schema_problems(
    data: Any, file: str, node: yaml.Node | None, sub: str | None = None,
    prefix: list[str | int] | None = None, spell: Any = None,
) -> list[ConfigProblem]:
    problems = []
    for error in sorted(_validator(sub).iter_errors(data), key=lambda e: list(map(str, e.path))):
        tokens: list[str | int] = [*(prefix or []), *error.absolute_path]
        if error.validator == "propertyNames" and isinstance(error.instance, str):
            tokens.append(error.instance)
        where = file
        key = None
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            key = extra[0] if extra else None
        line = line_of(node, tokens, key) if node is not None else None
        if line:
            where = f"{file}:{line}"
        path = spell(list(error.absolute_path)) if spell else dotted(tokens)
        problems.append(ConfigProblem(where, path, _explain(error)))
    return problems
