"""Validate custom resources against a CRD's openAPIV3Schema offline, the way the API server would:
structural defaulting, pruning of unknown fields (reported as errors here), OpenAPI v3 checks (types,
enums, minimums, patterns) and the x-kubernetes-validations CEL rules (evaluated with the `cel` package).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import jsonschema


class CRValidationError(ValueError):
    pass


def version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(version)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Fill `default`s the way the API server does: for absent properties, recursing into objects/arrays."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                if key not in props:
                    value[key] = apply_defaults(extra, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def unknown_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields the API server would prune (silently): a typo in a manifest, or status we forgot to declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if props is not None and key in props:
                out += unknown_fields(props[key], sub, f"{path}.{key}")
            elif isinstance(extra, dict):
                out += unknown_fields(extra, sub, f"{path}.{key}")
            elif props is not None and path != ".metadata":
                out.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            out += unknown_fields(schema["items"], item, f"{path}[{i}]")
    return out


def cel_rules(
    schema: dict[str, Any], value: Any, path: str = ""
) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """Every (path, rule, self-value) to evaluate, for nodes present in `value`."""
    for rule in schema.get("x-kubernetes-validations") or []:
        yield path, rule, value
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                yield from cel_rules(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_rules(schema["items"], item, f"{path}[{i}]")


def check_cel(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    import cel  # the `common-expression-language` package

    errors = []
    for path, rule, value in cel_rules(schema, obj):
        if not cel.evaluate(rule["rule"], {"self": value}):
            errors.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
    return errors


def validate(crd: dict[str, Any], obj: dict[str, Any], *, with_cel: bool = True) -> dict[str, Any]:
    """Return the defaulted object, or raise CRValidationError listing every problem."""
    version = obj["apiVersion"].split("/")[-1]
    schema = version_schema(crd, version)
    defaulted = apply_defaults(schema, copy.deepcopy(obj))
    errors = [f"unknown field {p}" for p in unknown_fields(schema, defaulted)]
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 = draft 4 + boolean exclusiveMinimum
    errors += [
        f".{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(defaulted)
    ]
    if with_cel and not errors:
        errors += check_cel(schema, defaulted)
    if errors:
        raise CRValidationError("; ".join(errors))
    return defaulted
