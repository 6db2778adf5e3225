"""One simulated engine instance: the engine's own Scheduler, BlockManager and policy, on a virtual clock.

The instance never reads a clock. The cluster's event loop calls `start_step(now)`, which asks the policy for
the next step exactly as the engine does and returns when that step ends (its latency from the performance
model); at that time the loop calls `complete_step(now)`, which posts the step's tokens back to the scheduler
(`Scheduler.on_batch_done`) and reports which sequences advanced.

Multiplexed policies run through `multiplex.mux_loop.MuxLanes`, the lane logic the engine's loop uses, with
`SimMuxExecutor` costing each launch. A step here ends when the *first* busy lane completes: `complete_step`
posts that lane, and `start_step` relaunches the free lanes while the other one keeps running, as the engine
does when it polls its lanes.

Where the policy's next decisions are known (the same decode step again and again), the instance's
`FastForward` (`fast_forward.py`) applies a run of them at once; this module keeps the step-by-step logic.

With a host KV tier (`swap_space_gb`) the block manager asks for copies between the tiers; each step takes
them after scheduling, as the engine does, and `host_tier.CopyEngine` times them: a step that reads promoted
blocks starts once they landed, the others overlap compute and are reported done at the first step boundary
after they complete. With nothing to run but copies in flight, the instance waits for all of them (the
engine's `wait_all`) as a step without a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from ..core.block_manager import BlockManager
from ..core.config import POLICIES, EngineConfig, PartitionConfig, bounds_text
from ..core.fairness import FAIRNESS
from ..core.kv_copies import host_blocks_for_budget
from ..core.preemption import PREEMPTION_MODES, SwapCosts
from ..core.scheduler import Batch, Policy, Scheduler, SchedulerConfig
from ..core.sequence import SLO, Sequence
from ..multiplex.devices import PCIE4_X16
from ..multiplex.mux_loop import MuxLanes
from ..multiplex.perf_model import PerfModel, PrefillShape
from ..multiplex.policies import MuxContext, make_policy
from ..partition.base import Split
from .executor import ALL_SAMPLED, Sampled, SimExecutor, SimMuxExecutor, device_model
from .fast_forward import FastForward
from .host_tier import CopyEngine

Role = Literal["both", "prefill", "decode"]

_ENGINE = EngineConfig.model_fields  # the engine's defaults, which the simulated instance shares
_PARTITION = PartitionConfig.model_fields


@dataclass(frozen=True)
class InstanceConfig:
    """The engine settings that matter to scheduling (names as in `EngineConfig`)."""

    policy: str = "chunked"
    block_size: int = _ENGINE["block_size"].default
    num_kv_blocks: int = 4096
    max_num_seqs: int = _ENGINE["max_num_seqs"].default
    max_num_batched_tokens: int = _ENGINE["max_num_batched_tokens"].default
    max_model_len: int = 32768
    enable_prefix_caching: bool = False
    # The engine's `PartitionConfig` fields the simulator varies (`partition` holds them to its schema):
    # static-split's prefill share, drift's fold limit and TPOT margin.
    prefill_sm_share: float = _PARTITION["prefill_sm_share"].default
    fold_max_tokens: int = _PARTITION["fold_max_tokens"].default
    tpot_margin: float = _PARTITION["tpot_margin"].default
    # The device takes this many times the performance model's latency (1: the model is exact); the policies
    # and router still predict with the model (see `executor.ScaledDevice`).
    model_error: float = 1.0
    slo_ttft_ms: float = _ENGINE["slo_ttft_ms"].default  # for requests without their own targets
    slo_tpot_ms: float = _ENGINE["slo_tpot_ms"].default
    fairness: str = _ENGINE["fairness"].default  # "vtc": fair scheduling across the requests' clients
    fairness_preempt_gap: float = _ENGINE["fairness_preempt_gap"].default
    fast_forward: bool = True  # apply runs of identical decode steps at once (exact; see `fast_forward.py`)
    # Host KV tier per GPU, GiB (0: none), how preempted requests give their KV back, and the host link of one
    # GPU (bytes/s one way; `SimSetup.build` takes the device preset's).
    swap_space_gb: float = _ENGINE["swap_space_gb"].default
    preemption_mode: str = _ENGINE["preemption_mode"].default
    host_bw: float = PCIE4_X16
    # False: the host tier only holds swapped-out requests, no prefix cache (a simulator switch; see
    # `BlockManager(host_prefix_cache=False)`).
    host_prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if min(self.block_size, self.num_kv_blocks, self.max_num_seqs, self.max_num_batched_tokens) < 1:
            raise ValueError("block size, KV blocks, max seqs and the token budget must be positive")
        _ = self.partition  # its bounds checked now, not when an instance starts
        if self.fairness not in FAIRNESS:
            raise ValueError(f"unknown fairness {self.fairness!r}; choose one of {', '.join(FAIRNESS)}")
        if not self.model_error > 0:
            raise ValueError(f"model_error must be positive, got {self.model_error}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"unknown preemption mode {self.preemption_mode!r}; "
                f"choose one of {', '.join(PREEMPTION_MODES)}"
            )
        if not self.swap_space_gb >= 0 or not self.host_bw > 0 or not self.fairness_preempt_gap > 0:
            raise ValueError("swap_space_gb must be >= 0, host_bw and fairness_preempt_gap > 0")

    @property
    def partition(self) -> PartitionConfig:
        """The partition settings as the engine takes them, validated by their schema (mode: its default)."""
        values = {
            name: getattr(self, name) for name in ("prefill_sm_share", "fold_max_tokens", "tpot_margin")
        }
        try:
            return PartitionConfig(**values)
        except ValidationError as e:
            name = str(e.errors()[0]["loc"][0])
            raise ValueError(f"{name} must be {bounds_text(_PARTITION[name])}, got {values[name]}") from None

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            policy=self.policy,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            partition=self.partition,
            slo_ttft_ms=self.slo_ttft_ms,
            slo_tpot_ms=self.slo_tpot_ms,
            fairness=self.fairness,
            fairness_preempt_gap=self.fairness_preempt_gap,
            swap_space_gb=self.swap_space_gb,
            preemption_mode=self.preemption_mode,  # type: ignore[arg-type]  # checked in __post_init__
        )


def make_instance_policy(config: InstanceConfig, perf: PerfModel, splits: list[Split]) -> Policy:
    """The engine's policy for this instance (`multiplex.policies.make_policy`) over the simulated model."""
    return make_policy(
        config.policy,
        config.engine_config(),
        lambda: MuxContext(perf_model=perf, splits=splits, num_layers=perf.num_layers),
    )


class SimInstance:
    """One engine instance on the virtual clock (see the module docstring). Its fast-forward layer, `ff`,
    applies runs of identical decode steps at once where the policy's decisions are known (`fast_forward`)."""

    def __init__(
        self,
        index: int,
        config: InstanceConfig,
        perf: PerfModel,
        splits: list[Split],
        role: Role = "both",
        kv_bytes_per_token: int = 0,
        tp: int = 1,
    ) -> None:
        """`kv_bytes_per_token`: the model's KV per token over the whole TP group of `tp` GPUs (sizes and
        times the host tier; needed with `swap_space_gb`)."""
        self.index = index
        self.config = config
        self.role = role
        self.perf = perf  # what the policy and the router predict with
        self.device = device_model(perf, config.model_error)  # what steps take on the virtual clock
        num_host_blocks = 0
        self.copier: CopyEngine | None = None
        if config.swap_space_gb > 0:
            if kv_bytes_per_token <= 0:
                raise ValueError("a host KV tier (swap_space_gb) needs the model's KV bytes per token")
            block_bytes = kv_bytes_per_token * config.block_size // tp  # one GPU's shard
            num_host_blocks = host_blocks_for_budget(config.swap_space_gb, block_bytes)
            self.copier = CopyEngine(block_bytes, config.host_bw, tp) if num_host_blocks else None
        self.bm = BlockManager(
            config.num_kv_blocks,
            config.block_size,
            config.enable_prefix_caching,
            num_host_blocks,
            host_prefix_cache=config.host_prefix_cache,
        )
        sched_cfg = SchedulerConfig(
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            fairness=config.fairness,
            fairness_preempt_gap=config.fairness_preempt_gap,
            preemption_mode=config.preemption_mode,
            default_slo=SLO.from_ms(config.slo_ttft_ms, config.slo_tpot_ms),
        )
        self.policy = make_instance_policy(config, perf, splits)
        self.sched = Scheduler(sched_cfg, self.bm, self.policy)
        self.waiting_copies = False  # the running "step" only waits for copies to land
        self.copy_waits = 0  # such steps in a row (the cluster stops a scheduler that only moves KV around)
        self.multiplexing = bool(getattr(self.policy, "multiplexing", False))
        self.executor: Any = SimMuxExecutor(self.device) if self.multiplexing else SimExecutor(self.device)
        self.fast_forward = config.fast_forward
        self.busy = False
        self.step_end = 0.0
        self.wake_pending = False
        self._batch: Batch | None = None
        self._sampled: Sampled | None = None
        # Multiplexed: the two lanes, when each completes, and whether the last prefill block ended its job.
        self.lanes = MuxLanes(self.sched) if self.multiplexing else None
        self.decode_end: float | None = None
        self.prefill_end: float | None = None
        self._prefill_sampled: Sampled | None = None
        self._job_finished = False
        # What `complete_step` posted from the span (`ff.span`): its first `span_advanced` sequences, from its
        # step `span_from`.
        self.span_advanced = 0
        self.span_from = 0
        # Router load signal: prompt tokens added here whose first token has not come out yet.
        self.pending_prefill_tokens = 0
        self._prefill_per_token: float | None = None  # see `queued_prefill_s`
        self.num_steps = 0
        self.num_fast_forwarded = 0  # steps applied in spans without asking the policy
        self.num_requests = 0
        self.busy_time = 0.0
        self.splits_used: dict[tuple[int, int], int] = {}
        self.decisions: dict[str, int] = {}  # dispatcher decisions acted on, by mode (as the engine counts)
        self.ff = FastForward(self)
        if self.copier is not None:
            # `auto` preemption weighs the two costs as this simulation charges them: a block over the host
            # link, a token at the per-token cost of a full prefill chunk.
            self.sched.swap_costs = SwapCosts(self.copier.block_s, self.prefill_s_per_token)

    # ---- load signals ----------------------------------------------------------------------------------
    @property
    def kv_usage(self) -> float:
        return self.bm.usage

    @property
    def kv_used_tokens(self) -> int:
        return (self.bm.num_blocks - self.bm.num_free_blocks) * self.bm.block_size

    @property
    def load_tokens(self) -> int:
        """Work queued and held: prompt tokens still to prefill plus KV tokens of running requests."""
        return self.pending_prefill_tokens + self.kv_used_tokens

    # ---- the router's view (`routing.InstanceView`): the performance model's predictions -----------------
    @property
    def num_running(self) -> int:
        return self.sched.num_running

    @property
    def free_kv_blocks(self) -> int:
        return self.bm.num_free_blocks

    @property
    def block_size(self) -> int:
        return self.bm.block_size

    @property
    def slo_attainment(self) -> float | None:
        """Unknown: an instance keeps no window of finished requests (the cluster measures attainment), so
        `slo-aware` chooses as it always has here."""
        return None

    def busy_for(self, now: float) -> float:
        return max(self.step_end - now, 0.0) if self.busy else 0.0

    def queued_prefill_s(self) -> float:
        """The pending prompt tokens at the per-token cost of a full chunk (`max_num_batched_tokens`) on the
        whole device: queued prompts are prefilled in chunks of that size."""
        return self.pending_prefill_tokens * self.prefill_s_per_token

    @property
    def prefill_s_per_token(self) -> float:
        t = self._prefill_per_token
        if t is None:
            n = self.config.max_num_batched_tokens
            t = self._prefill_per_token = self.perf.prefill_time(PrefillShape(n), self.perf.total_sms) / n
        return t

    def prefill_s(self, tokens: int) -> float:
        return self.perf.prefill_time(PrefillShape(tokens), self.perf.total_sms)

    def decode_step_s(self, batch: int, kv_tokens: int) -> float:
        return self.perf.decode_time(batch, kv_tokens, self.perf.total_sms)

    # ---- requests ----------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request (raises `PromptTooLongError` if it can never run here)."""
        self.sched.add(seq)
        self.pending_prefill_tokens += seq.num_prompt_tokens
        self.num_requests += 1

    # ---- stepping ----------------------------------------------------------------------------------------
    def start_step(
        self, now: float, horizon: float = math.inf, finish_is_event: bool = False
    ) -> float | None:
        """Schedule and launch the next step at `now`; its end time, or None when there is nothing to run.

        `horizon`: the time of the next event that could change this instance's view (see `Cluster`).
        Decode steps that start before it may be fast-forwarded as one span (see `fast_forward`);
        `finish_is_event`: a request's finish can create work (sessions, a concurrency cap), so spans stop at
        the first one."""
        assert not self.busy
        if self.copier is not None:
            self._land_copies(now)
        if not self.sched.has_unfinished:
            return self._wait_for_copies(now)
        ff = self.ff
        if self.lanes is None or self.lanes.decode is None:
            ff.span = None  # (a span beside prefill blocks runs on while its decode lane is busy)
        # With a host tier a finish starts copies (its cached blocks are saved to the host): a span would
        # start them late, so spans end at the first finish.
        ff.finish_is_event = finish_is_event or self.copier is not None
        end = self._start_mux(now, horizon) if self.multiplexing else self._start_sequential(now, horizon)
        if end is None:
            return self._wait_for_copies(now)
        self.copy_waits = 0
        self.busy = True
        self.busy_time += end - now
        self.step_end = end
        return end

    # ---- the host tier's copies ------------------------------------------------------------------------
    def _land_copies(self, now: float) -> None:
        """Report the submissions done by `now` to the scheduler: their blocks are freed, the sequences they
        brought back run from this step on."""
        assert self.copier is not None
        for ticket in self.copier.land(now):
            aborted = self.sched.copies_done(ticket)
            assert not aborted, "simulated requests are never aborted"

    def _submit_copies(self, now: float) -> float:
        """Start the copies this step's scheduling (and the last completion's finishes) asked for; when the
        step's forward pass may start: `now`, or once blocking copies landed (the batch reads blocks they copy
        in, or reuses blocks they copy out)."""
        if self.copier is None:
            return now
        copies = self.bm.take_copies()
        if copies is None:
            return now
        done = self.copier.submit(copies, now)
        return done if copies.blocking else now

    def _held_back(self, wait: float) -> None:
        """A batch launched `wait` seconds late, for blocking copies."""
        if wait > 0:
            assert self.copier is not None
            self.copier.blocking_wait_s += wait

    def _wait_for_copies(self, now: float) -> float | None:
        """Nothing to run: with copies in flight, a step without a batch that ends when all of them landed
        (sequences on their way back run then); otherwise idle (None)."""
        if self.copier is None:
            return None
        self._submit_copies(now)
        end = self.copier.last_done
        if end is None:
            return None
        self.busy = self.waiting_copies = True
        self.copy_waits += 1
        self.step_end = end
        return end

    def _count_steps(self, steps: int) -> None:
        """`steps` launched at once: one, or a span's (all but the first fast-forwarded)."""
        self.num_steps += steps
        self.num_fast_forwarded += steps - 1

    def count_forwarded(self, steps: int, split: tuple[int, int] | None) -> None:
        """`steps` fast-forwarded steps added to the running span (or, negative, cut from it), on `split`
        (multiplexed)."""
        self.num_steps += steps
        self.num_fast_forwarded += steps
        if split is not None:
            self.splits_used[split] = self.splits_used.get(split, 0) + steps

    def _start_sequential(self, now: float, horizon: float) -> float | None:
        """Schedule and launch one batch on the whole device; when it (or the span it starts) ends."""
        out = self.sched.schedule(now)
        start = self._submit_copies(now)
        if not out.batches:
            return None
        self._held_back(start - now)
        batch = out.batches[0]
        dt, sampled = self.executor.batch(batch)
        self._batch, self._sampled = batch, sampled
        span = self.ff.try_step_span(out, sampled, start, dt, horizon) if self.fast_forward else None
        if span is None:
            self._count_steps(1)
            return start + dt
        self._count_steps(len(span.durations))
        return span.ends[-1]

    def _start_mux(self, now: float, horizon: float) -> float | None:
        """Launch on the free lanes (`MuxLanes.launch`, as the engine does); when the next lane completes, or
        None when neither lane has work."""
        lanes, executor, ff = self.lanes, self.executor, self.ff
        assert lanes is not None
        launch = lanes.launch(now)
        # The lanes launched now wait for blocking copies (the engine's host waits for them before launching).
        start = self._submit_copies(now)
        if launch.started:
            self._held_back(start - now)
        now = start
        split = launch.split
        decision = launch.decision_taken
        if decision is not None:
            self.decisions[decision.mode] = self.decisions.get(decision.mode, 0) + 1
        if launch.prefill is not None and launch.prefill_layers > 0:
            assert split is not None
            dt, self._prefill_sampled = executor.prefill(
                split, launch.prefill, launch.prefill_layers, contended=lanes.decode is not None
            )
            self.prefill_end = now + dt
            self._count_steps(1)
        if ff.cut is not None:  # a prefill block ended inside the running span
            ff.continue_span(launch, horizon, self._job_finished)
        if launch.decode is not None:
            assert split is not None
            dt = executor.decode(split, launch.decode, contended=lanes.prefill is not None)
            self.decode_end = now + dt
            steps = 1
            if self.fast_forward and now + dt < horizon:
                span = ff.try_mux_span(launch, now, dt, horizon)
                if span is not None:
                    steps = len(span.durations)
                    self.decode_end = span.ends[-1]
            self._count_steps(steps)
            key = (split.prefill_sms, split.decode_sms)
            self.splits_used[key] = self.splits_used.get(key, 0) + steps
        if not lanes.busy:
            return None
        return min(e for e in (self.decode_end, self.prefill_end) if e is not None)

    def complete_step(self, now: float) -> list[Sequence]:
        """End the running step at `now`: the sequences it advanced (token appended, prompt progressed or
        finished), for the caller to stamp with `now`. After a span's steps, the first `span_advanced` of them
        were posted by the span (`ff.span`), from its step `span_from`: the caller reads their token times
        there."""
        assert self.busy
        self.busy = False
        self.span_advanced = 0
        if self.waiting_copies:
            self.waiting_copies = False
            return []
        if self.multiplexing:
            return self._complete_lanes(now)
        batch, sampled = self._batch, self._sampled
        self._batch = self._sampled = None
        assert batch is not None
        span = self.ff.span
        if span is not None:
            self.span_from = 0
            advanced = self.ff.post_span(span, len(span.durations))
            self.span_advanced = len(advanced)
            return advanced
        return self.sched.on_batch_done(batch, sampled)  # type: ignore[arg-type]

    def _complete_lanes(self, now: float) -> list[Sequence]:
        """Post the lanes that complete at `now` (decode first when both do, as the engine polls them). A
        prefill block that ends inside a decode span posts the span's steps that ended before it."""
        lanes, ff = self.lanes, self.ff
        assert lanes is not None
        advanced: list[Sequence] = []
        span = ff.span
        decode_done = self.decode_end is not None and self.decode_end <= now
        prefill_done = self.prefill_end is not None and self.prefill_end <= now
        if span is not None:
            self.span_from = span.posted
            if prefill_done and not decode_done:
                advanced, decode_done = ff.at_block_end(now)
        if decode_done:
            self.decode_end = None
            if span is not None:
                lanes.decode = None  # posted by the span, step by step
                advanced = ff.post_span(span, len(span.durations))
            else:
                _, advanced = lanes.decode_done(ALL_SAMPLED)
        if span is not None:
            self.span_advanced = len(advanced)
        if prefill_done:
            self.prefill_end = None
            job, seqs = lanes.prefill_done(self._prefill_sampled)
            self._job_finished = job.done
            advanced = advanced + seqs
        return advanced
