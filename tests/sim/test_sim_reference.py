"""Reference runs: every policy, layout and simulator mode (fast-forward, preemption, migration, hand-off) on
small GPU-scale workloads, compared record by record with the records stored in `reference_records.json`. A refactor of the scheduler, the policies, the
dispatcher or the simulator must leave them identical; a deliberate change of behaviour rewrites the file with
`python -m tests.sim.test_sim_reference --write` and says why in its commit."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from drift_agent.bench.workloads import WorkloadParams, generate
from drift_agent.sim.cluster import ClusterConfig
from drift_agent.sim.migration import MigrationConfig
from drift_agent.sim.runner import SimSetup

from .helpers import mixed_long_and_chat

REFERENCE = Path(__file__).with_name("reference_records.json")
SIGNIFICANT = 10  # digits kept of every float: libm may differ in the last bits between machines


def _mixed() -> list:
    return mixed_long_and_chat(48)


def _multi_turn() -> list:
    return generate("multi-turn", 48, 3, WorkloadParams(input_len=512, output_len=128, mean_turns=3.0))


# name -> (setup arguments, cluster changes, instance changes, workload, rate)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any], Any, float]] = {
    "prefill-first": ({"policy": "prefill-first"}, {}, {}, _mixed, 6.0),
    "chunked": ({"policy": "chunked"}, {}, {}, _mixed, 6.0),
    "chunked-step": ({"policy": "chunked"}, {}, {"fast_forward": False}, _mixed, 6.0),
    "static-split": ({"policy": "static-split", "prefill_sm_share": 0.4}, {}, {}, _mixed, 6.0),
    "drift": ({"policy": "drift"}, {}, {}, _mixed, 6.0),
    "drift-step": ({"policy": "drift"}, {}, {"fast_forward": False}, _mixed, 6.0),
    "drift-margin": ({"policy": "drift", "tpot_margin": 0.3, "model_error": 1.2}, {}, {}, _mixed, 6.0),
    "drift-no-fold": ({"policy": "drift", "fold_max_tokens": 0, "slo_tpot_ms": 40.0}, {}, {}, _mixed, 6.0),
    "drift-small-pool": ({"policy": "drift", "num_kv_blocks": 800}, {}, {}, _mixed, 8.0),
    "prefix-affinity": (
        {"policy": "drift", "enable_prefix_caching": True},
        {"instances": 2, "router": "prefix-affinity"},
        {},
        _multi_turn,
        8.0,
    ),
    "slo-aware": ({"policy": "chunked"}, {"instances": 2, "router": "slo-aware"}, {}, _mixed, 10.0),
    "migration": (
        {"policy": "chunked", "num_kv_blocks": 1200},
        {
            "instances": 2,
            "router": "round-robin",
            "migration": MigrationConfig(high_watermark=0.6, low_watermark=0.3),
        },
        {},
        _mixed,
        10.0,
    ),
    "disaggregated": ({"policy": "chunked"}, {"disaggregated": (1, 1)}, {}, _mixed, 6.0),
}


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{SIGNIFICANT}g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def run_case(name: str) -> list[dict[str, Any]]:
    setup_args, cluster_changes, instance_changes, workload, rate = CASES[name]
    setup = SimSetup.build(cluster=ClusterConfig(**cluster_changes), **setup_args)
    if instance_changes:
        setup = setup.with_instance(**instance_changes)
    run = setup.run(workload(), rate, seed=7)
    records = []
    for r in run.records:
        d = _round(r.to_dict())
        # The inter-token latencies as a digest: the file stays small and any change of one still shows.
        itl = d.pop("itl")
        d["itl"] = [len(itl), hashlib.sha256(json.dumps(itl).encode()).hexdigest()[:16]]
        records.append(d)
    return records


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_run_is_unchanged(name: str) -> None:
    expected = json.loads(REFERENCE.read_text())[name]
    got = run_case(name)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g == e, f"{name}: request {e['request_id']} differs"


if __name__ == "__main__" and "--write" in sys.argv:
    REFERENCE.write_text(json.dumps({n: run_case(n) for n in sorted(CASES)}, separators=(",", ":")) + "\n")
    print(f"wrote {REFERENCE}")
