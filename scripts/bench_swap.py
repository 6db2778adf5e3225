"""Swap preemption and the host KV tier on the real CPU engine: one multi-turn workload, four configurations.

    python scripts/bench_swap.py [--clients 6] [--conversations 2] [--turns 3] [--num-kv-blocks 48] [--quick]

The engine in process (no HTTP), the embedded model in fp32 unless --model says otherwise. A device KV pool too
small for the conversations in flight forces preemptions and evicts the KV of earlier turns; the same workload
(same prompts, same arrival times and think times) then runs on four engines, one after the other:

  (a) preemption_mode=recompute, no host tier (swap_space_gb=0): the behaviour without a host tier;
  (b) recompute with a host tier: evicted cached blocks are demoted to host memory and promoted back on a hit;
  (c) swap with a host tier: a preempted request's KV is copied out and back in;
  (d) auto with a host tier: per victim, whichever the engine's measured costs say is cheaper.

Open loop on the real clock: each client starts conversations at precomputed times (Gamma gaps, Poisson at
--burstiness 1); a conversation's next turn (previous prompt + the generated answer + new user tokens, as token
ids) arrives a think time after the previous turn finished. Answers have fixed lengths (ignore_eos), so every
configuration does the same work; even clients decode greedily, odd ones sample with a per-request seed. Prints a
Markdown table (metrics as rows, configurations as columns), the check that every configuration produced the same
tokens, and whether (i) the host tier serves at least half of the evicted history tokens that (a) recomputes and
(ii) swapping lowers P99 TTFT against recomputing. `--quick` runs a seconds-long smoke workload.

The process runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it (--omp-wait-policy): the host tier's
copier thread changes how OpenMP waits, and with it the speed of every forward pass (see `main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import heapq
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

CONFIGS: tuple[tuple[str, str, bool], ...] = (  # (key, preemption_mode, host tier)
    ("a", "recompute", False),
    ("b", "recompute", True),
    ("c", "swap", True),
    ("d", "auto", True),
)
LABELS = {
    "a": "(a) recompute, no host tier",
    "b": "(b) recompute + host tier",
    "c": "(c) swap + host tier",
    "d": "(d) auto + host tier",
}
# Workload presets; an explicit flag overrides the preset's value. The full one: 36 turns whose prompts grow from
# ~130 to ~400 tokens, long-tailed answers of ~40 tokens, conversations starting in bursts; the device pool holds
# about four first turns or two third turns. About 3-4 minutes on 2 idle cores.
FULL: dict[str, Any] = {
    "clients": 6,
    "conversations": 2,
    "turns": 3,
    "system_len": 32,
    "first_len": 96,
    "user_len": 48,
    "output_len": 40,
    "conv_rate": 0.15,
    "burstiness": 0.5,
    "think_time": 2.0,
    "num_kv_blocks": 48,
    "swap_space_gb": 1.0,
}
QUICK: dict[str, Any] = {  # all conversations at once, so the pool overflows whatever the machine's speed
    "clients": 2,
    "conversations": 2,
    "turns": 2,
    "system_len": 16,
    "first_len": 40,
    "user_len": 16,
    "output_len": 16,
    "conv_rate": 1e6,
    "burstiness": 1.0,
    "think_time": 0.02,
    "num_kv_blocks": 10,
    "swap_space_gb": 0.05,
}
PROMPT_SPREAD = 0.5  # system and user lengths are drawn uniformly from mean * [1 - spread, 1 + spread]
ANSWER_CAP = 4  # answers: exponential with the mean, at most this many times it
SAMPLING_TEMPERATURE = 0.8


# ---- arguments ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: Callable[[str], float], low: float, strict: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low:g}, got {text}")
        return value

    return parse


POS_INT = _number(int, 0, strict=True)
NONNEG_INT = _number(int, 0, strict=False)
POS_FLOAT = _number(float, 0, strict=True)
NONNEG_FLOAT = _number(float, 0, strict=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload (defaults: the full preset, or the --quick one)")
    w.add_argument(
        "--clients", type=POS_INT, help=f"clients, each with its own system prompt [{FULL['clients']}]"
    )
    w.add_argument(
        "--conversations", type=POS_INT, help=f"conversations per client [{FULL['conversations']}]"
    )
    w.add_argument("--turns", type=POS_INT, help=f"turns per conversation [{FULL['turns']}]")
    w.add_argument(
        "--system-len", type=NONNEG_INT, help=f"system prompt tokens per client [{FULL['system_len']}]"
    )
    w.add_argument(
        "--first-len", type=POS_INT, help=f"mean user tokens of a first turn [{FULL['first_len']}]"
    )
    w.add_argument("--user-len", type=POS_INT, help=f"mean user tokens of a later turn [{FULL['user_len']}]")
    w.add_argument("--output-len", type=POS_INT, help=f"mean answer tokens [{FULL['output_len']}]")
    w.add_argument(
        "--conv-rate", type=POS_FLOAT, help=f"conversation starts/s per client [{FULL['conv_rate']}]"
    )
    w.add_argument(
        "--burstiness", type=POS_FLOAT, help=f"Gamma shape of start gaps; 1: Poisson [{FULL['burstiness']}]"
    )
    w.add_argument("--think-time", type=NONNEG_FLOAT, help=f"mean think time in s [{FULL['think_time']}]")
    w.add_argument("--seed", type=int, default=0)
    e = p.add_argument_group("engine")
    e.add_argument(
        "--num-kv-blocks", type=POS_INT, help=f"device KV pool in blocks [{FULL['num_kv_blocks']}]"
    )
    e.add_argument("--swap-space-gb", type=POS_FLOAT, help=f"host tier of (b)-(d) [{FULL['swap_space_gb']}]")
    e.add_argument("--num-threads", type=POS_INT, default=2, help="torch threads [2]")
    e.add_argument("--model", default=None, help="model directory; default: the embedded SmolLM2-135M")
    e.add_argument(
        "--omp-wait-policy",
        choices=["PASSIVE", "ACTIVE", "inherit"],
        default="PASSIVE",
        help="OMP_WAIT_POLICY for this process unless the environment sets it [PASSIVE]; see below",
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (the test's)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# ---- workload ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    user: tuple[int, ...]  # the user's new tokens
    max_tokens: int  # answer length (ignore_eos: exactly this)
    think_s: float  # after the previous answer, before this turn arrives (0 for the first)


@dataclass(frozen=True)
class Conversation:
    index: int
    client: str
    system: tuple[int, ...]
    start_s: float  # first turn's arrival, from the run's start
    turns: tuple[Turn, ...]
    greedy: bool


def make_workload(args: argparse.Namespace, vocab: int) -> list[Conversation]:
    """Deterministic in the arguments: every configuration gets the same conversations and times."""
    rng = np.random.default_rng(args.seed)
    low = max(vocab // 16, 1)  # clear of the special tokens at the start of the vocabulary

    def length(mean: int) -> int:
        return int(
            rng.integers(max(1, round(mean * (1 - PROMPT_SPREAD))), round(mean * (1 + PROMPT_SPREAD)) + 1)
        )

    def tokens(mean: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(low, vocab, size=length(mean)))

    def answer(mean: int) -> int:
        # Answer lengths are long-tailed (ShareGPT): exponential, clipped. The long ones are what outgrows the
        # blocks a request was admitted with and preempts others.
        return int(np.clip(round(rng.exponential(mean)), max(1, mean // 6), ANSWER_CAP * mean))

    convs: list[Conversation] = []
    for c in range(args.clients):
        system = tuple(int(t) for t in rng.integers(low, vocab, size=args.system_len))
        gaps = rng.gamma(args.burstiness, 1.0 / (args.conv_rate * args.burstiness), size=args.conversations)
        for start in np.cumsum(gaps):
            turns = tuple(
                Turn(
                    tokens(args.first_len if t == 0 else args.user_len),
                    answer(args.output_len),
                    0.0 if t == 0 else float(rng.exponential(args.think_time)),
                )
                for t in range(args.turns)
            )
            convs.append(
                Conversation(len(convs), f"client{c}", system, float(start), turns, greedy=c % 2 == 0)
            )
    return convs


def longest_context(convs: list[Conversation]) -> int:
    return max(len(c.system) + sum(len(t.user) + t.max_tokens for t in c.turns) for c in convs)


# ---- one configuration -------------------------------------------------------------------------------------
@dataclass
class Done:
    """One finished turn."""

    conv: int
    turn: int
    greedy: bool
    arrival: float
    prompt_len: int
    history_len: int  # previous turns' prompt and answer: the part whose KV existed before
    first_token: float = 0.0
    finished: float = 0.0
    token_times: list[float] = field(default_factory=list)  # when each output event came out of `step`
    token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # prefix-cache hit tokens at first admission, host-tier hits included
    host_hits: int = 0  # of which promoted from the host tier


@dataclass
class RunResult:
    key: str
    done: dict[str, Done]
    stats: dict[str, Any]  # the engine's counters over the timed run
    wall_s: float
    makespan_s: float  # first arrival to last finish
    peak_context: int  # most tokens (prompt + output so far) of the requests inside the engine at once
    block_bytes: int
    host_hits_match: bool  # the per-request host hits add up to the engine's own counter
    preempted: dict[str, int]  # request id -> times preempted
    invariants: str
    cpu_s: float  # CPU time of this process during the run: with wall_s, the cores it got
    max_load: float | None  # highest 1-minute load average seen during the run


COUNTERS = (
    "prefix_cache_queries",
    "prefix_cache_hits",
    "prefix_cache_host_hits",
    "num_preemptions",
    "num_swap_preemptions",
    "recomputed_tokens",
    "prompt_tokens",
    "generation_tokens",
    "kv_blocks_moved",
    "kv_copies",
    "kv_copy_bytes",
    "kv_copy_seconds",
)


def counters(engine: Any) -> dict[str, Any]:
    s = dataclasses.asdict(engine.stats())
    return {k: dict(s[k]) if isinstance(s[k], dict) else s[k] for k in COUNTERS}


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {d: n - before[k].get(d, 0) for d, n in v.items()}
        else:
            out[k] = v - before[k]
    return out


@dataclass
class PerRequest:
    """What the engine counts only in total, per request id."""

    host_hits: dict[str, int] = field(default_factory=dict)  # prefix-hit tokens promoted from the host tier
    preemptions: dict[str, int] = field(default_factory=dict)


def instrument(engine: Any) -> PerRequest:
    """Wrap the scheduler's admission and preemption (the policies call them through the instance) to attribute
    host-tier hits and preemptions to requests: the engine reports both only in total, and per request only the
    hits of both tiers together (`num_cached_tokens`)."""
    bm, sched = engine.block_manager, engine.scheduler
    per = PerRequest()
    admit, preempt = sched.try_admit, sched.preempt

    def try_admit(seq: Any, *a: Any, **kw: Any) -> Any:
        before = bm.prefix_host_hits
        item = admit(seq, *a, **kw)
        if bm.prefix_host_hits != before:
            rid = seq.request_id
            per.host_hits[rid] = per.host_hits.get(rid, 0) + bm.prefix_host_hits - before
        return item

    def preempt_(seq: Any) -> None:
        per.preemptions[seq.request_id] = per.preemptions.get(seq.request_id, 0) + 1
        preempt(seq)

    sched.try_admit, sched.preempt = try_admit, preempt_
    return per


def warm_up(engine: Any, vocab: int) -> None:
    """First passes pay one-off costs (oneDNN weight reorders, allocator growth); then forget the warm-up's KV so
    every configuration starts with cold caches and the same free blocks."""
    from drift_agent.core.sampling_params import SamplingParams

    n = min(64, engine.max_model_len // 4)
    prompts = [[vocab // 2 + i + j for j in range(n)] for i in range(2)]
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    engine.block_manager.reset_prefix_cache()


def drive(engine: Any, convs: list[Conversation], seed: int) -> tuple[dict[str, Done], int]:
    """The open loop: add each turn once its arrival time has passed, step while anything is unfinished. The
    finished turns, and the most tokens (prompt + output so far) inside the engine at once."""
    from drift_agent.core.sampling_params import SamplingParams
    from drift_agent.core.sequence import SLO

    done: dict[str, Done] = {}
    live: dict[str, int] = {}  # tokens of each request inside the engine
    history: dict[int, list[int]] = {}  # conversation -> previous prompt + answer
    heap = [(time.monotonic() + c.start_s, c.index, 0) for c in convs]
    heapq.heapify(heap)
    peak = 0
    while heap or engine.has_unfinished_requests():  # (unfinished includes KV copies still in flight)
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            at, ci, ti = heapq.heappop(heap)
            conv, turn = convs[ci], convs[ci].turns[ti]
            prev = history.get(ci, list(conv.system))
            prompt = prev + list(turn.user)
            rid = f"c{ci}-t{ti}"
            params = SamplingParams(
                max_tokens=turn.max_tokens,
                ignore_eos=True,
                temperature=0.0 if conv.greedy else SAMPLING_TEMPERATURE,
                seed=None if conv.greedy else seed * 100_003 + ci * 17 + ti,
            )
            # arrival_time is the precomputed time, not now: a late add is queueing the client sees.
            engine.add_request(rid, prompt, params, slo=SLO(client=conv.client), arrival_time=at)
            done[rid] = Done(ci, ti, conv.greedy, at, len(prompt), len(prev) if ti else 0)
            live[rid] = len(prompt)
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, heap[0][0] - time.monotonic()))
            continue
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"request {out.request_id} failed: {out.error!r}")
            rec = done[out.request_id]
            if out.delta_token_ids:  # `times` is the request's own object: read it before the next step
                rec.token_times.append(out.times.last_token)
                live[out.request_id] += len(out.delta_token_ids)
            if not out.finished:
                continue
            rec.first_token, rec.finished = out.times.first_token, out.times.finished
            rec.token_ids, rec.num_cached = list(out.token_ids), out.num_cached_tokens
            del live[out.request_id]
            conv = convs[rec.conv]
            if rec.turn + 1 < len(conv.turns):
                history[rec.conv] = list(out.prompt_token_ids) + rec.token_ids
                nxt = conv.turns[rec.turn + 1]
                heapq.heappush(heap, (rec.finished + nxt.think_s, rec.conv, rec.turn + 1))
        peak = max(peak, sum(live.values()))
    return done, peak


def run_config(
    key: str, mode: str, host: bool, convs: list[Conversation], args: argparse.Namespace
) -> RunResult:
    from drift_agent.bench.machine import MachineMonitor
    from drift_agent.core.config import EngineConfig
    from drift_agent.engine.kv_swap import block_nbytes
    from drift_agent.engine.llm_engine import LLMEngine

    cfg = EngineConfig(
        model=args.model,
        dtype="float32",
        device="cpu",
        num_threads=args.num_threads,
        num_kv_blocks=args.num_kv_blocks,
        swap_space_gb=args.swap_space_gb if host else 0.0,
        preemption_mode=mode,
    )
    engine = LLMEngine(cfg)
    try:
        warm_up(engine, engine.runner.model.vocab_size)
        before = counters(engine)
        per = instrument(engine)
        with MachineMonitor() as monitor:
            cpu0, t0 = time.process_time(), time.monotonic()
            done, peak = drive(engine, convs, args.seed)
            wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        stats = delta(counters(engine), before)
        for rid, n in per.host_hits.items():
            done[rid].host_hits = n
        try:
            engine.check_invariants()
            invariants = "ok"
        except AssertionError as exc:
            invariants = f"FAILED: {exc}"
        return RunResult(
            key=key,
            done=done,
            stats=stats,
            wall_s=wall,
            makespan_s=max(r.finished for r in done.values()) - min(r.arrival for r in done.values()),
            peak_context=peak,
            block_bytes=block_nbytes(engine.runner.kv_pool),
            host_hits_match=sum(per.host_hits.values()) == stats["prefix_cache_host_hits"],
            preempted=per.preemptions,
            invariants=invariants,
            cpu_s=cpu,
            max_load=monitor.result.max_load_1m if monitor.result else None,
        )
    finally:
        if engine.copier is not None:
            engine.copier.close()
        del engine
        gc.collect()


# ---- report ------------------------------------------------------------------------------------------------
def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class History:
    """Turns >= 2: the tokens of earlier turns whose KV could be reused (full blocks only), and where they came
    from this time."""

    prompt: int = 0  # all prompt tokens of turns >= 2
    cacheable: int = 0
    device: int = 0
    host: int = 0

    @property
    def missed(self) -> int:  # evicted: computed again
        return max(self.cacheable - self.device - self.host, 0)


def history_use(r: RunResult, block_size: int) -> History:
    h = History()
    for rec in r.done.values():
        if rec.turn == 0:
            continue
        # The previous turn computed KV for all of it but its last answer token; full blocks are cached.
        cacheable = (rec.history_len - 1) // block_size * block_size
        h.prompt += rec.prompt_len
        h.cacheable += cacheable
        h.host += rec.host_hits
        h.device += rec.num_cached - rec.host_hits
    return h


def gaps(r: RunResult) -> list[float]:
    return [
        b - a for rec in r.done.values() for a, b in zip(rec.token_times, rec.token_times[1:], strict=False)
    ]


def same_outputs(base: RunResult, other: RunResult) -> tuple[int, int, int, int, list[str]]:
    """(greedy identical, greedy, sampled identical, sampled, the differing request ids with the first position
    that differs)."""
    g_same = g_all = s_same = s_all = 0
    diffs: list[str] = []
    for rid, rec in base.done.items():
        mine = other.done[rid].token_ids
        same = mine == rec.token_ids
        if rec.greedy:
            g_all, g_same = g_all + 1, g_same + same
        else:
            s_all, s_same = s_all + 1, s_same + same
        if not same:
            pos = next((i for i, (x, y) in enumerate(zip(rec.token_ids, mine, strict=False)) if x != y), -1)
            diffs.append(f"{rid}@{pos}")
    return g_same, g_all, s_same, s_all, diffs


def ms(x: float) -> str:
    return f"{1e3 * x:.0f}"


def table(results: list[RunResult], block_size: int) -> list[str]:
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, f: Callable[[RunResult], str]) -> None:
        rows.append((name, [f(r) for r in results]))

    def ttft(r: RunResult, later: bool = False) -> list[float]:
        return [rec.first_token - rec.arrival for rec in r.done.values() if not later or rec.turn > 0]

    def copies(r: RunResult, d: str) -> str:
        n, b, s = (
            r.stats["kv_copies"].get(d, 0),
            r.stats["kv_copy_bytes"].get(d, 0),
            r.stats["kv_copy_seconds"].get(d, 0.0),
        )
        if not n:
            return "-"
        blocks = b / r.block_bytes
        rate = f"{b / s / 1e9:.2f}" if s > 0 else "-"
        return f"{n} / {b / 1e6:.0f} MB / {s:.2f} s / {blocks / n:.1f} / {rate}"

    row("P50 / P99 TTFT (ms)", lambda r: f"{ms(pct(ttft(r), 50))} / {ms(pct(ttft(r), 99))}")
    row(
        "P50 / P99 TTFT, turns >= 2 (ms)",
        lambda r: f"{ms(pct(ttft(r, True), 50))} / {ms(pct(ttft(r, True), 99))}",
    )
    row("P50 / P99 TBT (ms)", lambda r: f"{ms(pct(gaps(r), 50))} / {ms(pct(gaps(r), 99))}")
    row(
        "output tok/s (makespan s)",
        lambda r: f"{r.stats['generation_tokens'] / r.makespan_s:.1f} ({r.makespan_s:.1f})",
    )
    row(
        "preemptions: swap / recompute (requests preempted, most times one)",
        lambda r: (
            f"{r.stats['num_swap_preemptions']} / "
            f"{r.stats['num_preemptions'] - r.stats['num_swap_preemptions']} "
            f"({len(r.preempted)}, {max(r.preempted.values(), default=0)})"
        ),
    )
    row("recomputed tokens (after preemption)", lambda r: str(r.stats["recomputed_tokens"]))
    row("prompt tokens computed (incl. recompute)", lambda r: str(r.stats["prompt_tokens"]))
    row(
        "prefix hit rate (hit / queried tokens)",
        lambda r: (
            f"{100 * r.stats['prefix_cache_hits'] / max(r.stats['prefix_cache_queries'], 1):.1f}% "
            f"({r.stats['prefix_cache_hits']} / {r.stats['prefix_cache_queries']})"
        ),
    )
    row("host-tier hit tokens", lambda r: str(r.stats["prefix_cache_host_hits"]))
    hist = {r.key: history_use(r, block_size) for r in results}
    row(
        "turns >= 2: cached history tokens from device / host / recomputed",
        lambda r: (
            f"{hist[r.key].device} / {hist[r.key].host} / {hist[r.key].missed} of {hist[r.key].cacheable}"
        ),
    )
    row(
        "share of turn >= 2 prompt tokens from the host tier",
        lambda r: f"{100 * hist[r.key].host / max(hist[r.key].prompt, 1):.1f}%",
    )
    moved = ("demoted", "promoted", "swapped_out", "swapped_in", "reused")
    row(
        "blocks moved: " + " / ".join(moved),
        lambda r: " / ".join(str(r.stats["kv_blocks_moved"].get(k, 0)) for k in moved),
    )
    row("copies out: n / bytes / s / blocks per copy / GB/s", lambda r: copies(r, "out"))
    row("copies in: n / bytes / s / blocks per copy / GB/s", lambda r: copies(r, "in"))
    row("peak context in engine (tokens)", lambda r: str(r.peak_context))
    row(
        "wall s / CPU s (cores used) / max load",
        lambda r: (
            f"{r.wall_s:.1f} / {r.cpu_s:.1f} ({r.cpu_s / r.wall_s:.2f}) / "
            + ("-" if r.max_load is None else f"{r.max_load:.1f}")
        ),
    )

    lines = ["| metric | " + " | ".join(LABELS[r.key] for r in results) + " |"]
    lines.append("| --- |" + " --- |" * len(results))
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows]
    return lines


def machine_info(num_threads: int) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"machine: {cpu}, {cores} usable cores of {os.cpu_count()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads (--num-threads {num_threads}); Python {platform.python_version()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Before torch loads libgomp, which reads it once. The host tier's copier thread runs torch copies, which
    # start a second OpenMP team; libgomp then counts more threads than cores and stops spin-waiting, so the
    # forward pass of (b)-(d) runs as if PASSIVE while (a) spins. On a machine shared with other processes a
    # spinning team is many times slower (a descheduled worker stalls every parallel region), on an idle one
    # faster: either way (a) would differ from (b)-(d) for a reason that has nothing to do with preemption.
    # PASSIVE gives every configuration the same threading (and is what `drift serve` gets, see
    # docs/benchmarks.md).
    omp_note = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (from the environment)"
    if args.omp_wait_policy != "inherit" and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
        omp_note = f"OMP_WAIT_POLICY={args.omp_wait_policy} (--omp-wait-policy)"
        if "torch" in sys.modules:
            omp_note += ", but torch was loaded before: no effect"
    from drift_agent.bench.machine import MachineMonitor
    from drift_agent.core.config import EngineConfig

    block_size = EngineConfig.model_fields["block_size"].default
    print(
        "command: python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]), flush=True
    )

    convs = make_workload(args, vocab_size(args.model))
    need, pool = longest_context(convs), args.num_kv_blocks * block_size
    if need > pool:
        print(
            f"bench_swap.py: error: the longest conversation needs {need} tokens but the pool holds {pool}: "
            f"raise --num-kv-blocks to at least {-(-need // block_size)}",
            file=sys.stderr,
        )
        return 2
    print(
        f"workload: {args.clients} clients x {args.conversations} conversations x {args.turns} turns = "
        f"{sum(len(c.turns) for c in convs)} requests, longest context {need} tokens; device pool "
        f"{args.num_kv_blocks} blocks = {pool} tokens; host tier {args.swap_space_gb:g} GiB for (b)-(d)",
        flush=True,
    )
    results: list[RunResult] = []
    with MachineMonitor() as monitor:
        for key, mode, host in CONFIGS:
            r = run_config(key, mode, host, convs, args)
            results.append(r)
            s = r.stats
            print(
                f"{LABELS[key]}: {len(r.done)} requests in {r.wall_s:.1f} s, {s['num_preemptions']} preemptions "
                f"({s['num_swap_preemptions']} swap), peak context {r.peak_context} tokens "
                f"({r.peak_context / pool:.1f}x the pool), invariants {r.invariants}",
                flush=True,
            )
    print(machine_info(args.num_threads) + "; " + omp_note)
    load = monitor.result
    if load is not None:
        print(f"machine load: max 1-min load average {load.max_load_1m}, steal {load.steal_fraction}")
        if load.warning():
            print("WARNING: " + load.warning())
    print()
    print("\n".join(table(results, block_size)))
    print()
    print(
        "TTFT from the precomputed arrival; TBT: gaps between a request's successive tokens (preemption stalls "
        "included); copies: runs of contiguous blocks, per direction (out: device to host)."
    )
    for r in results:
        if not r.host_hits_match:
            print(f"note: {LABELS[r.key]}: per-request host hits do not add up to the engine's counter")
        if sum(r.preempted.values()) != r.stats["num_preemptions"]:
            print(f"note: {LABELS[r.key]}: per-request preemptions do not add up to the engine's counter")

    # Same tokens everywhere: greedy decoding must not depend on batch composition, preemption or where KV came
    # from; seeded sampling must reproduce too.
    base = results[0]
    print()
    all_same = True
    for r in results[1:]:
        g_same, g_all, s_same, s_all, diffs = same_outputs(base, r)
        all_same &= not diffs
        more = f"; differ (request@first token): {', '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}"
        print(
            f"outputs of {LABELS[r.key]} vs (a): greedy {g_same}/{g_all} identical, seeded sampling "
            f"{s_same}/{s_all} identical{more if diffs else ''}"
        )
    print(f"output check: {'identical across configurations' if all_same else 'OUTPUTS DIFFER (see above)'}")

    by = {r.key: r for r in results}
    print()
    ha, hb = history_use(by["a"], block_size), history_use(by["b"], block_size)
    if ha.missed:
        share = hb.host / ha.missed
        evicted_b = hb.host + hb.missed
        print(
            f"(i) history of turns >= 2 evicted from the device pool: (a) recomputes {ha.missed} tokens; (b) "
            f"promotes {hb.host} from the host tier ({100 * share:.0f}% of (a)'s recomputed history; "
            f"{100 * hb.host / max(evicted_b, 1):.0f}% of the {evicted_b} tokens (b) itself found evicted) and "
            f"recomputes {hb.missed}; prompt tokens computed {by['a'].stats['prompt_tokens']} -> "
            f"{by['b'].stats['prompt_tokens']}. Host tier turns at least half of (a)'s recomputed history into "
            f"copies: {'yes' if share >= 0.5 else 'no'}"
        )
    else:
        print(
            "(i) nothing to compare: (a) recomputed no history of turns >= 2 (no evictions; shrink the pool)"
        )
    p99 = {k: pct([d.first_token - d.arrival for d in by[k].done.values()], 99) for k in by}

    def vs(k: str) -> str:
        change = p99["c"] / p99[k] - 1
        return f"{'lower' if change < 0 else 'not lower'} ({100 * change:+.1f}%)"

    print(
        f"(ii) P99 TTFT: swap (c) {ms(p99['c'])} ms vs recompute (a) {ms(p99['a'])} ms: {vs('a')}; vs recompute "
        f"+ host tier (b) {ms(p99['b'])} ms: {vs('b')}; auto (d) {ms(p99['d'])} ms. P99 of {len(base.done)} "
        "requests is about their maximum: differences of a few percent are within one run's noise."
    )
    if sum(r.stats["num_preemptions"] for r in results) == 0:
        print("WARNING: no preemptions in any configuration: the comparison is empty; shrink --num-kv-blocks")
    return 0


def vocab_size(model: str | None) -> int:
    """The model's vocabulary size, from its config (without loading the weights)."""
    import json
    from pathlib import Path

    if model is None:
        from drift_agent.models.embedded import embedded_model_dir

        path = embedded_model_dir()
    else:
        from drift_agent.models.loader import resolve_model_path

        path = Path(resolve_model_path(model))
    return int(json.loads((path / "config.json").read_text())["vocab_size"])


if __name__ == "__main__":
    sys.exit(main())
