"""Prometheus metrics: vLLM's names (so autoscalers and routers work unchanged) plus Drift's SLO, partition
and policy gauges. One `CollectorRegistry` per app, never the global one, so one process can run several apps.

Latency histograms are observed on the engine thread right after each step (a step hook), where the engine's
timestamps are exact; gauges are read from the engine's stats snapshot at scrape time. `drift_engine_up` is 0
once the engine loop has died; the snapshot then stops changing, so the gauges read from it are not left
frozen: running and waiting requests read 0 (the dead loop failed every open request) and the gauges of the
live KV pool and steps are omitted. Counters keep their last values, as counters must.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..core.config import POLICIES, EngineConfig
from ..engine.async_engine import AsyncLLMEngine
from ..engine.outputs import RequestOutput
from .gpu_metrics import GpuCollector
from .slo import PHASES, SloOutcome, SloWindow, classify

# vLLM's buckets, with finer low ITL buckets for fast GPUs.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]  # fmt: skip
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
MULTIPLEX_POLICIES = ("static-split", "drift")
# Configured partition settings exported by `drift_partition_config{setting}` (what the operator pushes and
# compares; the per-step split the dispatcher decides is `drift_partition_sm_share`).
PARTITION_SETTINGS = ("prefill_sm_share", "tpot_margin", "fold_max_tokens")
FINISH_REASONS = ("stop", "length", "abort")


def token_buckets(max_value: int) -> list[float]:
    """1-2-5 buckets up to `max_value` (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exp
            if v > max_value:
                return out
            out.append(float(v))
        exp += 1


def partition_shares(
    config: EngineConfig,
    decided: tuple[int, int] | None = None,
    realized: tuple[int, int] | None = None,
    total_sms: int | None = None,
) -> tuple[float, float]:
    """(prefill, decode) fraction of the GPU's SMs each phase may use right now.

    Sequential policies time-share the whole GPU: both phases may use every SM (1.0 each). A multiplexing
    policy reports, best first: the SMs its partitioner really gives each phase under the current split (a
    shared partitioner gives a running phase the whole device), the split its dispatcher chose, the configured
    static share; before any of these exists nothing is carved out (1.0 each).
    """
    if config.policy not in MULTIPLEX_POLICIES:
        return 1.0, 1.0
    if realized is not None and total_sms:
        return min(realized[0] / total_sms, 1.0), min(realized[1] / total_sms, 1.0)
    if decided is not None and sum(decided) > 0:
        return decided[0] / sum(decided), decided[1] / sum(decided)
    if config.policy == "static-split" or config.partition.mode == "static":
        share = config.partition.prefill_sm_share
        return share, 1.0 - share
    return 1.0, 1.0


def live_partition(stats: Any) -> tuple[tuple[int, int] | None, tuple[int, int] | None, int | None]:
    """(split the multiplexing policy chose last, SMs the partitioner realises for it, SMs in total) from the
    engine's stats snapshot; None where the engine has none (yet)."""
    return stats.split, stats.realized_split, stats.total_sms


# Distinct client label values at most (clients choose their id: unbounded labels would exhaust the scrape).
MAX_CLIENT_LABELS = 100


class ServerMetrics:
    def __init__(
        self, async_engine: AsyncLLMEngine, model_name: str, slo_window_s: float, gpu: bool = True
    ) -> None:
        self.async_engine = async_engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.window = SloWindow(slo_window_s)
        self.draining = False
        r, lab = self.registry, ["model_name"]
        max_len = int(getattr(async_engine.engine, "max_model_len", 4096))

        def hist(name: str, doc: str, buckets: list[float]) -> Any:
            return Histogram(name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Time to first token (arrival to first token)", TTFT_BUCKETS
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds",
            "Time between consecutive output steps of a request",
            ITL_BUCKETS,
        )
        self.tpot = hist(
            "vllm:time_per_output_token_seconds",
            "Mean time per output token of a finished request: (finish - first token) / (output tokens - 1)",
            ITL_BUCKETS,
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds", "Arrival to finish of a finished request", REQUEST_BUCKETS
        )
        self.queue_time = hist(
            "vllm:request_queue_time_seconds", "Arrival to first scheduling", REQUEST_BUCKETS
        )
        self.prefill_time = hist(
            "vllm:request_prefill_time_seconds", "First scheduling to first token", REQUEST_BUCKETS
        )
        self.decode_time = hist("vllm:request_decode_time_seconds", "First token to finish", REQUEST_BUCKETS)
        self.inference_time = hist(
            "vllm:request_inference_time_seconds", "First scheduling to finish", REQUEST_BUCKETS
        )
        self.req_prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Prompt length of finished requests", token_buckets(max_len)
        )
        self.req_gen_tokens = hist(
            "vllm:request_generation_tokens", "Output length of finished requests", token_buckets(max_len)
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens",
            "Prompt tokens of requests that started decoding (cached included)",
            lab,
            registry=r,
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Output tokens generated", lab, registry=r
        ).labels(model_name)
        self.success = Counter(
            "vllm:request_success", "Requests ended, by finish reason", [*lab, "finished_reason"], registry=r
        )
        for reason in FINISH_REASONS:
            self.success.labels(model_name, reason)
        self.slo_requests = Counter(
            "drift_slo_requests",
            "Requests classified against their SLO, per phase (ttft, tpot, both) and outcome (met, missed)",
            ["phase", "outcome"],
            registry=r,
        )
        for phase in PHASES:
            for outcome in ("met", "missed"):
                self.slo_requests.labels(phase, outcome)
        self.client_served = Counter(
            "drift_client_served_tokens",
            "Tokens served per client (x-client-id header or API key index): prompt tokens when the first "
            f"token comes, then every output token; the first {MAX_CLIENT_LABELS} clients, then 'other'",
            ["client"],
            registry=r,
        )
        self._client_labels: dict[str, Any] = {}  # engine thread only: client -> its bound counter
        r.register(_StateCollector(self))
        if gpu:
            r.register(GpuCollector())
        # Engine thread only: request id -> time of its previous output step (for inter-token latency).
        self._last_step: dict[str, float] = {}
        self._lock = threading.Lock()

    # ---- engine thread ----------------------------------------------------------------------------------
    def on_step(self, engine: Any, outputs: list[RequestOutput]) -> None:
        """Step hook: token counters and per-step latencies, with the engine's own timestamps."""
        for out in outputs:
            n_new = len(out.delta_token_ids)
            t = out.times
            if n_new:
                self.generation_tokens.inc(n_new)
                served = n_new + (out.num_prompt_tokens if out.num_output_tokens == n_new else 0)
                self._client_counter(out.slo.client).inc(served)
                if (
                    out.num_output_tokens == n_new and t.first_token is not None
                ):  # this step made the first token
                    self.prompt_tokens.inc(out.num_prompt_tokens)
                    self.ttft.observe(t.first_token - t.arrival)
                    if t.first_scheduled is not None:
                        self.queue_time.observe(t.first_scheduled - t.arrival)
                        self.prefill_time.observe(t.first_token - t.first_scheduled)
                elif out.request_id in self._last_step and t.last_token is not None:
                    self.itl.observe(t.last_token - self._last_step[out.request_id])
                if t.last_token is not None:
                    self._last_step[out.request_id] = t.last_token
            if out.finished:
                self._last_step.pop(out.request_id, None)
                self._observe_finished(out)
        # Aborted requests never report a final output: drop their entries against the engine's live set.
        live = getattr(engine, "requests", None)
        if live is not None and len(self._last_step) > 2 * len(live) + 64:
            for rid in [rid for rid in self._last_step if rid not in live]:
                del self._last_step[rid]

    def _client_counter(self, client: str) -> Any:
        counter = self._client_labels.get(client)
        if counter is None:
            if len(self._client_labels) >= MAX_CLIENT_LABELS:  # not remembered: the map stays bounded too
                return self.client_served.labels("other")
            counter = self._client_labels[client] = self.client_served.labels(client or "anonymous")
        return counter

    def _observe_finished(self, out: RequestOutput) -> None:
        t = out.times
        if out.finish_reason not in ("stop", "length") or t.finished is None:  # aborted or failed
            return
        self.e2e.observe(t.finished - t.arrival)
        self.req_prompt_tokens.observe(out.num_prompt_tokens)
        self.req_gen_tokens.observe(out.num_output_tokens)
        if t.first_token is not None:
            self.decode_time.observe(t.finished - t.first_token)
            if out.num_output_tokens > 1:
                self.tpot.observe((t.finished - t.first_token) / (out.num_output_tokens - 1))
        if t.first_scheduled is not None:
            self.inference_time.observe(t.finished - t.first_scheduled)

    # ---- event loop -----------------------------------------------------------------------------------
    def on_request_end(
        self,
        out: RequestOutput | None,
        slo: Any,
        times: Any,
        num_output_tokens: int,
        aborted: bool,
        now: float,
    ) -> SloOutcome:
        """Count the finish reason and classify the request against its SLO."""
        reason = "abort" if aborted or out is None else (out.finish_reason or "stop")
        if reason in FINISH_REASONS:
            self.success.labels(self.model_name, reason).inc()
        outcome = classify(slo, times, num_output_tokens, aborted=aborted or reason == "abort", now=now)
        for phase, met in outcome.items():
            self.slo_requests.labels(phase, "met" if met else "missed").inc()
        self.window.record(outcome, now)
        return outcome

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges and counters read at scrape time from the engine's stats snapshot and configuration."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list:
        return []

    @staticmethod
    def _kv_tiers(stats: Any, name: str, dead: bool, gauge: Any, counter: Any) -> Iterator[Any]:
        """The host KV tier, swap preemption and the copies between the tiers."""
        yield gauge(
            "drift_host_kv_cache_blocks_total", "Blocks in the host KV tier", stats.num_host_kv_blocks
        )
        if not dead:
            yield gauge(
                "drift_host_kv_cache_blocks_free",
                "Free blocks in the host KV tier (cached prefixes count as free)",
                stats.num_free_host_kv_blocks,
            )
            yield gauge(
                "drift_num_requests_swapped",
                "Preempted requests whose KV is in the host tier or on its way back",
                stats.num_swapped,
            )
        yield counter(
            "drift_prefix_cache_host_hits",
            "Prompt tokens found in the host KV tier (copied back instead of recomputed)",
            stats.prefix_cache_host_hits,
        )
        yield counter(
            "drift_swap_preemptions", "Preemptions that swapped the KV out", stats.num_swap_preemptions
        )
        yield counter(
            "drift_fairness_preemptions",
            "Preemptions for a waiting request of an under-served client (fairness vtc)",
            stats.num_fairness_preemptions,
        )
        yield counter(
            "drift_recomputed_tokens",
            "Tokens whose KV was computed again after a recompute preemption",
            stats.recomputed_tokens,
        )
        moved = CounterMetricFamily(
            "drift_kv_blocks_moved",
            "KV blocks moved between the tiers, by reason: demoted (cached blocks the pool let go), promoted "
            "(host prefix hits), swapped_out, swapped_in, reused (a swap found the block in the other tier)",
            labels=["model_name", "reason"],
        )
        for reason, n in sorted(stats.kv_blocks_moved.items()):
            moved.add_metric([name, reason], n)
        yield moved
        families = (
            ("drift_kv_copies", "Copies between the tiers (runs of contiguous blocks)", stats.kv_copies),
            ("drift_kv_copy_bytes", "Bytes copied between the tiers", stats.kv_copy_bytes),
            ("drift_kv_copy_seconds", "Seconds spent copying between the tiers", stats.kv_copy_seconds),
        )
        for metric, doc, values in families:
            family = CounterMetricFamily(
                metric,
                f"{doc}; direction out: device to host, in: host to device",
                labels=["model_name", "direction"],
            )
            for direction in ("out", "in"):
                family.add_metric([name, direction], values.get(direction, 0))
            yield family

    def collect(self) -> Iterator[Any]:
        m, name = self.m, self.m.model_name
        stats = m.async_engine.stats()
        dead = m.async_engine.is_dead

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(metric, doc, labels=["model_name"])
            g.add_metric([name], value)
            return g

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(metric, doc, labels=["model_name"])
            c.add_metric([name], value)
            return c

        yield gauge(
            "drift_engine_up",
            "1 while the engine loop runs; 0 before it starts and once it has died (then /health is 503)",
            float(m.async_engine.is_running),
        )
        yield gauge(
            "vllm:num_requests_running", "Requests in the running batch", 0 if dead else stats.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled",
            0 if dead else stats.num_waiting,
        )
        if not dead:
            yield gauge(
                "vllm:kv_cache_usage_perc", "KV cache usage (fraction of blocks held, 0..1)", stats.kv_usage
            )
            yield gauge(
                "vllm:gpu_cache_usage_perc",
                "KV cache usage (0..1); the pre-V1 name of kv_cache_usage_perc",
                stats.kv_usage,
            )
        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            stats.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits
        )
        yield counter(
            "vllm:num_preemptions", "Preemptions of running requests (KV pool full)", stats.num_preemptions
        )
        yield gauge("drift_kv_cache_blocks_total", "Blocks in the KV pool", stats.num_kv_blocks)
        if not dead:
            yield gauge(
                "drift_kv_cache_blocks_free",
                "Free blocks in the KV pool (cached prefixes count as free)",
                stats.num_free_kv_blocks,
            )
        yield from self._kv_tiers(stats, name, dead, gauge, counter)
        yield counter(
            "drift_prompt_tokens_computed",
            "Prompt tokens run through the model (cache hits excluded)",
            stats.prompt_tokens,
        )

        now = time.monotonic()
        window = m.window.attainment(now)
        att = GaugeMetricFamily(
            "drift_slo_attainment",
            f"Fraction of requests meeting their SLO over the last {m.window.window_s:g} s (1 when none)",
            labels=["phase"],
        )
        cnt = GaugeMetricFamily(
            "drift_slo_window_requests", "Requests classified in the attainment window", labels=["phase"]
        )
        for phase in PHASES:
            att.add_metric([phase], window[phase][0])
            cnt.add_metric([phase], window[phase][1])
        yield att
        yield cnt

        engine = m.async_engine.engine
        config: EngineConfig = engine.config
        targets = GaugeMetricFamily(
            "drift_slo_target_seconds", "Default SLO targets of the server", labels=["phase"]
        )
        default = config.default_slo
        targets.add_metric(["ttft"], default.ttft)
        targets.add_metric(["tpot"], default.tpot)
        yield targets
        stats = m.async_engine.stats()
        prefill, decode = partition_shares(config, *live_partition(stats))
        part = GaugeMetricFamily(
            "drift_partition_sm_share",
            "Fraction of the GPU's SMs each phase may use at the current step: the split the dispatcher "
            "decided last, as the partitioner realises it (1 each when time-shared); configured settings "
            "are drift_partition_config",
            labels=["phase"],
        )
        part.add_metric(["prefill"], prefill)
        part.add_metric(["decode"], decode)
        yield part
        configured = GaugeMetricFamily(
            "drift_partition_config",
            "Configured partition settings (engine config, as set by flags, YAML or PUT /admin/policy)",
            labels=["setting"],
        )
        for setting in PARTITION_SETTINGS:
            configured.add_metric([setting], float(getattr(config.partition, setting)))
        yield configured
        decisions = CounterMetricFamily(
            "drift_scheduler_decisions",
            "Dispatcher decisions of the multiplexing policy, by mode",
            labels=["mode"],
        )
        for mode, n in sorted(stats.decisions.items()):
            decisions.add_metric([mode], n)
        yield decisions
        for name, value, doc in (
            ("drift_step_predicted_seconds", stats.predicted_step_s, "Predicted latency of the latest step"),
            ("drift_step_actual_seconds", stats.actual_step_s, "Measured latency of the latest step"),
        ):
            if value is not None and not dead:
                g = GaugeMetricFamily(name, doc)
                g.add_metric([], value)
                yield g
        info = GaugeMetricFamily(
            "drift_policy_info", "The configured scheduling policy (1) and the others (0)", labels=["policy"]
        )
        for policy in POLICIES:
            info.add_metric([policy], 1.0 if policy == config.policy else 0.0)
        yield info
        yield GaugeMetricFamily(
            "drift_server_draining", "1 while the server drains for shutdown", value=float(m.draining)
        )
