"""kopf handlers: thin wiring from kopf's lifecycle to `loop.reconcile`.

Importing this module registers the handlers in kopf's default registry (`kopf run -m drift_operator`
imports it through the package).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from prometheus_client import start_http_server

from . import constants as c
from . import operator_metrics
from .agents import AgentClient
from .kube import KubeApiError, KubeClient, load_credentials
from .loop import Context, Outcome, memory_of, publish_status, reconcile
from .settings import OperatorConfig

CONFIG = OperatorConfig.from_env()
_CONTEXT_KEY = "drift_context"


def operator_context(memo: Any) -> Context:
    """The operator-wide Context, kept in kopf's global memo (per-object memos are shallow copies of it,
    so every LLMService shares one set of HTTP sessions)."""
    context = memo.get(_CONTEXT_KEY)
    if context is None:
        context = Context(
            kube=KubeClient(), agents=AgentClient(timeout_s=CONFIG.agent_timeout_s), config=CONFIG
        )
        memo[_CONTEXT_KEY] = context
    return context


async def _publish(ctx: Context, outcome: Outcome, body: Mapping[str, Any], logger: logging.Logger) -> None:
    """Status through our own optimistic-concurrency writer (kopf's handler patch has no resourceVersion
    precondition, so a handler holding a stale body could overwrite newer status), then the events."""
    try:
        await publish_status(ctx, body, outcome)
    except KubeApiError as exc:
        logger.warning("status write failed, retried on the next reconciliation: %s", exc)
    for event in outcome.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:1024])
    if outcome.error:
        # No retry from here: the timer reconciles again on its next tick.
        logger.warning("reconciliation incomplete: %s", outcome.error)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own finalizer and annotation names, rather than kopf's defaults, so it is clear who set them.
    settings.persistence.finalizer = c.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=c.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=c.GROUP, key="last-handled-configuration"
    )
    # kopf would turn every handler log line into an Event; decisions are posted explicitly instead.
    settings.posting.level = logging.WARNING
    if CONFIG.namespaced:  # fixed namespaces: nothing to discover, and no namespace list/watch granted
        settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    operator_context(memo)
    if CONFIG.metrics_port:
        try:
            start_http_server(CONFIG.metrics_port, registry=operator_metrics.REGISTRY)
        except OSError as exc:  # e.g. the port is taken: retrying cannot help, so stop with one clear line
            raise kopf.PermanentError(
                f"cannot serve operator metrics on port {CONFIG.metrics_port}: {exc.strerror or exc}"
            ) from None


@kopf.on.login()
async def login(memo: kopf.Memo, **_: Any) -> kopf.ConnectionInfo:
    try:
        creds = await asyncio.to_thread(load_credentials)
    except Exception as exc:  # the kubernetes loaders raise several unrelated types
        raise kopf.LoginError(f"no usable Kubernetes credentials (in-cluster or kubeconfig): {exc}") from exc
    await operator_context(memo).kube.set_credentials(creds)
    return kopf.ConnectionInfo(
        server=creds.server,
        ca_path=creds.ca_path,
        insecure=creds.insecure,
        username=creds.username,
        password=creds.password,
        scheme=creds.scheme,
        token=creds.token,
        certificate_path=creds.cert_path,
        private_key_path=creds.key_path,
    )


@kopf.on.cleanup()
async def close_clients(memo: kopf.Memo, **_: Any) -> None:
    context = memo.get(_CONTEXT_KEY)
    if context is not None:
        await context.kube.close()
        await context.agents.close()


@kopf.on.resume(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.create(c.GROUP, c.VERSION, c.PLURAL)
@kopf.on.update(c.GROUP, c.VERSION, c.PLURAL)
async def apply_llmservice(body: kopf.Body, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    """Render and converge the children whenever the spec changes (and once when the operator starts)."""
    context = operator_context(memo)
    memory = memory_of(memo)
    async with memory.lock:
        outcome = await reconcile(context, body, memory, run_loop=False)
        await _publish(context, outcome, body, logger)


@kopf.timer(
    c.GROUP, c.VERSION, c.PLURAL, interval=CONFIG.loop_interval_s, initial_delay=CONFIG.loop_interval_s
)
async def feedback_loop(
    body: kopf.Body,
    memo: kopf.Memo,
    logger: logging.Logger,
    stopped: kopf.DaemonStopped,
    **_: Any,
) -> None:
    """The SLO loop: restore drifted children, read attainment, decide replicas and partition."""
    context = operator_context(memo)
    memory = memory_of(memo)

    async def run_tick() -> Outcome:
        async with memory.lock:
            outcome = await reconcile(context, body, memory, run_loop=True)
            await _publish(context, outcome, body, logger)
            return outcome

    tick = asyncio.ensure_future(run_tick())
    stop = asyncio.ensure_future(stopped.wait())
    # kopf never cancels a timer on exit: abandon an in-flight tick ourselves so shutdown is prompt.
    await asyncio.wait({tick, stop}, return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if not tick.done():
        tick.cancel()
        return
    outcome = tick.result()
    operator_metrics.observe(
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        {**outcome.status, "conditions": [vars(cond) for cond in outcome.conditions]},
        outcome.decisions,
    )


@kopf.on.delete(c.GROUP, c.VERSION, c.PLURAL, optional=True)
async def on_delete(name: str, namespace: str, logger: logging.Logger, **_: Any) -> None:
    # Children carry a controller owner reference: the garbage collector removes them.
    operator_metrics.forget(namespace, name)
    logger.info("LLMService %s/%s deleted; children are garbage-collected", namespace, name)


@kopf.on.probe(id="now")
def probe_time(**_: Any) -> str:
    return dt.datetime.now(tz=dt.timezone.utc).isoformat()
