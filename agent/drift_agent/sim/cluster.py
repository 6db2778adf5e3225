"""The discrete-event simulation: a virtual clock, N engine instances behind a dispatcher, and the request flow.

Events, in time order (ties: arrivals and transfers first, then step ends, then wake-ups, so requests arriving
at the instant a step ends are seen by the next step, as in the engine's loop):

- arrival: a request (a session's first turn at its precomputed time, a later turn a think time after the
  previous answer) is routed and queued; an idle instance is woken.
- step end: the instance posts the step's tokens (first token → TTFT, later ones → ITL), finished requests leave
  (a disaggregated prefill hands its KV to the decode pool), pending migrations and hand-offs are served at this
  step boundary, and the next step starts at once.
- KV transfer end (disaggregated layout): the request joins its decode instance's running batch.
- migration stage / commit (Llumnix-style live migration, see `migration.py`).
- load sample: the spread of KV usage across instances, for the imbalance statistic.

Layouts: colocated (every instance serves both phases; `instances` of them) or disaggregated (DistServe: a
prefill pool whose requests stop after their first token, and a decode pool that pulls their KV when it has room,
FIFO, over a per-instance link: transfers to one decode instance are serialised at `kv_bandwidth` per GPU).
Approximation: the prefill instance frees a request's KV when its first token is out rather than when the copy
completes.
"""

from __future__ import annotations

import heapq
import math
import time
import zlib
from collections import abc, deque
from dataclasses import dataclass, replace
from typing import Any

from ..bench.arrivals import arrival_times
from ..bench.metrics import GoodputTargets
from ..bench.workloads import RequestSpec, group_sessions
from ..core.errors import PromptTooLongError
from ..core.sampling_params import SamplingParams
from ..core.sequence import SLO, RequestTimes, Sequence, SequenceStatus
from ..multiplex.perf_model import PerfModel
from ..partition.base import Split
from ..routing.policies import Router, RouteRequest, make_router
from .events import ARRIVAL, COMMIT, PRIORITY, SAMPLE, STAGE, STEP, TRANSFER, WAKE
from .instance import InstanceConfig, SimInstance
from .migration import MigrationConfig, Migrator
from .presets import kv_transfer_seconds
from .requests import SimRequest, SimRun, TokenSource

# Steps in a row in which an instance ran no batch, only waited for KV copies: each lands copies that let
# swapped sequences run, so a long row of them means preemption and resumption chase each other forever.
MAX_COPY_WAITS = 1000


class SimulationError(RuntimeError):
    """The simulation cannot finish (a request can never be scheduled) or was configured inconsistently."""


@dataclass(frozen=True)
class ClusterConfig:
    instances: int = 1
    router: str = "least-loaded"
    # (prefill instances, decode instances) for the disaggregated layout; None = colocated.
    disaggregated: tuple[int, int] | None = None
    kv_bandwidth: float = 25e9  # bytes/s per GPU for hand-offs and migrations (200 Gb/s InfiniBand HDR)
    kv_latency_s: float = 1e-4  # fixed cost of one transfer (connection/handshake)
    migration: MigrationConfig | None = None
    sample_interval_s: float = 0.25
    # Clients the workload's sessions are spread over (by a stable hash of the session id), for fair
    # scheduling; 1: every request is the one anonymous client.
    clients: int = 1
    # (session id, client) pairs: the listed sessions' owner, overriding the hash (a workload whose clients
    # differ in how much they send, e.g. one flooding the queue).
    session_clients: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.disaggregated is not None:
            p, d = self.disaggregated
            if p < 1 or d < 1:
                raise ValueError("a disaggregated layout needs at least one prefill and one decode instance")
        elif self.instances < 1:
            raise ValueError(f"need at least one instance, got {self.instances}")
        if not self.kv_bandwidth > 0 or self.kv_latency_s < 0 or not self.sample_interval_s > 0:
            raise ValueError("KV bandwidth and the sample interval must be > 0, the latency >= 0")
        if self.clients < 1:
            raise ValueError(f"need at least one client, got {self.clients}")

    @property
    def num_instances(self) -> int:
        return sum(self.disaggregated) if self.disaggregated else self.instances


class Cluster:
    """Instances, a router and the event loop. Build a fresh one per run (instances keep state)."""

    def __init__(
        self,
        perf: PerfModel,
        splits: list[Split],
        instance_config: InstanceConfig,
        config: ClusterConfig | None = None,
        kv_bytes_per_token: int = 0,
        tp: int = 1,
        router: Router | None = None,
    ) -> None:
        self.config = config = config or ClusterConfig()
        self.perf = perf
        self.kv_bytes_per_token = kv_bytes_per_token
        self.link_bw = config.kv_bandwidth * tp  # each GPU of a TP group moves its own KV shard
        kv = {"kv_bytes_per_token": kv_bytes_per_token, "tp": tp}  # sizes and times a host KV tier
        if config.disaggregated:
            p, d = config.disaggregated
            self.prefill_pool = [
                SimInstance(i, instance_config, perf, splits, "prefill", **kv) for i in range(p)
            ]
            self.decode_pool = [
                SimInstance(p + i, instance_config, perf, splits, "decode", **kv) for i in range(d)
            ]
        else:
            self.prefill_pool = [
                SimInstance(i, instance_config, perf, splits, **kv) for i in range(config.instances)
            ]
            self.decode_pool = []
        self.instances = self.prefill_pool + self.decode_pool
        if len(self.instances) > 1:
            for inst in self.instances:
                inst.ff.sync_at_horizon = True  # routing and load samples read their KV and queues
        self.router = router or make_router(config.router)
        self.migrator = (
            Migrator(self, config.migration) if config.migration and not config.disaggregated else None
        )
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._steps: list[tuple[float, int, int, int, Any]] = []
        self._coupled = bool(self.migrator or self.decode_pool)
        self._ran = False
        self._counter = 0
        self._by_seq: dict[int, SimRequest] = {}
        self._inbox: dict[int, deque[tuple[Sequence, SimRequest]]] = {
            i.index: deque() for i in self.decode_pool
        }
        self._link_free: dict[int, float] = {i.index: 0.0 for i in self.decode_pool}
        self._incoming: dict[int, int] = {i.index: 0 for i in self.decode_pool}
        self._blocked: deque[SimRequest] = deque()
        self._multi_turn: set[str] = set()  # sessions with later turns (set per run)
        self._session_clients = dict(config.session_clients)
        self._in_flight = 0
        self.max_concurrency: int | None = None
        self.now = 0.0
        self.num_finished = 0
        self.num_transfers = 0
        self.transfer_time = 0.0
        # Later turns: tokens of the conversation so far, and those of them prefilled again (not cached).
        self.history_tokens = 0
        self.history_reprefill_tokens = 0
        self._spread_sum = 0.0
        self._spread_n = 0

    # ---- event queue -------------------------------------------------------------------------------------
    def push(self, t: float, kind: int, payload: Any) -> None:
        """Queue an event. Step ends and wake-ups go to the instances' own queue: they change nothing another
        instance can see unless the cluster is coupled (see `_horizon`)."""
        self._counter += 1
        heap = self._steps if kind in (STEP, WAKE) else self._heap
        heapq.heappush(heap, (t, PRIORITY[kind], self._counter, kind, payload))

    def wake(self, inst: SimInstance, t: float) -> None:
        if not inst.busy and not inst.wake_pending:
            inst.wake_pending = True
            self.push(t, WAKE, inst)

    def _horizon(self) -> float:
        """Time of the next event that could change what an instance's next steps would see: any external
        event (arrival, transfer, migration, load sample), and in a coupled cluster (sessions, a concurrency
        cap, migration or disaggregation, where one instance's step end can create work for another) also
        the next step end of any instance. An instance may fast-forward decode steps that start before it."""
        h = self._heap[0][0] if self._heap else math.inf
        if self._coupled and self._steps:
            h = min(h, self._steps[0][0])
        return h

    # ---- the run ----------------------------------------------------------------------------------------------
    def run(
        self,
        specs: abc.Sequence[RequestSpec],
        rate: float,
        *,
        burstiness: float = 1.0,
        seed: int = 0,
        slo: GoodputTargets | None = None,
        prefix_len: int = 0,
        max_concurrency: int | None = None,
    ) -> SimRun:
        """Simulate every spec once at `rate` requests/s (arrival times as `drift bench serve` computes them)."""
        if not specs:
            raise ValueError("no requests to simulate")
        if self._ran:
            raise RuntimeError("a Cluster simulates one run; build a new one (SimSetup.cluster_for_run)")
        self._ran = True
        wall0 = time.perf_counter()
        self.max_concurrency = max_concurrency
        self._slo = SLO.from_ms(slo.ttft_ms or None, slo.tpot_ms or None) if slo else None
        # Token ids matter to a prefix cache and to routing keyed on a prompt's first block (several instances).
        caching = any(i.config.enable_prefix_caching for i in self.instances)
        self._tokens = TokenSource(prefix_len, unique=caching or len(self.instances) > 1)
        self._multi_turn = {s.session_id for s in specs if s.turn > 0}
        self._coupled = bool(self.migrator or self.decode_pool or self._multi_turn or max_concurrency)
        reqs = [SimRequest(s) for s in specs]
        by_id = {r.spec.request_id: r for r in reqs}
        sessions = group_sessions(list(specs))
        session_rate = rate if math.isinf(rate) else rate * len(sessions) / len(specs)
        starts = arrival_times(len(sessions), session_rate, burstiness, seed)
        for turns, start in zip(sessions, starts.tolist(), strict=True):
            chain = [by_id[s.request_id] for s in turns]
            for a, b in zip(chain, chain[1:], strict=False):
                a.next_turn = b
            chain[0].scheduled = float(start)
            self.push(float(start), ARRIVAL, chain[0])
        if self.migrator is not None or len(self.instances) > 1:
            self.push(0.0, SAMPLE, None)
        self._loop(len(reqs))
        unfinished = [r for r in reqs if not r.finished]
        if unfinished:
            raise SimulationError(
                f"{len(unfinished)} request(s) never finished (e.g. {unfinished[0].spec.request_id}); "
                "the KV pool or max_num_seqs cannot serve them"
            )
        records = [r.record() for r in reqs]
        ends = [r.last for r in reqs if not r.error]
        duration = max(ends) if ends else max(r.scheduled for r in reqs)
        run = SimRun(records, max(duration, 1e-9), self.stats())
        run.wall_s = time.perf_counter() - wall0
        return run

    def _loop(self, total: int) -> None:
        heap, steps = self._heap, self._steps
        pop = heapq.heappop
        while heap or steps:
            if steps and (not heap or steps[0] < heap[0]):
                t, _, _, kind, payload = pop(steps)
            else:
                t, _, _, kind, payload = pop(heap)
            self.now = t
            if kind == STEP:
                self._on_step_end(payload, t)
            elif kind == ARRIVAL:
                self._on_arrival(payload, t)
            elif kind == WAKE:
                payload.wake_pending = False
                if not payload.busy:
                    self._start(payload, t)
            elif kind == TRANSFER:
                self._on_transfer_done(payload, t)
            elif kind in (STAGE, COMMIT):
                assert self.migrator is not None
                self.migrator.on_event(kind == COMMIT, payload, t)
            elif kind == SAMPLE:
                self._sample(t, total)

    def _start(self, inst: SimInstance, t: float) -> None:
        # Migration decides at every step boundary on KV usage that grows with each decode step: no spans.
        horizon = self._horizon() if self.migrator is None else t
        end = inst.start_step(t, horizon, self._coupled)
        if inst.copy_waits > MAX_COPY_WAITS:
            s = inst.sched
            raise SimulationError(
                f"instance {inst.index} only moved KV between the tiers for {inst.copy_waits} steps in a row "
                f"at t={t:.3f} s ({s.num_preemptions} preemptions, {s.num_fairness_preemptions} for fairness; "
                f"{len(s.swapped)} swapped out, {s.num_resuming} resuming, {len(s.waiting)} waiting): the "
                "scheduler livelocks"
            )
        if end is not None:
            self.push(end, STEP, inst)

    # ---- requests -------------------------------------------------------------------------------------------
    def _on_arrival(self, req: SimRequest, t: float) -> None:
        if self.max_concurrency is not None and self._in_flight >= self.max_concurrency:
            self._blocked.append(req)
            return
        self._send(req, t)

    def _send(self, req: SimRequest, t: float) -> None:
        spec = req.spec
        self._in_flight += 1
        req.sent = t
        if math.isnan(req.scheduled):
            req.scheduled = t
        if not req.prompt:  # first turns; later turns got the conversation so far when the previous ended
            req.prompt = self._tokens.first_turn(spec.prompt_len)
        disagg = bool(self.decode_pool)
        params = SamplingParams(max_tokens=1 if disagg else spec.output_len, ignore_eos=True)
        slo = self._slo or SLO()
        client = self._session_clients.get(spec.session_id)
        if client is not None:
            slo = replace(slo, client=client)
        elif self.config.clients > 1:
            slo = replace(slo, client=f"client-{zlib.crc32(spec.session_id.encode()) % self.config.clients}")
        seq = Sequence(spec.request_id, req.prompt, params, slo=slo, times=RequestTimes(arrival=t))
        key: object | None = None
        if spec.session_id in self._multi_turn:
            key = spec.session_id
        elif len(req.prompt) > self.instances[0].config.block_size:
            key = hash(tuple(req.prompt[: self.instances[0].config.block_size]))
        route = RouteRequest(
            len(req.prompt), key, self._slo.ttft if self._slo else None, self._slo.tpot if self._slo else None
        )
        inst = self.router.route(route, self.prefill_pool, t)
        try:
            inst.add(seq)
        except PromptTooLongError as e:
            req.error = str(e)
            self._finish(req, t)
            return
        req.seq = seq
        self._by_seq[seq.seq_id] = req
        self.wake(inst, t)

    def _finish(self, req: SimRequest, t: float) -> None:
        req.finished = True
        self.num_finished += 1
        self._in_flight -= 1
        nxt = req.next_turn
        if nxt is not None:
            if req.error:
                for later in _chain(nxt):
                    later.error = f"not sent: turn {req.spec.turn} of its session failed"
                    later.finished = True
                    self.num_finished += 1
            else:
                assert req.seq is not None
                nxt.prompt = list(req.seq.token_ids) + self._tokens.fresh(max(nxt.spec.new_prompt_len, 1))
                nxt.history = len(req.seq.token_ids)
                arrive = t + nxt.spec.think_time_s
                nxt.scheduled = arrive
                self.push(arrive, ARRIVAL, nxt)
        if self._blocked and (self.max_concurrency is None or self._in_flight < self.max_concurrency):
            self._send(self._blocked.popleft(), t)

    # ---- steps ------------------------------------------------------------------------------------------------
    def _on_step_end(self, inst: SimInstance, t: float) -> None:
        by_seq = self._by_seq
        advanced = inst.complete_step(t)
        # The first `spanned` sequences were posted by a span (decode steps fast-forwarded together), from its
        # step `off`: their gaps are the step latencies.
        spanned = inst.span_advanced
        if spanned:
            span = inst.ff.span
            assert span is not None
            d, ends, off, starts = span.durations, span.ends, inst.span_from, span.starts
        # Token times live in the requests; `seq.times.last_token` is set when a sequence ends (nothing in the
        # simulation reads it before).
        for i, seq in enumerate(advanced):
            req = by_seq.get(seq.seq_id)
            if req is None:
                continue
            n = len(seq.token_ids) - seq.num_prompt_tokens  # `seq.num_output_tokens`, inlined (hot loop)
            k = n - req.n_out  # tokens it got: at the end of each step, or of k steps of a span
            at = t
            if k > 0:
                if i >= spanned:
                    first, s0 = t, 0  # one token, at the step's end
                else:
                    s0 = off if starts is None or starts[i] <= off else starts[i]  # (a sequence that joined)
                    first, at = ends[s0], ends[s0 + k - 1]
                if req.n_out:
                    req.itl.append(first - req.last)
                else:
                    req.first = first
                    seq.times.first_token = first
                    inst.pending_prefill_tokens -= seq.num_prompt_tokens
                if k > 1:
                    req.itl.extend(d[s0 + 1 : s0 + k])
                req.last = at
                req.n_out = n
            if seq.status is SequenceStatus.FINISHED:
                self._retire(inst, seq, req, at)
        if self.decode_pool and inst.role == "decode":
            self._pull(inst, t)
        if self.migrator is not None:
            self.migrator.at_step_boundary(inst, t)
        self._start(inst, t)

    def _retire(self, inst: SimInstance, seq: Sequence, req: SimRequest, at: float) -> None:
        """`seq` finished at `at`: the request ends, or (a disaggregated prefill) moves to a decode instance."""
        seq.times.finished = at
        if req.n_out:
            seq.times.last_token = req.last
        if req.history:  # counted once (a disaggregated request retires from both pools)
            self.history_tokens += req.history
            self.history_reprefill_tokens += max(0, req.history - max(seq.num_cached_tokens, 0))
            req.history = 0
        del self._by_seq[seq.seq_id]
        if inst.role == "prefill" and req.n_out < req.spec.output_len:
            self._hand_off(req, seq, at)
        else:
            self._finish(req, at)

    # ---- disaggregated hand-off --------------------------------------------------------------------------------
    def _hand_off(self, req: SimRequest, prefilled: Sequence, t: float) -> None:
        """The prefill is done: queue the request at the decode instance with the most free KV."""
        dst = min(self.decode_pool, key=lambda i: (i.kv_usage + len(self._inbox[i.index]) * 1e-9, i.index))
        seq = Sequence(
            req.spec.request_id,
            req.prompt,
            SamplingParams(max_tokens=req.spec.output_len, ignore_eos=True),
            slo=prefilled.slo,
            times=RequestTimes(
                arrival=prefilled.times.arrival,
                first_scheduled=prefilled.times.first_scheduled,
                first_token=t,
                last_token=t,
            ),
        )
        seq.token_ids = list(prefilled.token_ids)
        seq.num_computed_tokens = prefilled.num_prompt_tokens
        seq.num_cached_tokens = 0
        req.seq = seq
        self._inbox[dst.index].append((seq, req))
        self._pull(dst, t)

    def _pull(self, dst: SimInstance, t: float) -> None:
        """Start the transfers the decode instance has room for, in arrival order."""
        inbox = self._inbox[dst.index]
        while inbox:
            seq, req = inbox[0]
            if dst.sched.num_running + self._incoming[dst.index] >= dst.config.max_num_seqs:
                return
            seq.block_table = []
            if not dst.bm.allocate(seq, 0):  # reserve the KV slots the transfer writes into
                return
            inbox.popleft()
            self._incoming[dst.index] += 1
            start = max(t, self._link_free[dst.index])
            dur = kv_transfer_seconds(
                seq.num_computed_tokens, self.kv_bytes_per_token, self.link_bw, self.config.kv_latency_s
            )
            self._link_free[dst.index] = start + dur
            self.num_transfers += 1
            self.transfer_time += dur
            self.push(start + dur, TRANSFER, (dst, seq, req))

    def _on_transfer_done(self, payload: tuple[SimInstance, Sequence, SimRequest], t: float) -> None:
        dst, seq, req = payload
        self._incoming[dst.index] -= 1
        joined = dst.sched.adopt(seq, reserved=True)  # its blocks and slot were reserved in `_pull`
        assert joined
        self._by_seq[seq.seq_id] = req
        self.wake(dst, t)

    # ---- statistics --------------------------------------------------------------------------------------------
    def _sample(self, t: float, total: int) -> None:
        pool = self.prefill_pool if not self.decode_pool else self.decode_pool
        if len(pool) > 1:
            usage = [i.kv_usage for i in pool]
            self._spread_sum += max(usage) - min(usage)
            self._spread_n += 1
        if self.num_finished < total:
            self.push(t + self.config.sample_interval_s, SAMPLE, None)

    def stats(self) -> dict[str, Any]:
        per = []
        for inst in self.instances:
            bm = inst.bm
            per.append(
                {
                    "index": inst.index,
                    "role": inst.role,
                    "requests": inst.num_requests,
                    "steps": inst.num_steps,
                    "busy_s": inst.busy_time,
                    "preemptions": inst.sched.num_preemptions,
                    "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries
                    if bm.prefix_queries
                    else None,
                    "splits_used": {f"P{p}/D{d}": n for (p, d), n in sorted(inst.splits_used.items())},
                    "decisions": dict(sorted(inst.decisions.items())),
                }
                | _tier_stats([inst])
            )
        queries = sum(i.bm.prefix_queries for i in self.instances)
        hits = sum(i.bm.prefix_hits for i in self.instances)
        out: dict[str, Any] = {
            "instances": per,
            "steps": sum(i.num_steps for i in self.instances),
            "fast_forwarded_steps": sum(i.num_fast_forwarded for i in self.instances),
            "preemptions": sum(i.sched.num_preemptions for i in self.instances),
            "prefix_cache_hit_rate": hits / queries if queries else None,
            "kv_usage_spread": self._spread_sum / self._spread_n if self._spread_n else None,
        } | _tier_stats(self.instances)
        if self._multi_turn:
            out["history_tokens"] = self.history_tokens
            out["history_reprefill_tokens"] = self.history_reprefill_tokens
        if self.decode_pool:
            out["kv_transfers"] = self.num_transfers
            out["mean_kv_transfer_s"] = (
                self.transfer_time / self.num_transfers if self.num_transfers else None
            )
        if self.migrator is not None:
            out["migrations"] = self.migrator.stats()
        return out


def _tier_stats(instances: list[SimInstance]) -> dict[str, Any]:
    """Preemption, host-tier and fairness figures of `instances`, summed: recomputed tokens and preemptions by
    kind always; the host tier's copies (per direction: runs, blocks, bytes, copy seconds) and blocks moved by
    reason where there is one; tokens served per client with fair scheduling."""
    scheds = [i.sched for i in instances]
    out: dict[str, Any] = {
        "recomputed_tokens": sum(s.num_recomputed_tokens for s in scheds),
        "swap_preemptions": sum(s.num_swap_preemptions for s in scheds),
        "fairness_preemptions": sum(s.num_fairness_preemptions for s in scheds),
    }
    tiers = [i for i in instances if i.copier is not None]
    if tiers:
        bms = [i.bm for i in tiers]
        copiers = [i.copier for i in tiers if i.copier is not None]
        per_dir: dict[str, dict[str, float]] = {}
        for direction in ("out", "in"):
            totals = [c.stats[direction].as_dict() for c in copiers]
            per_dir[direction] = {k: sum(t[k] for t in totals) for k in totals[0]}
        runs = per_dir["out"]["runs"] + per_dir["in"]["runs"]
        blocks = per_dir["out"]["blocks"] + per_dir["in"]["blocks"]
        out["host_tier"] = {
            "host_blocks": sum(b.num_host_blocks for b in bms),
            "copies_out": per_dir["out"],  # device -> host: demoted cached blocks and swap-outs
            "copies_in": per_dir["in"],  # host -> device: promoted prefix hits and swap-ins
            "mean_copy_run_blocks": blocks / runs if runs else None,
            "blocking_copy_wait_s": sum(c.blocking_wait_s for c in copiers),
            "prefix_host_hit_tokens": sum(b.prefix_host_hits for b in bms),
            "demoted_blocks": sum(b.demoted_blocks for b in bms),
            "promoted_blocks": sum(b.promoted_blocks for b in bms),
            "swapped_out_blocks": sum(b.swapped_out_blocks for b in bms),
            "swapped_in_blocks": sum(b.swapped_in_blocks for b in bms),
            "reused_blocks": sum(b.reused_blocks for b in bms),
        }
    served: dict[str, int] = {}
    for s in scheds:
        if s.vtc is not None:
            for client, n in s.vtc.served.items():
                served[client] = served.get(client, 0) + n
    if served:
        out["served_tokens_per_client"] = dict(sorted(served.items()))
    return out


def _chain(req: SimRequest) -> list[SimRequest]:
    out = []
    r: SimRequest | None = req
    while r is not None:
        out.append(r)
        r = r.next_turn
    return out
