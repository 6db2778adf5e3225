"""The package layering: imports go one way (server -> engine -> multiplex -> core), and the decision code
(core, the dispatcher, the performance model, the simulator) runs without torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from scripts.import_graph import package_edges

# What each package imports (besides itself): the edges in use, as docs/architecture.md's table lists them.
# Anything else is an upward edge, a cycle, or a new dependency to decide on here and there.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "argtypes": set(),
    "partition": {"core"},
    "models": {"core"},
    "multiplex": {"core", "partition"},
    "engine": {"core", "partition", "models", "multiplex"},
    "bench": {"core", "argtypes"},
    # scripts/gpu_check.sh: the prepared GPU check drives the engine, profiler and partitions in-process
    "gpucheck": {"core", "partition", "models", "multiplex", "engine", "bench"},
    "routing": set(),  # the routing policies of the simulator and the router, over their own `InstanceView`
    "sim": {"core", "partition", "multiplex", "bench", "argtypes", "routing"},
    "commands": {"core", "partition", "models", "multiplex", "engine", "bench"},
    "server": {"core", "engine", "commands", "(top)"},
    "router": {"core", "routing"},  # `drift router`, the HTTP front door
    # The `drift` entry point; it loads the subcommands' modules by name (importlib), not by import.
    "cli": {"(top)", "core"},
    "(top)": set(),  # drift_agent/__init__.py: the version
}


def test_no_import_goes_up_a_layer() -> None:
    upward = {
        f"{a} -> {b} ({', '.join(sorted(mods))})"
        for (a, b), mods in package_edges().items()
        if b not in ALLOWED.get(a, set())
    }
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_every_allowed_edge_is_in_use() -> None:
    """The map stays the graph: an edge nothing uses any more is dropped here (and from the docs' table)."""
    edges = set(package_edges())
    unused = sorted(f"{a} -> {b}" for a, allowed in ALLOWED.items() for b in allowed if (a, b) not in edges)
    assert not unused, "allowed but unused (remove them from ALLOWED):\n" + "\n".join(unused)


def test_the_package_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join([*path, node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            visit(nxt, [*path, node])
        state[node] = "done"

    for node in list(graph):
        visit(node, [])


def test_decision_code_and_simulator_run_without_torch() -> None:
    """With `torch` unimportable: import the core, the dispatcher, the performance model and the simulator,
    and simulate a few `drift` requests end to end."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError

        import drift_agent.core.block_manager, drift_agent.core.config, drift_agent.core.errors
        import drift_agent.core.policies, drift_agent.core.sampling_params, drift_agent.core.scheduler
        import drift_agent.core.sequence
        import drift_agent.multiplex
        from drift_agent.multiplex.dispatcher import Dispatcher
        from drift_agent.multiplex.perf_model import PerfModel
        from drift_agent.bench.workloads import WorkloadParams, generate
        from drift_agent.sim.runner import SimSetup
        import drift_agent.routing

        setup = SimSetup.build(policy="drift")
        specs = generate("random", 8, 0, WorkloadParams(input_len=512, output_len=16))
        run = setup.run(specs, 4.0)
        assert all(r.success for r in run.records), run.records
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m]), "torch"
        print("ok", len(run.records))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok 8"
