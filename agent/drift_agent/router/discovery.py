"""Backends from Kubernetes: the ready endpoints of a Service's EndpointSlices, followed live.

`watch_endpoints` lists then watches the `discovery.k8s.io/v1` EndpointSlices of one Service (label
`kubernetes.io/service-name`) and hands the router the full, sorted list of ready backend URLs whenever it
changes: scale-out, scale-in and restarts show up without restarting the router. A pod that is not ready or
is terminating is left out (the endpointslice controller tracks the pods' readiness for us).

Blocking, for a thread of its own; the `kubernetes` client is imported on first use, so the router without
`--discover` does not need it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_GONE = 410
# Each watch request ends after this long and resumes from the last resourceVersion (no re-list): it bounds
# how long `stop` may take to be noticed.
WATCH_TIMEOUT_S = 15
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


def _slice_port(slice_: Mapping[str, Any], port: int | str) -> int | None:
    """The endpoint port of this slice for `port` (a name, or a number as int or digits)."""
    ports = slice_.get("ports")
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        number = int(port)
        # No ports listed (a selector-less or port-less Service): the number stands as given.
        if not ports or any(p.get("port") == number for p in ports):
            return number
        return None
    for entry in ports or []:
        if entry.get("name") == port and entry.get("port") is not None:
            return int(entry["port"])
    return None


def _ready(endpoint: Mapping[str, Any]) -> bool:
    conditions = endpoint.get("conditions") or {}
    # An unset `ready` means ready (the API's documented default); terminating endpoints never are.
    return conditions.get("ready") is not False and conditions.get("terminating") is not True


def _host(address: str, address_type: str | None) -> str:
    return f"[{address}]" if address_type == "IPv6" or ":" in address else address


def ready_urls(slices: Iterable[Mapping[str, Any]], port: int | str) -> list[str]:
    """`http://HOST:PORT` of every ready, non-terminating endpoint in the slices (API JSON, camelCase),
    sorted and without duplicates (a dual-stack Service lists a pod once per address family)."""
    urls: set[str] = set()
    for slice_ in slices:
        number = _slice_port(slice_, port)
        if number is None:
            continue
        address_type = slice_.get("addressType")
        for endpoint in slice_.get("endpoints") or []:
            if not _ready(endpoint):
                continue
            for address in endpoint.get("addresses") or []:
                urls.add(f"http://{_host(address, address_type)}:{number}")
    return sorted(urls)


def _discovery_api() -> Any:
    """A DiscoveryV1Api on in-cluster credentials, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    import kubernetes.client
    import kubernetes.config

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.DiscoveryV1Api(kubernetes.client.ApiClient(configuration))


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


def watch_endpoints(
    namespace: str,
    service: str,
    port: int | str,
    on_change: Callable[[list[str]], None],
    stop: threading.Event | None = None,
    *,
    api: Any = None,
) -> None:
    """Follow the ready backends of `namespace/service` until `stop` is set, calling `on_change` with the
    sorted full URL list after the first list and after every change of it. Never raises for API or network
    errors: it re-lists on 410 Gone and reconnects with exponential backoff otherwise. `api` (a
    DiscoveryV1Api) is for tests; by default one is built from in-cluster config or the kubeconfig."""
    stop = stop or threading.Event()
    selector = f"{SERVICE_NAME_LABEL}={service}"
    slices: dict[str, dict[str, Any]] = {}
    last: list[str] | None = None
    backoff = _BACKOFF_MIN_S

    def publish() -> None:
        nonlocal last
        urls = ready_urls(slices.values(), port)
        if urls == last:
            return
        log.info("%s/%s: %d ready backend(s): %s", namespace, service, len(urls), " ".join(urls) or "-")
        last = urls
        try:
            on_change(list(urls))
        except Exception:  # the consumer's bug must not end discovery
            log.exception("discovery on_change callback failed")

    while not stop.is_set():
        try:
            if api is None:
                api = _discovery_api()
            listed = api.list_namespaced_endpoint_slice(
                namespace, label_selector=selector, _preload_content=False, _request_timeout=30
            )
            body = json.loads(listed.data)
            slices = {item["metadata"]["name"]: item for item in body.get("items") or []}
            version = (body.get("metadata") or {}).get("resourceVersion")
            publish()
            backoff = _BACKOFF_MIN_S
            while not stop.is_set():
                version = _watch_once(api, namespace, selector, version, slices, publish, stop)
        except _Expired:
            log.info("%s/%s: watch expired; listing again", namespace, service)
        except Exception as exc:  # API errors, timeouts, refused connections, bad credentials: all retried
            log.warning("%s/%s: EndpointSlice watch failed (%s); retrying in %.1fs", namespace, service,
                        _describe(exc), backoff)  # fmt: skip
            if api is not None and _status(exc) in (401, 403):
                api = None  # credentials may have rotated (projected service-account tokens do)
            stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_S)


def _watch_once(
    api: Any,
    namespace: str,
    selector: str,
    version: str | None,
    slices: dict[str, dict[str, Any]],
    publish: Callable[[], None],
    stop: threading.Event,
) -> str | None:
    """One watch request from `version`, applied to `slices`; returns the resourceVersion to resume from."""
    import kubernetes.watch

    watcher = kubernetes.watch.Watch()
    try:
        for event in watcher.stream(
            api.list_namespaced_endpoint_slice,
            namespace,
            label_selector=selector,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_S,
            _request_timeout=WATCH_TIMEOUT_S + 15,
        ):
            kind, obj = event.get("type"), event.get("raw_object") or {}
            if kind == "ERROR":
                if obj.get("code") == _GONE:
                    raise _Expired
                raise RuntimeError(f"watch error: {obj.get('message') or obj}")
            meta = obj.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            if kind == "DELETED":
                slices.pop(meta.get("name"), None)
            elif kind in ("ADDED", "MODIFIED"):
                slices[meta["name"]] = obj
            else:  # BOOKMARK: only the version moves
                continue
            publish()
            if stop.is_set():
                break
    except Exception as exc:
        if _status(exc) == _GONE:  # the client raises the 410 itself when its own retry also expired
            raise _Expired from exc
        raise
    finally:
        watcher.stop()
    return version


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    status = _status(exc)
    reason = getattr(exc, "reason", None)
    if status is not None:
        return f"{status} {reason or ''}".strip()
    return f"{type(exc).__name__}: {exc}"[:300]
