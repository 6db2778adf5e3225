"""The CR spec model: defaults, errors, and agreement with the CRD schema and the agent's EngineConfig."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel

from drift_agent.core.config import POLICIES, SLO_SETTINGS, EngineConfig, PartitionConfig
from drift_operator.spec import (
    EngineSpec,
    LLMServiceSpec,
    SpecError,
    parse_duration,
    parse_spec,
    replicas_owner,
)

from .crd_validator import version_schema


def test_empty_spec_gets_defaults() -> None:
    spec = parse_spec({})
    assert spec.replicas == 1 and spec.policy == "drift" and spec.model.source == "embedded"
    assert spec.slo.window_seconds == 300 and spec.partition_steerable


def test_camel_case_on_the_wire() -> None:
    spec = parse_spec({"slo": {"ttftMs": 250, "attainmentTarget": 0.99}, "resources": {"gpusPerReplica": 2}})
    assert (
        spec.slo.ttft_ms == 250
        and spec.slo.attainment_target == 0.99
        and spec.resources.gpus_per_replica == 2
    )


@pytest.mark.parametrize(
    "raw,fragment",
    [
        ({"policy": "fastest"}, "spec.policy"),
        ({"scaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must not exceed"),
        ({"slo": {"window": "5 min"}}, "spec.slo.window"),
        ({"unknownField": 1}, "spec.unknownField"),
        ({"model": {"source": "pvc"}}, "claimName is required"),
    ],
)
def test_invalid_specs_give_one_line_reasons(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment) as info:
        parse_spec(raw)
    assert "\n" not in str(info.value)


def test_host_tier_preemption_and_fairness_settings() -> None:
    spec = parse_spec(
        {
            "engine": {
                "swapSpaceGb": 8.5,
                "preemptionMode": "swap",
                "fairness": "vtc",
                "fairnessPreemptGap": 1024,
            }
        }
    )
    engine = spec.engine
    assert (engine.swap_space_gb, engine.preemption_mode) == (8.5, "swap")
    assert (engine.fairness, engine.fairness_preempt_gap) == ("vtc", 1024)
    # Unset: the agent's defaults (no host tier, auto preemption, no fairness).
    default = parse_spec({}).engine
    assert (default.swap_space_gb, default.preemption_mode, default.fairness) == (0, "auto", "none")


@pytest.mark.parametrize(
    "engine,fragment",
    [
        (
            {"preemptionMode": "evict"},
            "spec.engine.preemptionMode: Input should be 'recompute', 'swap' or 'auto'",
        ),
        ({"fairness": "wfq"}, "spec.engine.fairness: Input should be 'none' or 'vtc'"),
        ({"swapSpaceGb": -1}, "spec.engine.swapSpaceGb: Input should be greater than or equal to 0"),
        ({"fairnessPreemptGap": 0}, "spec.engine.fairnessPreemptGap: Input should be greater than 0"),
        ({"swapSpaceGB": 4}, "spec.engine.swapSpaceGB: Extra inputs are not permitted"),  # camelCase is Gb
    ],
)
def test_bad_host_tier_and_fairness_settings_name_the_field(engine: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"engine": engine})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_duration_parsing() -> None:
    assert parse_duration("90s") == 90 and parse_duration("5m") == 300 and parse_duration("2h") == 7200
    with pytest.raises(ValueError):
        parse_duration("0m")


def test_replicas_owner_from_field_or_annotation() -> None:
    spec = parse_spec({})
    assert replicas_owner(spec, {}) == "operator"
    assert replicas_owner(spec, {"serving.drift.dev/replicas-owner": "External"}) == "external"
    assert replicas_owner(parse_spec({"scaling": {"replicasOwner": "external"}}), None) == "external"


def test_static_split_and_chunked_are_not_steered() -> None:
    assert not parse_spec({"partition": {"mode": "static"}}).partition_steerable
    assert not parse_spec({"policy": "chunked"}).partition_steerable
    assert parse_spec({"policy": "static-split"}).partition_steerable


def test_engine_fields_exist_in_the_agents_engine_config() -> None:
    """Every engine option the CR offers is a real EngineConfig field (the agent forbids extras)."""
    assert set(EngineSpec.model_fields) <= set(EngineConfig.model_fields)


def test_agent_settings_default_as_the_agent_does() -> None:
    """A CR that sets nothing runs the agent's own defaults (they are defined there, not restated here)."""
    spec = parse_spec({})
    agent = EngineConfig()
    for name in set(EngineSpec.model_fields) - {"seed"}:
        assert getattr(spec.engine, name) == getattr(agent, name), name
    for name in set(PartitionConfig.model_fields) & set(type(spec.partition).model_fields):
        assert getattr(spec.partition, name) == getattr(agent.partition, name), name
    for name, key in SLO_SETTINGS.items():
        assert getattr(spec.slo, name) == getattr(agent, key), name


def _literal_values(annotation: Any) -> list[Any] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):  # Literal[...] | None
        if typing.get_origin(arg) is typing.Literal:
            return list(typing.get_args(arg))
    return None


def _compare(model: type[BaseModel], schema: dict[str, Any], path: str) -> None:
    props = schema["properties"]
    aliases = {field.alias or name: (name, field) for name, field in model.model_fields.items()}
    assert set(aliases) == set(props), f"{path}: CRD {sorted(props)} vs model {sorted(aliases)}"
    for alias, (_, field) in aliases.items():
        prop, where = props[alias], f"{path}.{alias}"
        nested = [a for a in typing.get_args(field.annotation) or (field.annotation,) if isinstance(a, type)]
        sub = next((a for a in nested if issubclass(a, BaseModel)), None)
        if sub is not None and prop.get("type") == "object":
            _compare(sub, prop, where)
            continue
        if "default" in prop:
            default = field.get_default(call_default_factory=True)
            assert default == prop["default"], f"{where}: default {default!r} vs CRD {prop['default']!r}"
        values = _literal_values(field.annotation)
        if values is not None:
            assert sorted(map(str, values)) == sorted(map(str, prop["enum"])), where
        for meta in field.metadata:
            for attr, key in (("ge", "minimum"), ("gt", "minimum"), ("le", "maximum")):
                if getattr(meta, attr, None) is not None:
                    assert prop[key] == getattr(meta, attr), f"{where}: {attr}"
                    assert bool(prop.get("exclusiveMinimum")) == (attr == "gt") or key == "maximum", where


def test_crd_schema_matches_the_spec_model(crd: dict[str, Any]) -> None:
    """Defaults, enums and bounds are written twice (CRD for the API server, pydantic for the operator);
    this keeps them identical."""
    schema = version_schema(crd, "v1alpha1")["properties"]["spec"]
    _compare(LLMServiceSpec, schema, "spec")
    assert sorted(schema["properties"]["policy"]["enum"]) == sorted(POLICIES)
