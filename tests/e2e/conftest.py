"""Fixtures for the end-to-end tests against a real Kubernetes control plane.

The cluster comes from $KUBECONFIG (CI: `.ci/run` starts ../shared/k8s, a real kube-apiserver,
kube-controller-manager and etcd, with no kubelet or scheduler, so pods stay Pending). Without a reachable
API server every test here is skipped with the reason.

- `installed` (session): the documented install, `kubectl apply -f crds/`, CRD Established,
  `kubectl apply -k manifests/`; returns an `Install` (apply outputs, the CRD's creation time).
- `namespace` (function): a fresh namespace with the drift-operator-secrets RoleBinding the docs prescribe
  for every managed namespace; `namespace_factory(prefix=..., secrets_rolebinding=True)` makes more.
- `sa_kubeconfig` (session): a kubeconfig holding a token of the drift-operator ServiceAccount, so the
  operator runs with the shipped RBAC only.
- `operator` (function, factory): `operator(namespaces, *, interval=1.0, env=None, args=(), kubeconfig=None)`
  starts `drift operator --standalone -n NS...` (namespaces=None: `-A`) as that ServiceAccount and returns
  an `OperatorProcess` (`stop()`, `restart()`, `log_text()`, `wait_for_log()`); all are stopped at teardown.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from .kube import (
    CRD_NAME,
    LLMS,
    OPERATOR_NAMESPACE,
    OPERATOR_SA,
    OperatorProcess,
    cluster_skip_reason,
    get_obj,
    kubectl,
    run_kubectl,
)

E2E_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Every test under tests/e2e is an e2e test (`-m "not e2e"` deselects them all).
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@dataclass(frozen=True)
class Cluster:
    kubeconfig: Path
    server_version: str


@pytest.fixture(scope="session")
def cluster() -> Cluster:
    """The API server in $KUBECONFIG; skips every e2e test, with the reason, when there is none."""
    reason = cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    version = json.loads(kubectl("version", "-o", "json")).get("serverVersion", {}).get("gitVersion", "?")
    return Cluster(Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]), version)


@pytest.fixture(autouse=True)
def _requires_cluster(cluster: Cluster, installed: Install) -> None:
    """Autouse: no e2e test runs without a cluster, and the install happens before the first one, so
    the CRD is as old as possible when a test relies on the garbage collector knowing its kind."""


@dataclass
class Install:
    crd_created_at: float  # epoch seconds, from the CRD's creationTimestamp
    outputs: dict[str, str] = field(default_factory=dict)  # command -> kubectl's stdout

    def crd_age(self) -> float:
        return time.time() - self.crd_created_at


@pytest.fixture(scope="session")
def installed(cluster: Cluster) -> Install:
    """Install exactly as docs/operator.md says: the CRD, then the default kustomization (CRD again,
    drift-system, the operator Deployment whose pods stay Pending here, its ServiceAccount and RBAC)."""
    outputs = {"kubectl apply -f crds/": kubectl("apply", "-f", "crds/")}
    kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    outputs["kubectl apply -k manifests/"] = kubectl("apply", "-k", "manifests/")
    crd = get_obj("crd", CRD_NAME)
    assert crd is not None, "the CRD vanished after kubectl apply"
    created = calendar.timegm(time.strptime(crd["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ"))
    return Install(crd_created_at=float(created), outputs=outputs)


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "t"


def _delete_namespace(name: str) -> None:
    """Delete a test namespace without hanging on the operator's finalizer (the operator may be stopped
    already): delete the LLMServices, strip the finalizer of any that remain, then the namespace."""
    run_kubectl("delete", LLMS, "--all", "-n", name, "--wait=false")
    remaining = run_kubectl("get", LLMS, "-n", name, "-o", "name").stdout.split()
    for obj in remaining:
        run_kubectl("patch", obj, "-n", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    run_kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def namespace_factory(installed: Install, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """make(prefix=None, secrets_rolebinding=True) -> a new namespace, deleted after the test (set
    DRIFT_E2E_KEEP=1 to keep it). With secrets_rolebinding, it gets the RoleBinding the docs prescribe for
    each namespace with LLMServices: drift-operator-secrets -> ServiceAccount drift-system:drift-operator."""
    made: list[str] = []

    def make(prefix: str | None = None, secrets_rolebinding: bool = True) -> str:
        base = _slug(prefix or request.node.name, 36)
        name = f"e2e-{base}-{uuid.uuid4().hex[:5]}"
        kubectl("create", "namespace", name)
        made.append(name)
        kubectl("label", "namespace", name, "drift.dev/e2e=true")
        if secrets_rolebinding:
            kubectl(
                "create", "rolebinding", "drift-operator-secrets", "-n", name,
                "--clusterrole=drift-operator-secrets", f"--serviceaccount={OPERATOR_NAMESPACE}:{OPERATOR_SA}",
            )  # fmt: skip
        return name

    yield make
    if os.environ.get("DRIFT_E2E_KEEP") != "1":
        for name in made:
            _delete_namespace(name)


@pytest.fixture
def namespace(namespace_factory: Callable[..., str]) -> str:
    """A fresh namespace, with the drift-operator-secrets RoleBinding, for this test only."""
    return namespace_factory()


@pytest.fixture(scope="session")
def sa_kubeconfig(installed: Install, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig for the drift-operator ServiceAccount (a 2 h token) on the admin kubeconfig's
    server and CA: whoever uses it has exactly the shipped RBAC."""
    token = kubectl(
        "create", "token", OPERATOR_SA, "-n", OPERATOR_NAMESPACE, "--duration=2h"
    ).strip()  # fmt: skip
    view = json.loads(kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json"))
    server = view["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": server}],
        "users": [{"name": OPERATOR_SA, "user": {"token": token}}],
        "contexts": [{"name": OPERATOR_SA, "context": {"cluster": "e2e", "user": OPERATOR_SA}}],
        "current-context": OPERATOR_SA,
    }
    path = tmp_path_factory.mktemp("sa") / "drift-operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    whoami = kubectl("auth", "whoami", "-o", "json", kubeconfig=path)
    user = json.loads(whoami)["status"]["userInfo"]["username"]
    assert user == f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SA}", whoami
    return path


@pytest.fixture
def operator(sa_kubeconfig: Path, tmp_path: Path) -> Iterator[Callable[..., OperatorProcess]]:
    """start(namespaces, *, interval=1.0, env=None, args=(), kubeconfig=None) -> a running OperatorProcess:
    `drift operator --standalone -n NS...` (namespaces: one name, several, or None for -A) as the
    drift-operator ServiceAccount (or `kubeconfig`), DRIFT_OPERATOR_LOOP_INTERVAL=interval, plus `env`;
    output in tmp_path/operator-N.log. Every operator started is stopped at teardown (SIGINT, then KILL)."""
    started: list[OperatorProcess] = []

    def start(
        namespaces: str | Sequence[str] | None,
        *,
        interval: float = 1.0,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        kubeconfig: str | os.PathLike[str] | None = None,
    ) -> OperatorProcess:
        scope = [namespaces] if isinstance(namespaces, str) else namespaces
        proc = OperatorProcess(
            scope,
            kubeconfig=kubeconfig or sa_kubeconfig,
            log_path=tmp_path / f"operator-{len(started) + 1}.log",
            interval=interval,
            env=env,
            args=args,
        )
        started.append(proc)
        print(f"operator log: {proc.log_path}")
        return proc.start()

    yield start
    for proc in reversed(started):
        proc.stop()
