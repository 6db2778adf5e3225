"""SLO-aware dispatcher: which SM split, which prefills, and how many prefill layers to launch now.

Pure decision logic: no tensors, no I/O, no clock (the current time is `DispatchState.now_s`). The engine's
lanes (`mux_loop.MuxLanes`) call `Dispatcher.decide` whenever the prefill lane is free (after every prefill layer
block, and after every decode step while no prefill runs), execute the decision, and log the predicted latencies
next to the measured ones.

Rules (mode `slo`):

0. *TPOT margin.* Every rule below plans decode against the running batch's tightest step budget divided by
   `1 + tpot_margin` (the operator's SLO loop steers the margin): > 0 keeps decode on more SMs and folds less,
   defending TPOT when the performance model underestimates the device; < 0 gives prefill more SMs and folds
   more, favouring TTFT. At 0 the budget is the requests' own.
1. Decode gets the *smallest* SM share whose predicted step time, with the contention factor when prefill
   co-runs, fits the tightest step budget among the running requests; prefill gets the rest. The step budget
   of a request follows its TPOT target and its slack (see `DecodeRequest.step_budget`).
2. No prefill work → decode gets the whole device; no decode → prefill gets the whole device.
3. New prefills are taken by priority (lower first), then earliest-deadline-first (requests that cannot meet
   their TTFT even alone on the whole GPU go last within their priority), within free KV blocks (minus a
   watermark), a token budget and a batch cap. The head of the queue is never skipped for a later, smaller
   request (so large prompts cannot starve); a request that would make an already-picked request miss its
   TTFT is not added.
4. A prefill is launched a block of layers at a time, sized so one block takes about `block_decode_steps`
   decode steps; the dispatcher re-decides after each block (decode steps run back to back beside it, see
   `mux_loop`). With no decode running, all remaining layers go at once.
5. A waiting prefill may *overtake* the in-flight one only if it is shorter than the in-flight one's remaining
   time, has an earlier deadline, would miss its TTFT by waiting but meets it by overtaking, and the in-flight
   one still meets its own TTFT afterwards. Never recursively: nothing overtakes while a prefill is paused.
6. When no mixed split meets the decode budget, degrade predictably, *decode first with a bounded prefill
   stall*: decode runs alone on the whole device (the fastest it can be; TPOT wins) for up to
   `max_prefill_stall_steps` consecutive decisions, then prefill gets one turn on the mixed split with the
   largest decode share (or, on a device without mixed splits, one layer block sized to one decode budget while
   decode waits), and the count restarts. So TTFT degrades boundedly and TPOT degrades only on the turn steps.
7. *Just enough prefill when slots are the bottleneck.* Rule 1's split is the fastest prefill the decode budget
   allows. When more requests wait than there are free sequence slots (`DispatchState.slot_bound`), decode
   speed is what admits them, so when the planned prefill does not need rule 1's share, decode keeps more SMs:
   the mixed split with the most decode SMs on which the planned prefill, and after it each admissible waiting
   request in EDF order, still finishes within `prefill_slack_share` of its slack to its TTFT deadline. Why:
   with a loose TPOT target rule 1 hands prefill most of the device for a prompt that needs a few milliseconds
   of it, while every running decode step crawls on the remainder; with the slots full that caps throughput at
   slots / (output length x step time), and the queue grows without bound (simulated ShareGPT-like at 40 req/s,
   TPOT 100 ms: P90 TTFT 84 s before this rule, 0.45 s after; static-split 47 ms). With free slots, prefill
   speed is what serves the queue and rule 1 stands (applied there too, this rule cost 8% of the paper-regime
   goodput).
8. *Fold short prompts into the decode step.* With no prefill started, the queue's head may instead join the
   decode step as a mixed batch on the decode end of the splits (chunked prefill's one pass, on the whole
   device): as many waiting requests, in rule 3's order and within `fold_max_tokens`, as keep that step within
   the decode budget. The dispatcher folds when rule 1 would start no prefill (decode first, or nothing fits
   the prefill SMs), or when the fold takes the whole launch rule 1 planned (folding only part of it would
   delay the rest by a step, while the planned job would have started all of it at once). Why: a short
   prompt's GEMMs ride along a memory-bound decode step almost for free, while splitting SMs for it slows
   every decode and pays the contention factor on both sides (simulated ShareGPT-like chat: chunked prefill
   beat drift 1.2-1.3x in goodput before this rule; see docs/benchmarks.md). Long prompts still multiplex.

Mode `static` (the `static-split` policy, for comparisons): one fixed split for both phases, whatever the load;
prefill selection and layer blocks as above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any, Literal

from ..partition.base import Split
from ..partition.splits import nearest_split
from .perf_model import PerfModel, PrefillShape


@dataclass(frozen=True)
class DecodeRequest:
    """A request in the running decode batch."""

    request_id: str
    context_tokens: int  # KV tokens it holds (prompt + generated so far)
    tpot_target_s: float
    tokens_since_first: int = 0  # output tokens produced after the first one
    time_since_first_token_s: float = 0.0

    def step_budget(self, max_borrow: float, catch_up_floor: float) -> float:
        return step_budget(
            self.tpot_target_s,
            self.tokens_since_first,
            self.time_since_first_token_s,
            max_borrow,
            catch_up_floor,
        )


def step_budget(
    tpot_target_s: float,
    tokens_since_first: int,
    time_since_first_token_s: float,
    max_borrow: float,
    catch_up_floor: float,
) -> float:
    """Time a request's next decode step may take so its average TPOT stays on target.

    After one more token the average is (elapsed + t) / (n + 1) ≤ target ⇔ t ≤ target·(n+1) − elapsed.
    The slack banked by a request ahead of schedule is capped at `max_borrow`·target (1.0 = a strict
    per-token budget); a request behind schedule must catch up, but its budget is floored at
    `catch_up_floor`·target so one late request cannot demand an impossible step.
    """
    t = tpot_target_s
    slack = t * (tokens_since_first + 1) - time_since_first_token_s
    return min(max(slack, catch_up_floor * t), max_borrow * t)


@dataclass(frozen=True)
class DecodeLoad:
    """The running decode batch as the dispatcher uses it: size, KV tokens, tightest step budget. A policy
    with many running requests passes this summary instead of one `DecodeRequest` each."""

    batch: int = 0
    kv_tokens: int = 0
    step_budget_s: float | None = None  # None when the batch is empty

    @classmethod
    def of(cls, requests: Sequence[DecodeRequest], max_borrow: float, catch_up_floor: float) -> DecodeLoad:
        if not requests:
            return cls()
        return cls(
            len(requests),
            sum(r.context_tokens for r in requests),
            min(r.step_budget(max_borrow, catch_up_floor) for r in requests),
        )


@dataclass(frozen=True)
class PrefillRequest:
    """A request waiting for its prefill."""

    request_id: str
    new_tokens: int
    cached_tokens: int
    arrival_s: float
    ttft_deadline_s: float  # absolute time the first token is due
    kv_blocks: int  # KV blocks its prefill must allocate
    priority: int = 0  # lower goes first (vLLM's `priority`); EDF within a priority

    @cached_property
    def shape(self) -> PrefillShape:
        return PrefillShape(self.new_tokens, self.cached_tokens)


@dataclass(frozen=True)
class InFlightPrefill:
    """A prefill batch that has started (some layers done) — the active one, or one that was overtaken."""

    request_ids: tuple[str, ...]
    shapes: tuple[PrefillShape, ...]
    layers_done: int
    ttft_deadline_s: float  # earliest deadline in the batch


@dataclass(frozen=True)
class DispatchState:
    now_s: float
    splits: Sequence[Split]
    decode: Sequence[DecodeRequest] = ()
    decode_load: DecodeLoad | None = None  # a summary of `decode`, used instead of it when given
    waiting: Sequence[PrefillRequest] = ()
    free_kv_blocks: int = 0
    in_flight: InFlightPrefill | None = None
    paused: InFlightPrefill | None = None  # overtaken by `in_flight`; resumes when it finishes
    # More requests wait than there are free sequence slots: finishing decodes, not prefill, admits them.
    slot_bound: bool = False


class PrefillAction(str, Enum):
    NONE = "none"
    LAUNCH = "launch"  # start a new batch (`launch_ids`)
    CONTINUE = "continue"  # next layer block of `in_flight`
    OVERTAKE = "overtake"  # pause `in_flight`, start a new batch (`launch_ids`)
    RESUME = "resume"  # `in_flight` is done; continue the paused batch
    FOLD = "fold"  # run `launch_ids` whole inside the decode step (rule 8), not on the prefill lane


Mode = Literal[
    "idle", "decode-only", "prefill-only", "multiplex", "decode-first", "prefill-turn", "fold", "static"
]


@dataclass(frozen=True)
class DispatchDecision:
    split: Split
    mode: Mode
    run_decode: bool
    prefill_action: PrefillAction
    launch_ids: tuple[str, ...]  # new prefills to start, in EDF order (LAUNCH / OVERTAKE / FOLD)
    prefill_layers: int  # layers of the active prefill batch to launch now (0: none)
    predicted_decode_step_s: float | None
    predicted_prefill_block_s: float | None
    predicted_prefill_remaining_s: float | None  # whole remaining prefill of the active batch
    predicted_ttft_s: Mapping[str, float]  # absolute predicted first-token time of the active batch
    decode_budget_s: float | None  # tightest step budget of the running requests / (1 + tpot_margin)
    reason: str

    @property
    def tpot_ok(self) -> bool:
        if self.decode_budget_s is None or self.predicted_decode_step_s is None:
            return True
        return self.predicted_decode_step_s <= self.decode_budget_s

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, for the decision trace."""
        return {
            "split": [self.split.prefill_sms, self.split.decode_sms],
            "mode": self.mode,
            "run_decode": self.run_decode,
            "prefill_action": self.prefill_action.value,
            "launch_ids": list(self.launch_ids),
            "prefill_layers": self.prefill_layers,
            "predicted_decode_step_s": self.predicted_decode_step_s,
            "predicted_prefill_block_s": self.predicted_prefill_block_s,
            "predicted_prefill_remaining_s": self.predicted_prefill_remaining_s,
            "predicted_ttft_s": dict(self.predicted_ttft_s),
            "decode_budget_s": self.decode_budget_s,
            "tpot_ok": self.tpot_ok,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class DispatcherConfig:
    mode: Literal["slo", "static"] = "slo"
    static_prefill_share: float = 0.5  # static mode: the mixed split nearest this prefill share
    max_prefill_tokens: int = (
        16384  # token budget of one new prefill batch (a longer single prompt goes alone)
    )
    max_prefill_batch: int = 64
    kv_watermark_blocks: int = 0  # KV blocks kept free for decode growth
    # A prefill layer block ≈ this many predicted decode steps. The lanes run decode steps back to back under
    # a block, so a block only sets how often the dispatcher re-decides (split, overtakes); 4 gave the best
    # goodput in simulation (paper regime 12.1 -> 13.1 req/s, ShareGPT-like 43 -> 46 against 1 step).
    block_decode_steps: float = 4.0
    prefill_only_block_s: float | None = None  # block length with no decode running; None = all layers
    # Rule 0: decode plans against step budget / (1 + tpot_margin); > 0 defends TPOT, < 0 favours TTFT.
    tpot_margin: float = 0.0
    # Rule 7: share of a planned prefill's slack it may use when decode takes SMs back (0: always rule 1's
    # fastest prefill, as the paper's dispatcher does). The rest absorbs prediction error and new arrivals.
    prefill_slack_share: float = 0.5
    # TPOT is an average over a request's output, so a request ahead of schedule may spend its banked slack
    # on a step up to this many times its target (ShareGPT-like, TPOT 15 ms: goodput 46 -> 49 req/s from 1x).
    max_slack_borrow: float = 2.0
    catch_up_floor: float = 0.5
    max_prefill_stall_steps: int = 8
    allow_overtake: bool = True
    overtake_only_if_needed: bool = True
    deprioritize_hopeless: bool = True
    protect_batch_deadlines: bool = True
    # Rule 8: most prompt tokens folded into one decode step (0: never fold, the paper's dispatcher).
    fold_max_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.mode not in ("slo", "static"):
            raise ValueError(f"dispatcher mode must be 'slo' or 'static', got {self.mode!r}")
        if not 0.0 < self.static_prefill_share < 1.0:
            raise ValueError("static_prefill_share must be in (0, 1)")
        if self.max_prefill_tokens <= 0 or self.max_prefill_batch <= 0 or self.block_decode_steps <= 0:
            raise ValueError("max_prefill_tokens, max_prefill_batch and block_decode_steps must be positive")
        if min(self.kv_watermark_blocks, self.max_prefill_stall_steps, self.fold_max_tokens) < 0:
            raise ValueError("kv_watermark_blocks, max_prefill_stall_steps and fold_max_tokens must be >= 0")
        if not self.tpot_margin > -1.0:
            raise ValueError(f"tpot_margin must be > -1 (budget / (1 + margin)), got {self.tpot_margin}")
        if not 0.0 < self.catch_up_floor <= 1.0 <= self.max_slack_borrow:
            raise ValueError("need 0 < catch_up_floor <= 1 <= max_slack_borrow")
        if not 0.0 <= self.prefill_slack_share <= 1.0:
            raise ValueError("prefill_slack_share must be in [0, 1]")


_FOLDABLE = ("multiplex", "decode-first", "prefill-turn")  # modes with decode running and prefill to start


@dataclass(frozen=True)
class _SplitRoles:
    prefill_end: Split  # most prefill SMs
    decode_end: Split  # most decode SMs
    mixed: tuple[Split, ...]  # splits with SMs for both phases, fewest decode SMs first
    static: Split | None  # static mode's fixed split


@dataclass
class _Plan:
    action: PrefillAction = PrefillAction.NONE
    launch: tuple[PrefillRequest, ...] = ()
    shapes: tuple[PrefillShape, ...] = ()
    ids: tuple[str, ...] = ()
    start_layer: int = 0
    note: str = ""
    extra: list[str] = field(default_factory=list)


class Dispatcher:
    """Stateful only in the prefill-stall counter of rule 6 (deterministic; `reset()` clears it) and a memo of
    whole-device prefill times by shape."""

    def __init__(self, model: PerfModel, config: DispatcherConfig | None = None) -> None:
        self.model = model
        self.config = config or DispatcherConfig()
        self._stall_steps = 0
        self._alone: dict[tuple[int, int], float] = {}
        self._roles_memo: tuple[Sequence[Split], _SplitRoles] | None = None

    def reset(self) -> None:
        self._stall_steps = 0

    @property
    def prefill_stall_steps(self) -> int:
        return self._stall_steps

    def restore_stall_steps(self, steps: int) -> None:
        """Undo the count of a decision that was not acted on (the engine's lanes decide again at a sync)."""
        self._stall_steps = steps

    # --- helpers ------------------------------------------------------------------------------------
    def _roles(self, splits: Sequence[Split]) -> _SplitRoles:
        """What each decision needs to know of the splits; kept while the same tuple of splits is passed (the
        policies pass theirs every decision; a list could change, so it is read afresh)."""
        memo = self._roles_memo
        if memo is not None and memo[0] is splits:
            return memo[1]
        prefill_end = max(splits, key=lambda s: (s.prefill_sms, -s.decode_sms))
        decode_end = max(splits, key=lambda s: (s.decode_sms, -s.prefill_sms))
        if prefill_end.prefill_sms == 0 or decode_end.decode_sms == 0:
            raise ValueError("splits must give prefill SMs in one split and decode SMs in one split")
        mixed = sorted((s for s in splits if s.is_mixed), key=lambda s: (s.decode_sms, -s.prefill_sms))
        static = None
        if self.config.mode == "static":
            if not mixed:
                raise ValueError("static mode needs a mixed split (both phases with SMs)")
            static = nearest_split(list(splits), self.config.static_prefill_share)
        roles = _SplitRoles(prefill_end, decode_end, tuple(mixed), static)
        if type(splits) is tuple:
            self._roles_memo = (splits, roles)
        return roles

    def decode_alone_split(self, splits: Sequence[Split]) -> Split:
        """The split a decision takes with decode running and nothing to prefill: static mode's fixed split,
        otherwise every SM to decode (rule 2)."""
        roles = self._roles(splits)
        return roles.static if roles.static is not None else roles.decode_end

    def _alone_s(self, r: PrefillRequest) -> float:
        """Prefill time of `r` alone on the whole device, memoised by shape (a decision may sort a long queue)."""
        key = (r.new_tokens, r.cached_tokens)
        t = self._alone.get(key)
        if t is None:
            if len(self._alone) >= 65536:
                self._alone.clear()
            t = self._alone[key] = self.model.prefill_time(r.shape, self.model.total_sms)
        return t

    def _hopeless(self, r: PrefillRequest, now: float) -> bool:
        return now + self._alone_s(r) > r.ttft_deadline_s

    def _edf(self, waiting: Sequence[PrefillRequest], now: float) -> list[PrefillRequest]:
        """Rule 3's order. The key runs for every waiting request considered, every decision, so it reads the
        memo of `_alone_s` itself (`_hopeless` inlined; 17% of a 188-request sort)."""
        hopeless, memo, alone_s = self.config.deprioritize_hopeless, self._alone.get, self._alone_s

        def key(r: PrefillRequest) -> tuple:
            late = False
            if hopeless:
                t = memo((r.new_tokens, r.cached_tokens))
                late = now + (alone_s(r) if t is None else t) > r.ttft_deadline_s
            return (r.priority, late, r.ttft_deadline_s, r.arrival_s, r.request_id)

        return sorted(waiting, key=key)

    def _select(
        self,
        ordered: Sequence[PrefillRequest],
        free_blocks: int,
        sms: int,
        contended: bool,
        now: float,
        max_time: float | None = None,
    ) -> list[PrefillRequest]:
        cfg = self.config
        blocks_left = free_blocks - cfg.kv_watermark_blocks
        picked: list[PrefillRequest] = []
        shapes: list[PrefillShape] = []
        tokens = 0
        protected_deadline = math.inf  # earliest TTFT deadline among picked requests that can still meet it
        for r in ordered:
            if r.kv_blocks > blocks_left:
                break  # no backfilling past the head: a large prompt must not starve
            if picked and (
                tokens + r.new_tokens > cfg.max_prefill_tokens or len(picked) >= cfg.max_prefill_batch
            ):
                break
            shapes.append(r.shape)
            t = self.model.prefill_time(shapes, sms, contended=contended)
            if max_time is not None and t > max_time:
                break
            if cfg.protect_batch_deadlines and now + t > protected_deadline:
                break
            picked.append(r)
            blocks_left -= r.kv_blocks
            tokens += r.new_tokens
            if not (cfg.deprioritize_hopeless and self._hopeless(r, now)):
                protected_deadline = min(protected_deadline, r.ttft_deadline_s)
        return picked

    def _decode_fit(
        self, mixed: Sequence[Split], batch: int, kv: int, budget: float
    ) -> tuple[Split | None, float | None]:
        """Smallest-decode mixed split meeting the budget with prefill co-running (`mixed`: by decode SMs)."""
        for s in mixed:
            t = self.model.decode_time(batch, kv, s.decode_sms, contended=True)
            if t <= budget:
                return s, t
        return None, None

    # --- entry point --------------------------------------------------------------------------------
    def decide(self, state: DispatchState) -> DispatchDecision:
        cfg = self.config
        if not state.splits:
            raise ValueError("dispatcher needs at least one split")
        roles = self._roles(state.splits)
        prefill_end, decode_end = roles.prefill_end, roles.decode_end
        now = state.now_s
        load = state.decode_load or DecodeLoad.of(state.decode, cfg.max_slack_borrow, cfg.catch_up_floor)
        batch, kv, budget = load.batch, load.kv_tokens, load.step_budget_s
        if budget is not None and cfg.tpot_margin:  # rule 0, once for every rule (skipped at 0: same floats)
            budget /= 1.0 + cfg.tpot_margin
        ordered = self._edf(state.waiting, now)
        head_fits = bool(ordered) and ordered[0].kv_blocks <= state.free_kv_blocks - cfg.kv_watermark_blocks
        started = state.in_flight is not None or state.paused is not None
        prefill_work = started or head_fits

        # 1. the split ----------------------------------------------------------------------------------
        prefill_runs = prefill_work
        turn = False  # rule 6 prefill turn
        if roles.static is not None:
            split = roles.static
            mode: Mode = "static"
            reason = f"static split {split.label}"
        elif not batch and not prefill_work:
            split, mode, reason = decode_end, "idle", "no work"
        elif not prefill_work:
            split, mode = decode_end, "decode-only"
            reason = "no prefill can start" if state.waiting else "no prefill waiting"
        elif not batch:
            split, mode, reason = prefill_end, "prefill-only", "no decode running"
        else:
            assert budget is not None
            fit, _ = self._decode_fit(roles.mixed, batch, kv, budget)
            if fit is not None:
                split, mode = fit, "multiplex"
                reason = f"smallest decode share meeting {budget * 1e3:.1f} ms step budget"
            elif self._stall_steps < cfg.max_prefill_stall_steps:
                split, mode, prefill_runs = decode_end, "decode-first", False
                reason = (
                    f"no mixed split meets {budget * 1e3:.1f} ms; decode alone, prefill stalled "
                    f"{self._stall_steps + 1}/{cfg.max_prefill_stall_steps}"
                )
            else:
                mixed = [s for s in state.splits if s.is_mixed]
                split = max(mixed, key=lambda s: s.decode_sms) if mixed else prefill_end
                mode, turn = "prefill-turn", True
                reason = f"prefill turn after {self._stall_steps} stalled steps"
        self._stall_steps = self._stall_steps + 1 if mode == "decode-first" else 0

        # 2. the prefill plan ---------------------------------------------------------------------------
        run_decode = batch > 0 and split.decode_sms > 0
        p_sms = split.prefill_sms
        plan = _Plan()
        if prefill_runs and p_sms > 0:
            plan = self._plan_prefill(state, ordered, p_sms, contended=run_decode)
            if mode == "multiplex" and state.slot_bound and plan.action != PrefillAction.NONE:
                assert budget is not None
                relaxed = self._just_enough(state, ordered, plan, split, batch, kv, budget)
                if relaxed is not split:
                    split, p_sms = relaxed, relaxed.prefill_sms
                    reason = f"most decode SMs leaving the prefill enough ({budget * 1e3:.1f} ms step budget)"

        # 3. rule 8: the queue's head inside the decode step instead (before costing rule 1's plan) -------
        if cfg.fold_max_tokens and head_fits and not started and mode in _FOLDABLE and budget is not None:
            fold = self._fold(state, ordered, decode_end.decode_sms, batch, kv, budget)
            if fold is not None and (
                plan.action == PrefillAction.NONE or set(plan.ids) <= {r.request_id for r in fold[0]}
            ):
                picked, t_fold = fold
                self._stall_steps = 0  # prefill makes progress
                return DispatchDecision(
                    split=decode_end,
                    mode="fold",
                    run_decode=True,
                    prefill_action=PrefillAction.FOLD,
                    launch_ids=tuple(r.request_id for r in picked),
                    prefill_layers=0,
                    predicted_decode_step_s=t_fold,
                    predicted_prefill_block_s=t_fold,
                    predicted_prefill_remaining_s=t_fold,
                    predicted_ttft_s={r.request_id: now + t_fold for r in picked},
                    decode_budget_s=budget,
                    reason=f"fold {len(picked)} request(s) into the decode step: {t_fold * 1e3:.1f} ms "
                    f"within the {budget * 1e3:.1f} ms step budget",
                )

        # 4. predictions and layer count ----------------------------------------------------------------
        prefill_active = plan.action != PrefillAction.NONE
        decode_step = (
            self.model.decode_time(batch, kv, split.decode_sms, contended=prefill_active)
            if run_decode
            else None
        )
        layers = 0
        block_s = remaining_s = None
        ttft: dict[str, float] = {}
        if prefill_active:
            if decode_step is not None:
                target = cfg.block_decode_steps * decode_step
            elif turn and budget is not None:
                target = budget  # decode waits for this block: keep it to about one step budget
            else:
                target = cfg.prefill_only_block_s if cfg.prefill_only_block_s is not None else math.inf
            layers, block_s, remaining_s = self.model.layer_block(
                plan.shapes, p_sms, plan.start_layer, target, contended=run_decode
            )
            ttft = {rid: now + remaining_s for rid in plan.ids}
            reason += f"; prefill {plan.action.value}{plan.note}"
        elif prefill_work and mode != "decode-first":
            reason += "; no prefill fits"

        return DispatchDecision(
            split=split,
            mode=mode,
            run_decode=run_decode,
            prefill_action=plan.action,
            launch_ids=tuple(r.request_id for r in plan.launch),
            prefill_layers=layers,
            predicted_decode_step_s=decode_step,
            predicted_prefill_block_s=block_s,
            predicted_prefill_remaining_s=remaining_s,
            predicted_ttft_s=ttft,
            decode_budget_s=budget,
            reason=reason,
        )

    def _fold(
        self,
        state: DispatchState,
        ordered: list[PrefillRequest],
        sms: int,
        batch: int,
        kv: int,
        budget: float,
    ) -> tuple[list[PrefillRequest], float] | None:
        """Rule 8: the longest head of `ordered` (rule 3's order, never skipping the head) whose prompts, run
        whole inside the decode step of `batch` rows on `sms` SMs, keep that step within `budget`; with the
        step's predicted time. None when not even the head fits."""
        cfg = self.config
        blocks_left = state.free_kv_blocks - cfg.kv_watermark_blocks
        picked: list[PrefillRequest] = []
        shapes: list[PrefillShape] = []
        tokens, t_fold = 0, 0.0
        for r in ordered:
            if (
                r.kv_blocks > blocks_left
                or tokens + r.new_tokens > cfg.fold_max_tokens
                or len(picked) >= cfg.max_prefill_batch
            ):
                break
            shapes.append(r.shape)
            t = self.model.mixed_step_time(shapes, batch, kv, sms)
            if t > budget:
                break
            picked.append(r)
            blocks_left -= r.kv_blocks
            tokens += r.new_tokens
            t_fold = t
        return (picked, t_fold) if picked else None

    def _plan_deadline(self, state: DispatchState, plan: _Plan) -> float:
        """The earliest TTFT deadline in the planned prefill that can still be met (for a new batch, judged by
        whole-device prefill time as rule 3 does; inf: none)."""
        if plan.action == PrefillAction.LAUNCH:
            live = [r.ttft_deadline_s for r in plan.launch if not self._hopeless(r, state.now_s)]
            return min(live, default=math.inf)
        job = state.in_flight if plan.action == PrefillAction.CONTINUE else state.paused
        return job.ttft_deadline_s if job is not None else math.inf

    def _just_enough(
        self,
        state: DispatchState,
        ordered: list[PrefillRequest],
        plan: _Plan,
        fastest: Split,
        batch: int,
        kv: int,
        budget: float,
    ) -> Split:
        """Rule 7: the mixed split with the most decode SMs that meets the decode budget and on which the
        planned prefill, and then the waiting ones in EDF order, each finish within `prefill_slack_share` of
        their slack; `fastest` (rule 1's split) when none does or the plan overtakes (urgent by construction).
        The queue is costed by its whole-device times scaled by the plan's slowdown on the split (one pass
        over it, with memoised times)."""
        cfg, model, now = self.config, self.model, state.now_s
        share = cfg.prefill_slack_share
        if share <= 0 or plan.action == PrefillAction.OVERTAKE:
            return fastest
        start, layers = plan.start_layer, model.num_layers - plan.start_layer
        plan_work = work = model.prefill_layers_time(plan.shapes, model.total_sms, start, layers)
        if work <= 0:
            return fastest
        # The largest slowdown against the whole device that keeps every deadline within its share of slack.
        deadline = self._plan_deadline(state, plan)
        limit = share * (deadline - now) / work if math.isfinite(deadline) else math.inf
        planned = set(plan.ids)
        for r in ordered:
            if limit <= 1.0:
                return fastest  # no split is faster than the whole device
            if r.request_id in planned or self._hopeless(r, now):
                continue
            work += self._alone_s(r)
            limit = min(limit, share * (r.ttft_deadline_s - now) / work)
        # An infinite limit means no deadline is left to keep (all late): prefill speed gains nothing, so decode
        # takes the most SMs.
        allowed = limit * plan_work
        for s in sorted(
            (s for s in state.splits if s.is_mixed and s.decode_sms > fastest.decode_sms),
            key=lambda s: (-s.decode_sms, s.prefill_sms),
        ):
            t = model.decode_time(batch, kv, s.decode_sms, contended=True)
            if t > budget:
                continue
            if (
                model.prefill_layers_time(plan.shapes, s.prefill_sms, start, layers, contended=True)
                <= allowed
            ):
                return s
        return fastest

    def _plan_prefill(
        self, state: DispatchState, ordered: list[PrefillRequest], sms: int, contended: bool
    ) -> _Plan:
        now, cfg = state.now_s, self.config
        active = state.in_flight
        if active is None and state.paused is not None:
            p = state.paused
            return _Plan(PrefillAction.RESUME, (), p.shapes, p.request_ids, p.layers_done)
        if active is None:
            picked = self._select(ordered, state.free_kv_blocks, sms, contended, now)
            if not picked:
                return _Plan()
            return _Plan(
                PrefillAction.LAUNCH,
                tuple(picked),
                tuple(r.shape for r in picked),
                tuple(r.request_id for r in picked),
                0,
                f" {len(picked)} request(s)",
            )
        cont = _Plan(PrefillAction.CONTINUE, (), active.shapes, active.request_ids, active.layers_done, "")
        if not (cfg.allow_overtake and state.paused is None and ordered):
            return cont
        # Rule 5: a short, earlier-deadline batch may overtake if the in-flight one still meets its TTFT.
        rem = self.model.prefill_layers_time(
            active.shapes,
            sms,
            active.layers_done,
            self.model.num_layers - active.layers_done,
            contended=contended,
        )
        slack = active.ttft_deadline_s - (now + rem)  # time the in-flight batch can still give away
        if slack <= 0:
            return cont
        eligible = [
            r
            for r in ordered
            if r.ttft_deadline_s < active.ttft_deadline_s
            and not (cfg.deprioritize_hopeless and self._hopeless(r, now))
        ]
        picked = self._select(eligible, state.free_kv_blocks, sms, contended, now, max_time=min(rem, slack))
        if not picked:
            return cont
        t_w = self.model.prefill_time([r.shape for r in picked], sms, contended=contended)
        if t_w >= rem or now + t_w + rem > active.ttft_deadline_s:
            return cont
        rescued = [r for r in picked if now + t_w <= r.ttft_deadline_s < now + rem + t_w]
        if cfg.overtake_only_if_needed and not rescued:
            return cont
        return _Plan(
            PrefillAction.OVERTAKE,
            tuple(picked),
            tuple(r.shape for r in picked),
            tuple(r.request_id for r in picked),
            0,
            f" {len(picked)} request(s) ahead of {len(active.request_ids)} in flight",
        )
