"""kubectl helpers for the end-to-end tests against a real API server (see tests/e2e/conftest.py).

Everything goes through the `kubectl` binary on the PATH and the kubeconfig in $KUBECONFIG (or the one
passed explicitly), the way a user runs the documented commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
GROUP = "serving.drift.dev"
VERSION = "v1alpha1"
CRD_NAME = f"llmservices.{GROUP}"
LLMS = f"llmservices.{GROUP}"  # the resource name for kubectl (unambiguous, unlike the short name)
OPERATOR_NAMESPACE = "drift-system"
OPERATOR_SA = "drift-operator"
KUBECTL_TIMEOUT_S = 60.0

T = TypeVar("T")


class KubectlError(AssertionError):
    """kubectl exited non-zero (an AssertionError, so pytest shows the command and its stderr)."""

    def __init__(self, args: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        self.args_ = list(args)
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(
            f"kubectl {' '.join(args)} exited {result.returncode}:\n{result.stderr.strip() or result.stdout}"
        )


def run_kubectl(
    *args: str,
    stdin: str | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    timeout: float = KUBECTL_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run kubectl and return the completed process, whatever its exit status."""
    env = None
    if kubeconfig is not None:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        ["kubectl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


def kubectl(
    *args: str,
    stdin: str | None = None,
    check: bool = True,
    kubeconfig: str | os.PathLike[str] | None = None,
    timeout: float = KUBECTL_TIMEOUT_S,
) -> str:
    """Run kubectl (relative paths resolve from the repository root) and return its stdout.

    check=True raises KubectlError (an AssertionError carrying returncode/stdout/stderr) on a non-zero exit.
    """
    result = run_kubectl(*args, stdin=stdin, kubeconfig=kubeconfig, timeout=timeout)
    if check and result.returncode != 0:
        raise KubectlError(args, result)
    return result.stdout


def get_json(*args: str, kubeconfig: str | os.PathLike[str] | None = None) -> Any:
    """`kubectl get ARGS -o json`, parsed; None when the object does not exist."""
    result = run_kubectl("get", *args, "-o", "json", kubeconfig=kubeconfig)
    if result.returncode != 0:
        if "NotFound" in result.stderr or "not found" in result.stderr:
            return None
        raise KubectlError(["get", *args, "-o", "json"], result)
    return json.loads(result.stdout)


def get_obj(kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """One object as a dict, or None when it does not exist."""
    args = [kind, name] + (["-n", namespace] if namespace else [])
    return get_json(*args)


def list_items(kind: str, namespace: str, *selectors: str) -> list[dict[str, Any]]:
    """Items of a kind in a namespace (optionally `-l SELECTOR`)."""
    extra = [arg for sel in selectors for arg in ("-l", sel)]
    return list((get_json(kind, "-n", namespace, *extra) or {}).get("items") or [])


def apply(
    objects: Mapping[str, Any] | Sequence[Mapping[str, Any]] | str, namespace: str | None = None
) -> str:
    """`kubectl apply -f -` with dicts (one or a list) or YAML text."""
    if isinstance(objects, str):
        text = objects
    elif isinstance(objects, Mapping):
        text = yaml.safe_dump(dict(objects))
    else:
        text = yaml.safe_dump_all([dict(o) for o in objects])
    return kubectl("apply", *(["-n", namespace] if namespace else []), "-f", "-", stdin=text)


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.25,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    On timeout raise AssertionError with `message` (a string, or a callable evaluated then, e.g. to show the
    operator's log) and the last value seen. An exception from the predicate propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.0f}s: {text}\nlast value: {value!r}")
        time.sleep(interval)


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any] | None:
    """The status condition of that type, or None."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def owned_by(obj: Mapping[str, Any] | None, owner_uid: str) -> bool:
    """Whether obj carries a controller owner reference to owner_uid."""
    refs = ((obj or {}).get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner_uid and r.get("controller") for r in refs)


def cluster_skip_reason() -> str | None:
    """Why the e2e tests cannot run here (None: a reachable API server and kubectl are present)."""
    path = os.environ.get("KUBECONFIG")
    if not path:
        return 'e2e: $KUBECONFIG is unset (start a cluster, e.g. `eval "$(../shared/k8s/start.sh DIR)"`)'
    missing = [p for p in path.split(os.pathsep) if p and not Path(p).is_file()]
    if missing:
        return f"e2e: $KUBECONFIG names missing file(s): {', '.join(missing)}"
    if shutil.which("kubectl") is None:
        return "e2e: kubectl is not on the PATH"
    try:
        result = run_kubectl("get", "--raw", "/readyz", "--request-timeout=5s", timeout=15)
    except subprocess.TimeoutExpired:
        return "e2e: the API server did not answer /readyz within 15 s"
    if result.returncode != 0:
        return f"e2e: the API server is unreachable: {result.stderr.strip()[:300]}"
    return None


def server_version() -> str:
    info = json.loads(kubectl("version", "-o", "json"))
    return str((info.get("serverVersion") or {}).get("gitVersion", "?"))


# --- the operator as a subprocess ---------------------------------------------------------------------------

_START_MARK = "=== e2e: operator start"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d[,.]\d{3}")
# kopf's line for one successful feedback-loop tick of one LLMService (the timer handler in handlers.py).
TICK = r"Timer '[^']+' succeeded"


def drift_command() -> list[str]:
    """How to run the `drift` CLI: the console script when it is on the PATH (pip install -e .)."""
    exe = shutil.which("drift")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from drift_agent.cli import main; sys.exit(main())"]


class OperatorProcess:
    """`drift operator --standalone -n NS...` as a real process, logging to a file.

    start/stop/restart; log_text() (everything, or only since the last start); wait_for_log(pattern).
    """

    def __init__(
        self,
        namespaces: Sequence[str] | None,
        *,
        kubeconfig: str | os.PathLike[str],
        log_path: Path,
        interval: float = 1.0,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.namespaces = list(namespaces) if namespaces is not None else None
        self.kubeconfig = Path(kubeconfig)
        self.log_path = log_path
        self.interval = interval
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def command(self) -> list[str]:
        scope = ["-A"] if self.namespaces is None else [a for ns in self.namespaces for a in ("-n", ns)]
        return [*drift_command(), "operator", "--standalone", *scope, *self.args]

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            # Nothing inherited may change what is tested: in-cluster detection, operator settings.
            if not k.startswith(("KUBERNETES_SERVICE_", "DRIFT_OPERATOR_", "DRIFT_PROMETHEUS_"))
        }
        env.update(
            KUBECONFIG=str(self.kubeconfig),
            DRIFT_OPERATOR_LOOP_INTERVAL=str(self.interval),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def start(self) -> OperatorProcess:
        if self.running:
            raise RuntimeError("the operator is already running")
        self.starts += 1
        with self.log_path.open("a") as log:
            log.write(
                f"{_START_MARK} #{self.starts} at {time.strftime('%H:%M:%S')}: {' '.join(self.command)}\n"
            )
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=ROOT,
                start_new_session=True,  # a Ctrl-C at the terminal is not delivered twice
            )
        return self

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGINT (kopf's graceful shutdown), then SIGKILL after `grace` seconds. Returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        with self.log_path.open("a") as log:
            log.write(f"=== e2e: operator exited with {process.returncode}\n")
        return process.returncode

    def restart(self) -> OperatorProcess:
        self.stop()
        return self.start()

    def log_text(self, since_start: bool = False) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if since_start:
            index = text.rfind(_START_MARK)
            text = text[index:] if index >= 0 else text
        return text

    def log_tail(self, lines: int = 40) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return f"--- operator log ({self.log_path}), last {len(tail)} lines ---\n" + "\n".join(tail)

    def count(self, pattern: str, since_start: bool = True) -> int:
        """Log lines matching the regex. A line logged twice (kopf's handler plus a root handler print
        the same record) counts once: lines are told apart by their millisecond timestamp."""
        seen: set[str] = set()
        for line in self.log_text(since_start=since_start).splitlines():
            if re.search(pattern, line):
                stamp = _TIMESTAMP.search(line)
                seen.add(f"{stamp.group(0)} {pattern}" if stamp else line)
        return len(seen)

    def ticks(self, since_start: bool = True) -> int:
        """Completed feedback-loop ticks (kopf logs one line per LLMService per tick)."""
        return self.count(TICK, since_start)

    def assert_alive(self) -> None:
        if not self.running:
            raise AssertionError(f"the operator exited with {self.returncode}\n{self.log_tail()}")

    def wait_for_log(
        self, pattern: str, count: int = 1, timeout: float = 120.0, since_start: bool = True
    ) -> int:
        """Wait until the regex matches `count` times in the log (since the last start); fail early if
        the process exits."""

        def seen() -> int:
            self.assert_alive()
            return self.count(pattern, since_start) >= count and self.count(pattern, since_start)

        return wait_for(seen, timeout, 0.2, lambda: f"{count}x {pattern!r} in the log\n{self.log_tail()}")


# --- Drift objects ----------------------------------------------------------------------------------------

SAMPLES = ROOT / "manifests" / "samples"


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def llmservice(name: str, namespace: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shipped CPU sample (manifests/samples/llmservice-embedded-cpu.yaml) renamed into `namespace`,
    with `spec` deep-merged over its spec (a None value removes nothing: it is sent as null)."""
    sample = yaml.safe_load((SAMPLES / "llmservice-embedded-cpu.yaml").read_text())
    sample["metadata"] = {"name": name, "namespace": namespace}
    sample["spec"] = _merge(sample.get("spec") or {}, spec or {})
    return sample


def child_names(name: str) -> dict[str, str]:
    """kubectl resource -> the child's name, as docs/operator.md ("What the operator creates") lists them."""
    return {
        "deployment": name,
        "service": name,
        "configmap": f"{name}-engine",
        "secret": f"{name}-admin-token",
    }


def children(name: str, namespace: str) -> dict[str, dict[str, Any] | None]:
    return {kind: get_obj(kind, child, namespace) for kind, child in child_names(name).items()}


def reconciled(name: str, namespace: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(llmservice, children) once the operator has rendered every child (owned by it) and reported a
    Ready condition for the current generation; else None."""
    obj = get_obj(LLMS, name, namespace)
    if obj is None:
        return None
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"].get("generation") or not condition(obj, "Ready"):
        return None
    kids = children(name, namespace)
    uid = obj["metadata"]["uid"]
    if not all(owned_by(child, uid) for child in kids.values()):
        return None
    return obj, {kind: child for kind, child in kids.items() if child is not None}


def events(namespace: str) -> list[dict[str, Any]]:
    return list_items("events", namespace)


def event_keys(namespace: str) -> dict[str, str]:
    """Event name -> resourceVersion: a new Event, or a repeat counted into an old one, changes this."""
    return {e["metadata"]["name"]: e["metadata"]["resourceVersion"] for e in events(namespace)}


def describe_events(items: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"{e.get('type')} {e.get('reason')} {((e.get('involvedObject') or {}).get('kind'))}"
        f"/{(e.get('involvedObject') or {}).get('name')} x{e.get('count') or 1}: {str(e.get('message'))[:160]}"
        for e in items
    ]


def collection_path(api_version: str, plural: str, namespace: str) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{plural}"


class HistoryExpired(Exception):
    """The API server's watch cache no longer reaches back to the requested resourceVersion (410 Gone)."""


def writes_since(collection: str, name: str, resource_version: str) -> list[dict[str, Any]]:
    """Every change to one object after `resource_version`, read back from the API server's watch cache
    (a watch from that version, closed by the server after a second): exact, not sampled."""
    url = (
        f"{collection}?watch=1&resourceVersion={resource_version}"
        f"&fieldSelector=metadata.name%3D{name}&timeoutSeconds=1"
    )
    out = kubectl("get", "--raw", url, timeout=30)
    found = []
    for line in out.splitlines():
        if not line.strip():
            continue
        event = json.loads(line)
        if event.get("type") == "ERROR":
            if (event.get("object") or {}).get("code") == 410:
                raise HistoryExpired(
                    f"{collection}/{name}: no history from resourceVersion {resource_version}"
                )
            raise AssertionError(f"watch from resourceVersion {resource_version} failed: {event}")
        meta = (event.get("object") or {}).get("metadata") or {}
        fields = sorted(meta.get("managedFields") or [], key=lambda m: str(m.get("time")))
        found.append(
            {
                "type": event.get("type"),
                "resourceVersion": meta.get("resourceVersion"),
                # Who wrote last (managedFields times have a one-second resolution: a hint, not proof).
                "manager": fields[-1].get("manager") if fields else None,
            }
        )
    return found
