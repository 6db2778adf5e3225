"""A simulation setup (hardware, performance model, engine settings, cluster layout) and its runs: one rate, a
list of rates, or the bench's bisection sweep, producing the same result document as `drift bench serve`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..bench.metrics import GoodputTargets, summarize
from ..bench.results import make_result, make_run
from ..bench.sweep import Bisection, SweepResult
from ..bench.workloads import RequestSpec
from ..multiplex.devices import lookup_device
from ..multiplex.perf_model import FittedPerfModel, PerfModel
from ..multiplex.schema import load_profile
from ..partition.base import Split
from ..partition.splits import candidate_splits
from .cluster import Cluster, ClusterConfig
from .instance import InstanceConfig
from .presets import Hardware, device_preset, device_splits, model_preset, split_constraints
from .requests import SimRun


@dataclass(frozen=True)
class SimSetup:
    """Everything a run needs besides the workload. Build one with `SimSetup.build`."""

    perf: PerfModel
    splits: tuple[Split, ...]
    instance: InstanceConfig
    cluster: ClusterConfig
    kv_bytes_per_token: int
    tp: int = 1
    hardware_label: str = ""
    perf_source: str = ""

    @classmethod
    def build(
        cls,
        model: str = "llama-3-8b",
        device: str = "h100",
        tp: int = 1,
        *,
        profile_path: str | Path | None = None,
        profile_model: str | None = None,
        policy: str = "chunked",
        block_size: int = InstanceConfig.block_size,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_seqs: int = InstanceConfig.max_num_seqs,
        max_num_batched_tokens: int = InstanceConfig.max_num_batched_tokens,
        max_model_len: int = 32768,
        enable_prefix_caching: bool = False,
        prefill_sm_share: float = InstanceConfig.prefill_sm_share,
        fold_max_tokens: int = InstanceConfig.fold_max_tokens,
        tpot_margin: float = InstanceConfig.tpot_margin,
        model_error: float = 1.0,
        slo_ttft_ms: float = InstanceConfig.slo_ttft_ms,
        slo_tpot_ms: float = InstanceConfig.slo_tpot_ms,
        fairness: str = InstanceConfig.fairness,
        fairness_preempt_gap: float = InstanceConfig.fairness_preempt_gap,
        swap_space_gb: float = InstanceConfig.swap_space_gb,
        preemption_mode: str = InstanceConfig.preemption_mode,
        host_bw: float | None = None,
        host_prefix_cache: bool = InstanceConfig.host_prefix_cache,
        cluster: ClusterConfig | None = None,
    ) -> SimSetup:
        """From the built-in presets; with `profile_path`, step latencies come from that measured profile
        (`drift profile` output) instead of the roofline model, and the preset still sizes the KV pool.
        `model_error`: the simulated device takes that many times the model's latencies (see
        `executor.ScaledDevice`). `swap_space_gb`: a host KV tier of that many GiB per GPU, over the device's
        host link (`host_bw` bytes/s one way per GPU; default the preset's PCIe figure)."""
        hw = Hardware(model_preset(model), device_preset(device), tp)
        perf: PerfModel = hw.perf_model()
        splits = device_splits(hw.gpu)
        source = f"analytic roofline ({hw.label})"
        if profile_path is not None:
            prof = load_profile(profile_path, model=profile_model)
            if prof.num_layers != hw.model.shape.num_layers:
                raise ValueError(
                    f"{profile_path}: the profile has {prof.num_layers} layers, {model} has "
                    f"{hw.model.shape.num_layers}"
                )
            perf = FittedPerfModel(prof)
            spec = lookup_device(prof.device)
            min_size, align = split_constraints(spec) if spec is not None else (4, 2)
            splits = candidate_splits(prof.total_sms, min_size, align)
            source = f"profile {profile_path} ({'/'.join(prof.key)})"
        blocks = num_kv_blocks or hw.kv_blocks(block_size, max_num_batched_tokens, gpu_memory_utilization)
        instance = InstanceConfig(
            policy=policy,
            block_size=block_size,
            num_kv_blocks=blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=min(max_model_len, blocks * block_size),
            enable_prefix_caching=enable_prefix_caching,
            prefill_sm_share=prefill_sm_share,
            fold_max_tokens=fold_max_tokens,
            tpot_margin=tpot_margin,
            model_error=model_error,
            slo_ttft_ms=slo_ttft_ms,
            slo_tpot_ms=slo_tpot_ms,
            fairness=fairness,
            fairness_preempt_gap=fairness_preempt_gap,
            swap_space_gb=swap_space_gb,
            preemption_mode=preemption_mode,
            host_bw=host_bw if host_bw is not None else hw.gpu.host_bw,
            host_prefix_cache=host_prefix_cache,
        )
        return cls(
            perf=perf,
            splits=tuple(splits),
            instance=instance,
            cluster=cluster or ClusterConfig(),
            kv_bytes_per_token=hw.model.shape.kv_bytes_per_token,
            tp=tp,
            hardware_label=hw.label,
            perf_source=source,
        )

    # ---- variations ---------------------------------------------------------------------------------------
    def with_policy(self, policy: str) -> SimSetup:
        return dataclasses.replace(self, instance=dataclasses.replace(self.instance, policy=policy))

    def with_instance(self, **changes: Any) -> SimSetup:
        return dataclasses.replace(self, instance=dataclasses.replace(self.instance, **changes))

    def with_cluster(self, **changes: Any) -> SimSetup:
        return dataclasses.replace(self, cluster=dataclasses.replace(self.cluster, **changes))

    @property
    def gpus(self) -> int:
        return self.cluster.num_instances * self.tp

    @property
    def label(self) -> str:
        c = self.cluster
        layout = (
            f"disagg P{c.disaggregated[0]}:D{c.disaggregated[1]}"
            if c.disaggregated
            else f"{c.instances}x {c.router}"
            if c.instances > 1
            else "1 instance"
        )
        mig = " +migration" if c.migration and not c.disaggregated else ""
        return f"sim {self.instance.policy} ({layout}{mig})"

    def describe(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "simulated": True,
            "hardware": self.hardware_label,
            "perf_model": self.perf_source,
            "tp": self.tp,
            "gpus": self.gpus,
            "instance": dataclasses.asdict(self.instance),
            "splits": [s.label for s in self.splits],
            "layout": "disaggregated" if c.disaggregated else "colocated",
            "instances": c.num_instances,
            "disaggregated": list(c.disaggregated) if c.disaggregated else None,
            "router": c.router,
            "kv_bandwidth_gbps": c.kv_bandwidth / 1e9,
            "migration": dataclasses.asdict(c.migration) if c.migration else None,
        }

    # ---- runs ----------------------------------------------------------------------------------------------
    def cluster_for_run(self) -> Cluster:
        return Cluster(
            self.perf,
            list(self.splits),
            self.instance,
            self.cluster,
            kv_bytes_per_token=self.kv_bytes_per_token,
            tp=self.tp,
        )

    def run(
        self,
        specs: Sequence[RequestSpec],
        rate: float,
        *,
        burstiness: float = 1.0,
        seed: int = 0,
        slo: GoodputTargets | None = None,
        prefix_len: int = 0,
        max_concurrency: int | None = None,
    ) -> SimRun:
        return self.cluster_for_run().run(
            specs,
            rate,
            burstiness=burstiness,
            seed=seed,
            slo=slo,
            prefix_len=prefix_len,
            max_concurrency=max_concurrency,
        )


@dataclass
class RatePoint:
    """One simulated rate, summarised like a `drift bench serve` run."""

    rate: float
    run: SimRun
    summary: dict[str, Any]

    def to_run(self, with_requests: bool = False) -> dict[str, Any]:
        requests = [r.to_dict() for r in self.run.records] if with_requests else None
        out = make_run(self.rate, self.summary, requests)
        out["sim_stats"] = self.run.stats | {"wall_s": self.run.wall_s}
        return out


@dataclass(frozen=True)
class LoadSpec:
    """The traffic and the metrics, as `drift bench serve` takes them."""

    burstiness: float = 1.0
    seed: int = 0
    slo: GoodputTargets = dataclasses.field(default_factory=GoodputTargets)
    percentiles: tuple[float, ...] = (50.0, 90.0, 99.0)
    prefix_len: int = 0
    max_concurrency: int | None = None


def simulate_rate(setup: SimSetup, specs: Sequence[RequestSpec], rate: float, load: LoadSpec) -> RatePoint:
    run = setup.run(
        specs,
        rate,
        burstiness=load.burstiness,
        seed=load.seed,
        slo=load.slo or None,
        prefix_len=load.prefix_len,
        max_concurrency=load.max_concurrency,
    )
    summary = summarize(run.records, run.duration_s, load.slo or None, load.percentiles)
    return RatePoint(rate, run, summary)


def simulate_sweep(
    setup: SimSetup, specs: Sequence[RequestSpec], search: Bisection, load: LoadSpec
) -> tuple[list[RatePoint], SweepResult]:
    """The bench's bisection for the highest rate meeting the attainment target, on simulated runs."""
    if not load.slo:
        raise ValueError("a sweep needs an SLO (--slo ttft:MS tpot:MS)")
    points = []
    while (rate := search.next_rate()) is not None:
        point = simulate_rate(setup, specs, rate, load)
        points.append(point)
        search.record(rate, point.summary["slo_attainment"])
    return points, search.result()


def result_document(
    setup: SimSetup,
    points: Sequence[RatePoint],
    sweep: SweepResult | None,
    workload: dict[str, Any],
    load: LoadSpec,
    label: str | None = None,
    with_requests: bool = False,
) -> dict[str, Any]:
    """The `drift.bench.serve/v1` document (see `bench/results.py`), so sim and real runs overlay."""
    config = (
        setup.describe()
        | workload
        | {
            "burstiness": load.burstiness,
            "seed": load.seed,
            "slo": load.slo.as_dict(),
            "percentiles": list(load.percentiles),
            "max_concurrency": load.max_concurrency,
        }
    )
    return make_result(
        label or setup.label,
        config,
        [p.to_run(with_requests) for p in points],
        sweep.to_dict() if sweep else None,
    )
