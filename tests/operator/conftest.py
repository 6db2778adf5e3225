"""Fixtures for the operator tests: the CRD, a kmock-emulated cluster, fake agents, a running operator."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .fakes import Cluster, FakeAgent

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "serving.drift.dev_llmservices.yaml"


def _import_handlers_with_fast_ticks() -> None:
    """The handlers read their loop period at import: import them now with short ticks (so the end-to-end
    tests take seconds), without leaking the setting into the rest of the session's environment."""
    previous = os.environ.get("DRIFT_OPERATOR_LOOP_INTERVAL")
    os.environ["DRIFT_OPERATOR_LOOP_INTERVAL"] = "0.2"
    try:
        import drift_operator.handlers  # noqa: F401
    finally:
        if previous is None:
            del os.environ["DRIFT_OPERATOR_LOOP_INTERVAL"]
        else:
            os.environ["DRIFT_OPERATOR_LOOP_INTERVAL"] = previous


_import_handlers_with_fast_ticks()


@pytest.fixture(scope="session")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture
def cluster(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """kmock's Kubernetes emulator with our CRD's resource declared, reachable through $KUBECONFIG."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "kmock",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
                "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                "users": [{"name": "kmock", "user": {"token": "test-token"}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return Cluster(kmock)


@pytest.fixture
async def agents() -> AsyncIterator[Callable[..., Any]]:
    """A factory of fake agents, each serving its own port; all stopped at the end."""
    started: list[FakeAgent] = []

    async def make(**kwargs: Any) -> FakeAgent:
        agent = FakeAgent(**kwargs)
        await agent.start()
        started.append(agent)
        return agent

    yield make
    for agent in reversed(started):  # kmock servers must stop in reverse order (they stack DNS interceptors)
        await agent.stop()


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[threading.Thread]:
    """The real operator (handlers, kopf, login through the kubeconfig) in a thread with its own event loop.

    A thread rather than a task: at exit kopf cancels every task created after it started, which in the
    test's own loop would include pytest's fixture finalizers.
    """
    import kopf

    from drift_operator import handlers

    assert handlers.CONFIG.loop_interval_s <= 0.5, "handlers were imported before the test settings"
    stop = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        settings = kopf.OperatorSettings()
        settings.scanning.disabled = True  # the namespace is given explicitly
        try:
            asyncio.run(
                kopf.operator(
                    settings=settings, namespaces=[Cluster.NAMESPACE], standalone=True, stop_flag=stop
                )
            )
        except BaseException as exc:  # surfaced by the assertion below
            failure.append(exc)

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    yield thread
    # Let any just-created LLMService's timer start before stopping: kopf cannot stop a timer spawned
    # after its daemon killer ran, and would then wait 5 s for it.
    await asyncio.sleep(2 * handlers.CONFIG.loop_interval_s)
    stop.set()
    await asyncio.to_thread(thread.join, 15)
    assert not thread.is_alive(), "the operator did not stop"
    assert not failure, failure
