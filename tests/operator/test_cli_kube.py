"""`drift operator` argument handling, credential loading, and the operator's own metrics."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from drift_operator import cli, operator_metrics
from drift_operator.kube import api_base, load_credentials, object_path
from drift_operator.settings import OperatorConfig


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="drift")
    cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_parser_registers_the_operator_command() -> None:
    args = _parse(["operator", "-n", "a", "-n", "b", "--standalone"])
    assert args.func is cli.run and args.namespaces == ["a", "b"] and args.standalone
    assert _parse(["operator", "-A"]).all_namespaces
    with pytest.raises(SystemExit):
        _parse(["operator", "-n", "a", "-A"])


def test_run_starts_kopf_with_the_chosen_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(kopf, "run", lambda **kw: calls.append(kw))
    monkeypatch.setattr(kopf, "configure", lambda **kw: None)
    monkeypatch.setattr("drift_operator.kube.load_credentials", lambda: None)
    assert cli.run(_parse(["operator", "-n", "team-a", "--standalone"])) == 0
    assert calls[-1]["namespaces"] == ["team-a"] and not calls[-1]["clusterwide"] and calls[-1]["standalone"]
    assert cli.run(_parse(["operator"])) == 0
    assert calls[-1]["clusterwide"] and calls[-1]["namespaces"] == []


def test_run_reports_failures_as_an_exit_code(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import kopf

    def fail(**_: Any) -> None:
        raise kopf.LoginError("no credentials")

    monkeypatch.setattr(kopf, "run", fail)
    monkeypatch.setattr(kopf, "configure", lambda **kw: None)
    monkeypatch.setattr("drift_operator.kube.load_credentials", lambda: None)
    assert cli.run(_parse(["operator"])) == 1
    assert "no credentials" in capsys.readouterr().err
    assert cli.run(_parse(["operator", "--interval", "-1"])) == 2


def test_settings_from_environment() -> None:
    config = OperatorConfig.from_env(
        {"DRIFT_OPERATOR_LOOP_INTERVAL": "5", "DRIFT_PROMETHEUS_URL": "http://p:9090"}
    )
    assert (
        config.loop_interval_s == 5
        and config.prometheus_url == "http://p:9090"
        and config.metrics_port is None
    )
    with pytest.raises(ValueError, match="DRIFT_OPERATOR_LOOP_INTERVAL"):
        OperatorConfig.from_env({"DRIFT_OPERATOR_LOOP_INTERVAL": "soon"})


def test_credentials_from_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c",
        "clusters": [
            {"name": "k", "cluster": {"server": "https://k8s.example:6443", "insecure-skip-tls-verify": True}}
        ],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
        "users": [{"name": "u", "user": {"token": "abc123"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    creds = load_credentials()
    assert creds.server == "https://k8s.example:6443" and creds.token == "abc123" and creds.insecure


def test_api_paths() -> None:
    assert api_base("v1") == "/api/v1" and api_base("apps/v1") == "/apis/apps/v1"
    assert object_path("apps/v1", "deployments", "ns", "d") == "/apis/apps/v1/namespaces/ns/deployments/d"
    assert object_path("serving.drift.dev/v1alpha1", "llmservices", "ns", "x", "status").endswith("/x/status")


def test_operator_metrics_mirror_status() -> None:
    status = {
        "attainment": {"ttft": 0.8, "tpot": 0.99, "both": 0.79, "target": 0.9},
        "scaling": {"desiredReplicas": 3},
        "readyReplicas": 2,
        "partition": {"prefillSmShare": 0.6},
        "conditions": [{"type": "MetricsAvailable", "status": "True"}],
    }
    operator_metrics.observe("ns", "svc", status, [{"type": "Scale", "reason": "SLOViolated"}])
    value = operator_metrics.REGISTRY.get_sample_value
    labels = {"namespace": "ns", "llmservice": "svc"}
    assert value("drift_operator_slo_attainment", {**labels, "phase": "both"}) == 0.79
    assert value("drift_operator_slo_attainment_target", labels) == 0.9
    assert value("drift_operator_desired_replicas", labels) == 3
    assert value("drift_operator_prefill_sm_share", labels) == 0.6
    assert value("drift_operator_decisions_total", {**labels, "type": "Scale", "reason": "SLOViolated"}) == 1
    operator_metrics.observe("ns", "svc", {"attainment": {"both": None}}, [])
    assert value("drift_operator_slo_attainment", {**labels, "phase": "both"}) is None
    operator_metrics.forget("ns", "svc")
    assert value("drift_operator_desired_replicas", labels) is None


def test_kopf_run_module_registers_the_handlers() -> None:
    """`kopf run -m drift_operator` imports the package with kopf loaded: that must register everything."""
    import subprocess
    import sys

    code = (
        "import kopf, drift_operator\n"
        "r = kopf.get_default_registry()\n"
        "print(sorted({h.id for h in r._changing.get_all_handlers()} | {h.id for h in r._spawning.get_all_handlers()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "apply_llmservice" in out and "feedback_loop" in out and "on_delete" in out
    light = "import sys, drift_operator.cli, drift_operator.spec; print('kopf' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", light], capture_output=True, text=True, check=True
        ).stdout.strip()
        == "False"
    )


def test_drift_operator_without_credentials_is_one_line_and_logs_once(tmp_path: Any) -> None:
    import subprocess
    import sys

    env = {**os.environ, "KUBECONFIG": str(tmp_path / "missing"), "KUBERNETES_SERVICE_HOST": ""}
    result = subprocess.run(
        [sys.executable, "-m", "drift_agent.cli", "operator", "--standalone", "-n", "x"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("drift operator: no usable Kubernetes credentials"), lines


async def test_a_busy_metrics_port_stops_the_operator_with_one_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    import kopf

    from drift_operator import handlers

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(handlers, "CONFIG", OperatorConfig(metrics_port=port))
        monkeypatch.setattr(handlers, "operator_context", lambda memo: None)
        with pytest.raises(kopf.PermanentError, match=f"cannot serve operator metrics on port {port}"):
            await handlers.configure(settings=kopf.OperatorSettings(), memo=kopf.Memo())
