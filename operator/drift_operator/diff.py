"""Decide how to converge a live child object onto its rendered form (pure).

The API server adds defaults (probe thresholds, `terminationMessagePath`, ...) and normalises quantities, so
"desired == live" would never hold. Instead a child is in sync when every field we render is present in the
live object with an equivalent value. Fields we rendered last time but no longer render are removed with a
JSON merge patch `null`, found through the last-applied annotation (the same three-way idea as kubectl).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from .constants import ANNOTATION_LAST_APPLIED

_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[a-zA-Z]{0,2})$")
_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
}


def parse_quantity(value: Any) -> Decimal | None:
    """A Kubernetes quantity ('500m', '2Gi', 1, '1e3') as a number; None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return Decimal(str(value))
    if not isinstance(value, str):
        return None
    match = _QUANTITY.match(value)
    if match is None:
        return None
    number, suffix = match.groups()
    try:
        base = Decimal(number)
        if suffix and suffix[0] in "eE":
            return base * (Decimal(10) ** int(suffix[1:]))
        return base * _SUFFIX[suffix] if suffix in _SUFFIX else None
    except (InvalidOperation, ValueError):
        return None


def _scalar_equal(desired: Any, live: Any) -> bool:
    if desired == live and type(desired) is type(live):
        return True
    if isinstance(desired, bool) or isinstance(live, bool):
        return False  # True is not 1 in a manifest
    # Quantities come back normalised ('0.5' -> '500m'), and ints may round-trip as strings.
    a, b = parse_quantity(desired), parse_quantity(live)
    return a is not None and a == b


def is_subset(desired: Any, live: Any) -> bool:
    """Every field of `desired` is in `live` with an equivalent value (lists: same length, item-wise)."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return False
        return all(key in live and is_subset(value, live[key]) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(live, list) or len(desired) != len(live):
            return False
        return all(is_subset(d, item) for d, item in zip(desired, live, strict=True))
    return _scalar_equal(desired, live)


def removals(previous: Any, desired: Any) -> dict[str, Any]:
    """A merge patch of `null`s for keys that `previous` had and `desired` no longer has (dicts only;
    lists are replaced whole by a merge patch anyway)."""
    out: dict[str, Any] = {}
    if not isinstance(previous, dict) or not isinstance(desired, dict):
        return out
    for key, value in previous.items():
        if key not in desired:
            out[key] = None
        elif isinstance(value, dict) and isinstance(desired[key], dict):
            nested = removals(value, desired[key])
            if nested:
                out[key] = nested
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        elif key not in out:
            out[key] = value
    return out


def last_applied(live: dict[str, Any] | None) -> dict[str, Any] | None:
    raw = ((live or {}).get("metadata") or {}).get("annotations", {}).get(ANNOTATION_LAST_APPLIED)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _managed(desired: dict[str, Any]) -> dict[str, Any]:
    """The part of an object we own (apiVersion/kind/name are addressing, not content)."""
    return {k: v for k, v in desired.items() if k not in ("apiVersion", "kind")}


def with_last_applied(desired: dict[str, Any]) -> dict[str, Any]:
    """The object to send: rendered content plus the annotation recording it."""
    record = json.dumps(_managed(desired), sort_keys=True, separators=(",", ":"))
    meta = dict(desired.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), ANNOTATION_LAST_APPLIED: record}
    return {**desired, "metadata": meta}


@dataclass(frozen=True)
class Plan:
    action: Literal["create", "patch", "noop"]
    body: dict[str, Any] | None = None


def plan_apply(desired: dict[str, Any], live: dict[str, Any] | None) -> Plan:
    """Create when absent; patch when a rendered field differs or a previously rendered field must go."""
    stamped = with_last_applied(desired)
    if live is None:
        return Plan("create", stamped)
    gone = removals(last_applied(live) or {}, _managed(desired))
    if not gone and is_subset(_managed(stamped), live):
        return Plan("noop")
    return Plan("patch", _merge(_managed(stamped), gone))


def plan_secret(desired: dict[str, Any], live: dict[str, Any] | None) -> Plan:
    """Secrets are created once; afterwards only labels and owner references are kept in shape, so the
    admin token is never rotated behind the running agents' backs."""
    if live is None:
        return Plan("create", desired)
    meta = {k: v for k, v in desired["metadata"].items() if k in ("labels", "ownerReferences")}
    if is_subset(meta, live.get("metadata") or {}):
        return Plan("noop")
    return Plan("patch", {"metadata": meta})


def foreign_owner(live: dict[str, Any] | None, uid: str) -> str | None:
    """Why `live` must not be touched on behalf of owner `uid` (None: it is ours, or absent).

    An object of the same name that some other controller owns, or that was made by hand, is never
    taken over: overwriting it could break whatever else relies on it."""
    if live is None:
        return None
    refs = (live.get("metadata") or {}).get("ownerReferences") or []
    controllers = [ref for ref in refs if ref.get("controller")]
    if any(ref.get("uid") == uid for ref in controllers):
        return None
    if controllers:
        ref = controllers[0]
        return f"it is controlled by {ref.get('kind')}/{ref.get('name')}"
    return "it exists and was not created by this LLMService"
