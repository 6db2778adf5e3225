"""SLO-aware dispatcher: which SM split, which prefills, and how many prefill layers to launch now.

Pure decision logic: no tensors, no I/O, no clock (the current time is `DispatchState.now_s`). The engine's
lanes (`mux_loop.MuxLanes`) call `Dispatcher.decide` whenever the prefill lane is free (after every prefill
layer block, and after every decode step while no prefill runs), execute the decision, and log the predicted
latencies next to the measured ones.

`decide` runs five stages, each refining the draft of the one before; only the last builds the decision:

- *choose the split* (`_choose_split`): the split and mode, by the tpot margin, lone phase, smallest decode
  share and decode first rules (static mode: the fixed split);
- *plan prefill* (`_plan_prefill`): what the split's prefill SMs run, by the prefill order and overtaking
  rules;
- *relax for slot-bound load* (`_relax_for_slots`): the just enough prefill rule;
- *try a fold* (`_try_fold`): the folding rule, which may replace the split and the plan;
- *cost the plan* (`_cost`): the layer blocks rule, the predicted latencies and the `DispatchDecision`.

Rules (mode `slo`), by name:

- *tpot margin*: every rule plans decode against the running batch's tightest step budget divided by
  `1 + tpot_margin` (the operator's SLO loop steers the margin): > 0 keeps decode on more SMs and folds less,
  defending TPOT when the performance model underestimates the device; < 0 gives prefill more SMs and folds
  more, favouring TTFT. At 0 the budget is the requests' own.
- *smallest decode share*: decode gets the smallest SM share whose predicted step time, with the contention
  factor as prefill co-runs, fits the decode budget; prefill gets the rest. A request's step budget follows
  its TPOT target and its slack (see `DecodeRequest.step_budget`).
- *lone phase*: no prefill work → decode gets the whole device; no decode → prefill gets the whole device.
- *prefill order*: new prefills are taken by priority (lower first), then earliest deadline first (requests
  that cannot meet their TTFT even alone on the whole GPU go last within their priority), within free KV
  blocks, a token budget and a batch cap. The head of the queue is never skipped for a later, smaller request
  (so large prompts cannot starve); a request that would make an already-picked one miss its TTFT is not
  added.
- *layer blocks*: a prefill is launched a block of layers at a time, sized so one block takes about
  `block_decode_steps` decode steps; the dispatcher re-decides after each block (decode steps run back to back
  beside it, see `mux_loop`). With no decode running, all remaining layers go at once.
- *overtaking*: a waiting prefill may overtake the in-flight one only if it is shorter than the in-flight
  one's remaining time, has an earlier deadline, would miss its TTFT by waiting but meets it by overtaking,
  and the in-flight one still meets its own TTFT afterwards. Never recursively: nothing overtakes while one is
  paused.
- *decode first*: when no mixed split meets the decode budget, decode runs alone on the whole device (the
  fastest it can be; TPOT wins) for up to `max_prefill_stall_steps` consecutive decisions, then prefill gets
  one turn on the mixed split with the largest decode share (or, on a device without mixed splits, one layer
  block sized to one decode budget while decode waits), and the count restarts. So TTFT degrades boundedly and
  TPOT degrades only on the turn steps.
- *just enough prefill*: the smallest decode share is the fastest prefill the decode budget allows. When more
  requests wait than there are free sequence slots (`DispatchState.slot_bound`), decode speed is what admits
  them, so decode keeps more SMs: the mixed split with the most decode SMs on which the planned prefill, and
  after it each admissible waiting request in EDF order, still finishes within `prefill_slack_share` of its
  slack to its TTFT deadline. Otherwise a loose TPOT target hands prefill most of the device for a prompt that
  needs a little of it, every decode step crawls on the rest, and with the slots full the queue grows without
  bound. With free slots prefill speed is what serves the queue, so the rule does not apply there.
- *folding*: with no prefill started, the queue's head may instead join the decode step as a mixed batch on
  the decode end of the splits (chunked prefill's one pass, on the whole device): as many waiting requests, in
  the prefill order and within `fold_max_tokens`, as keep that step within the decode budget. The dispatcher
  folds when the split starts no prefill (decode first, or nothing fits the prefill SMs), or when the fold
  takes the whole planned launch (folding only part of it would delay the rest by a step). A short prompt's
  GEMMs ride along a memory-bound decode step almost for free, while splitting SMs for it slows every decode
  step and pays the contention factor on both sides. Long prompts still multiplex.

Mode `static` (the `static-split` policy, for comparisons): one fixed split for both phases, whatever the
load; prefill order and layer blocks as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Any, Literal

from ..core.config import PartitionConfig
from ..partition.base import Split
from ..partition.splits import nearest_split
from .perf_model import PerfModel, PrefillShape

# A request behind schedule must catch up, but its step budget is floored at this share of its TPOT target so
# one late request cannot demand an impossible step.
CATCH_UP_FLOOR = 0.5


@dataclass(frozen=True)
class DecodeRequest:
    """A request in the running decode batch (the detail `DecodeLoad.of` sums up)."""

    request_id: str
    context_tokens: int  # KV tokens it holds (prompt + generated so far)
    tpot_target_s: float
    tokens_since_first: int = 0  # output tokens produced after the first one
    time_since_first_token_s: float = 0.0

    def step_budget(self, max_borrow: float) -> float:
        """Time the request's next decode step may take so its average TPOT stays on target.

        After one more token the average is (elapsed + t) / (n + 1) ≤ target ⇔ t ≤ target·(n+1) − elapsed.
        The slack banked by a request ahead of schedule is capped at `max_borrow`·target (1.0 = a strict
        per-token budget); a request behind schedule is floored at `CATCH_UP_FLOOR`·target.
        """
        t = self.tpot_target_s
        slack = t * (self.tokens_since_first + 1) - self.time_since_first_token_s
        return min(max(slack, CATCH_UP_FLOOR * t), max_borrow * t)


@dataclass(frozen=True)
class DecodeLoad:
    """The running decode batch as the dispatcher sees it: size, KV tokens, tightest step budget."""

    batch: int = 0
    kv_tokens: int = 0
    step_budget_s: float | None = None  # None when the batch is empty

    @classmethod
    def of(cls, requests: Sequence[DecodeRequest], max_borrow: float) -> DecodeLoad:
        if not requests:
            return cls()
        return cls(
            len(requests),
            sum(r.context_tokens for r in requests),
            min(r.step_budget(max_borrow) for r in requests),
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
    # Fair scheduling (`fairness: vtc`): the client's virtual token counter, lower first within a priority and
    # EDF within it; 0 for every request without fairness, so the order is plain priority-then-EDF.
    fair_share: float = 0.0

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
    decode: DecodeLoad = DecodeLoad()  # the running decode batch
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
    FOLD = "fold"  # run `launch_ids` whole inside the decode step (folding), not on the prefill lane


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


_PARTITION = PartitionConfig.model_fields  # the user-facing defaults, defined once


@dataclass(frozen=True)
class DispatcherConfig:
    """`mode`, `static_prefill_share`, `tpot_margin` and `fold_max_tokens` come from the user's
    `PartitionConfig` (`policies.dispatcher_config`); the rest are internal tunables that run at their
    defaults (tests set them to force a situation; multiplex/README.md says why they are not flags)."""

    mode: Literal["slo", "static"] = "slo"
    # Static mode: the mixed split nearest this prefill share.
    static_prefill_share: float = _PARTITION["prefill_sm_share"].default
    # Prefill order: token budget of one new prefill batch (a longer single prompt goes alone).
    max_prefill_tokens: int = 16384
    max_prefill_batch: int = 64  # prefill order and folding: most requests in one batch
    # Layer blocks: a block ≈ this many predicted decode steps. Decode steps run back to back under a block,
    # so it only sets how often the dispatcher re-decides (split, overtakes).
    block_decode_steps: float = 4.0
    # Tpot margin: decode plans against step budget / (1 + tpot_margin); > 0 defends TPOT, < 0 favours TTFT.
    tpot_margin: float = _PARTITION["tpot_margin"].default
    # Just enough prefill: share of a planned prefill's slack it may use when decode takes SMs back (0: never,
    # always the smallest decode share). The rest absorbs prediction error and new arrivals.
    prefill_slack_share: float = 0.5
    # TPOT is an average over a request's output, so a request ahead of schedule may spend its banked slack on
    # a step up to this many times its target.
    max_slack_borrow: float = 2.0
    # Decode first: consecutive decisions prefill may stall before it gets a turn.
    max_prefill_stall_steps: int = 8
    # Folding: most prompt tokens folded into one decode step (0: never fold).
    fold_max_tokens: int = _PARTITION["fold_max_tokens"].default

    def __post_init__(self) -> None:
        if self.mode not in ("slo", "static"):
            raise ValueError(f"dispatcher mode must be 'slo' or 'static', got {self.mode!r}")
        if not 0.0 < self.static_prefill_share < 1.0:
            raise ValueError("static_prefill_share must be in (0, 1)")
        if self.max_prefill_tokens <= 0 or self.max_prefill_batch <= 0 or self.block_decode_steps <= 0:
            raise ValueError("max_prefill_tokens, max_prefill_batch and block_decode_steps must be positive")
        if min(self.max_prefill_stall_steps, self.fold_max_tokens) < 0:
            raise ValueError("max_prefill_stall_steps and fold_max_tokens must be >= 0")
        if not self.tpot_margin > -1.0:
            raise ValueError(f"tpot_margin must be > -1 (budget / (1 + margin)), got {self.tpot_margin}")
        if not self.max_slack_borrow >= 1.0:
            raise ValueError("max_slack_borrow must be >= 1")
        if not 0.0 <= self.prefill_slack_share <= 1.0:
            raise ValueError("prefill_slack_share must be in [0, 1]")


_FOLDABLE = ("multiplex", "decode-first", "prefill-turn")  # modes with decode running and prefill to start
# Modes that run decode on the split decode alone gets, and that a decision with nothing to prefill repeats.
_DECODE_ALONE = ("decode-only", "fold", "static")


@dataclass(frozen=True)
class _SplitRoles:
    prefill_end: Split  # most prefill SMs
    decode_end: Split  # most decode SMs
    mixed: tuple[Split, ...]  # splits with SMs for both phases, fewest decode SMs first
    turn: Split  # decode first's prefill turn: the mixed split with the most decode SMs, else `prefill_end`
    static: Split | None  # static mode's fixed split


@dataclass(frozen=True)
class _Inputs:
    """What every stage of one decision reads, derived once from the `DispatchState`."""

    state: DispatchState
    roles: _SplitRoles
    budget: float | None  # the decode budget: tightest step budget / (1 + tpot_margin); None with no decode
    ordered: list[PrefillRequest]  # the waiting requests in the prefill order
    head_fits: bool  # the queue's head fits in the free KV blocks
    started: bool  # a prefill batch is in flight or paused

    @property
    def batch(self) -> int:
        return self.state.decode.batch

    @property
    def kv(self) -> int:
        return self.state.decode.kv_tokens

    @property
    def prefill_work(self) -> bool:
        return self.started or self.head_fits


@dataclass(frozen=True)
class _Choice:
    """The split stage's answer, which the slot-bound relax and a fold may revise."""

    split: Split
    mode: Mode
    reason: str


@dataclass(frozen=True)
class _Plan:
    """What runs as prefill: a batch on the prefill lane, or (FOLD) prompts inside the decode step."""

    action: PrefillAction = PrefillAction.NONE
    launch: tuple[PrefillRequest, ...] = ()  # new requests (LAUNCH / OVERTAKE / FOLD)
    shapes: tuple[PrefillShape, ...] = ()
    ids: tuple[str, ...] = ()
    start_layer: int = 0
    note: str = ""  # what the reason says of the plan
    step_s: float = 0.0  # FOLD: the predicted decode step with the prompts inside

    @classmethod
    def of_new(
        cls, action: PrefillAction, picked: Sequence[PrefillRequest], note: str = "", step_s: float = 0.0
    ) -> _Plan:
        return cls(
            action,
            tuple(picked),
            tuple(r.shape for r in picked),
            tuple(r.request_id for r in picked),
            note=note,
            step_s=step_s,
        )

    @classmethod
    def of_started(cls, action: PrefillAction, job: InFlightPrefill) -> _Plan:
        return cls(action, (), job.shapes, job.request_ids, job.layers_done)


_NO_PLAN = _Plan()


class Dispatcher:
    """Stateful only in decode first's prefill-stall counter (deterministic; `reset()` clears it) and memos of
    whole-device prefill times by shape and of the roles of the splits."""

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

    def decode_alone_split(self, splits: Sequence[Split]) -> Split:
        """The split a decision takes with decode running and nothing to prefill: static mode's fixed split,
        otherwise every SM to decode (lone phase)."""
        roles = self._roles(splits)
        return roles.static if roles.static is not None else roles.decode_end

    def quiet_decode_split(self, splits: Sequence[Split], *, waiting: bool, started: bool) -> Split | None:
        """The next decision's split without deciding, where it is known: with decode running, nothing
        `waiting`, no prefill `started` (in flight or paused) and no prefill stall counted, `decide` runs
        decode alone, starting no prefill, on `decode_alone_split`, and changes none of the dispatcher's
        state, so a caller may skip it (the simulator's `join_span`). None otherwise: the decision could
        differ, or deciding would reset the stall count."""
        if waiting or started or self._stall_steps:
            return None
        return self.decode_alone_split(splits)

    def repeats_decode_alone(self, decision: DispatchDecision) -> bool:
        """Whether `decision` runs decode alone, starting no prefill (decode-only, a fold, or static mode with
        nothing to prefill), on `decode_alone_split`: then, while no prefill can start and the running set is
        unchanged, the next step end decides the same (same split, decode alone). Decode first does not
        qualify: each of its decisions counts towards a prefill turn."""
        return (
            decision.run_decode
            and decision.prefill_action in (PrefillAction.NONE, PrefillAction.FOLD)
            and decision.mode in _DECODE_ALONE
        )

    # --- the pipeline -------------------------------------------------------------------------------
    def decide(self, state: DispatchState) -> DispatchDecision:
        if not state.splits:
            raise ValueError("dispatcher needs at least one split")
        inputs = self._inputs(state)
        choice = self._choose_split(inputs)
        plan = self._plan_prefill(inputs, choice)
        choice = self._relax_for_slots(inputs, choice, plan)
        choice, plan = self._try_fold(inputs, choice, plan)
        self._stall_steps = self._stall_steps + 1 if choice.mode == "decode-first" else 0
        return self._cost(inputs, choice, plan)

    def _inputs(self, state: DispatchState) -> _Inputs:
        roles = self._roles(state.splits)
        budget = state.decode.step_budget_s
        if budget is not None and self.config.tpot_margin:  # tpot margin (skipped at 0: the same floats)
            budget /= 1.0 + self.config.tpot_margin
        ordered = self._prefill_order(state.waiting, state.now_s)
        return _Inputs(
            state=state,
            roles=roles,
            budget=budget,
            ordered=ordered,
            head_fits=bool(ordered) and ordered[0].kv_blocks <= state.free_kv_blocks,
            started=state.in_flight is not None or state.paused is not None,
        )

    def _choose_split(self, inputs: _Inputs) -> _Choice:
        """The split and mode: static mode's fixed split, lone phase, smallest decode share, decode first."""
        roles, batch, budget = inputs.roles, inputs.batch, inputs.budget
        if roles.static is not None:
            return _Choice(roles.static, "static", f"static split {roles.static.label}")
        if not batch and not inputs.prefill_work:
            return _Choice(roles.decode_end, "idle", "no work")
        if not inputs.prefill_work:
            reason = "no prefill can start" if inputs.state.waiting else "no prefill waiting"
            return _Choice(roles.decode_end, "decode-only", reason)
        if not batch:
            return _Choice(roles.prefill_end, "prefill-only", "no decode running")
        assert budget is not None
        for split in roles.mixed:
            if self.model.decode_time(batch, inputs.kv, split.decode_sms, contended=True) <= budget:
                return _Choice(
                    split, "multiplex", f"smallest decode share meeting {budget * 1e3:.1f} ms step budget"
                )
        stalled, limit = self._stall_steps, self.config.max_prefill_stall_steps
        if stalled < limit:
            return _Choice(
                roles.decode_end,
                "decode-first",
                f"no mixed split meets {budget * 1e3:.1f} ms; decode alone, prefill stalled "
                f"{stalled + 1}/{limit}",
            )
        return _Choice(roles.turn, "prefill-turn", f"prefill turn after {stalled} stalled steps")

    def _plan_prefill(self, inputs: _Inputs, choice: _Choice) -> _Plan:
        """What the split's prefill SMs run: the paused batch back, a new batch in the prefill order, or the
        in-flight batch's next block unless a waiting one overtakes it. Nothing while decode goes first."""
        sms = choice.split.prefill_sms
        if not inputs.prefill_work or choice.mode == "decode-first" or sms <= 0:
            return _NO_PLAN
        state = inputs.state
        contended = inputs.batch > 0 and choice.split.decode_sms > 0
        active = state.in_flight
        if active is None and state.paused is not None:
            return _Plan.of_started(PrefillAction.RESUME, state.paused)
        if active is None:
            picked, _ = self._take_head(
                inputs.ordered,
                state.free_kv_blocks,
                lambda shapes: self.model.prefill_time(shapes, sms, contended=contended),
                max_tokens=self.config.max_prefill_tokens,
                lone_head_any_size=True,
                keep_deadlines_at=state.now_s,
            )
            if not picked:
                return _NO_PLAN
            return _Plan.of_new(PrefillAction.LAUNCH, picked, f" {len(picked)} request(s)")
        if state.paused is None and inputs.ordered:
            overtake = self._overtake(inputs, active, sms, contended)
            if overtake is not None:
                return overtake
        return _Plan.of_started(PrefillAction.CONTINUE, active)

    def _overtake(self, inputs: _Inputs, active: InFlightPrefill, sms: int, contended: bool) -> _Plan | None:
        """Overtaking: a short, earlier-deadline batch that would miss its TTFT by waiting, if the in-flight
        one still meets its own."""
        model, state, now = self.model, inputs.state, inputs.state.now_s
        remaining = model.prefill_layers_time(
            active.shapes, sms, active.layers_done, model.num_layers - active.layers_done, contended=contended
        )
        slack = active.ttft_deadline_s - (now + remaining)  # time the in-flight batch can still give away
        if slack <= 0:
            return None
        eligible = [
            r
            for r in inputs.ordered
            if r.ttft_deadline_s < active.ttft_deadline_s and not self._hopeless(r, now)
        ]
        picked, _ = self._take_head(
            eligible,
            state.free_kv_blocks,
            lambda shapes: model.prefill_time(shapes, sms, contended=contended),
            max_tokens=self.config.max_prefill_tokens,
            lone_head_any_size=True,
            max_time=min(remaining, slack),
            keep_deadlines_at=now,
        )
        if not picked:
            return None
        t = model.prefill_time([r.shape for r in picked], sms, contended=contended)
        if t >= remaining or now + t + remaining > active.ttft_deadline_s:
            return None
        if not any(now + t <= r.ttft_deadline_s < now + remaining + t for r in picked):
            return None  # none of them needs it: each meets its TTFT after the in-flight batch too
        note = f" {len(picked)} request(s) ahead of {len(active.request_ids)} in flight"
        return _Plan.of_new(PrefillAction.OVERTAKE, picked, note)

    def _relax_for_slots(self, inputs: _Inputs, choice: _Choice, plan: _Plan) -> _Choice:
        """Just enough prefill: with the slots full, the mixed split with the most decode SMs that meets the
        decode budget and on which the planned prefill, and then the waiting ones in EDF order, each finish
        within `prefill_slack_share` of their slack; the split chosen when none does or the plan overtakes
        (urgent by construction). The queue is costed by its whole-device times scaled by the plan's slowdown
        on the split (one pass over it, with memoised times)."""
        state, share = inputs.state, self.config.prefill_slack_share
        if (
            choice.mode != "multiplex"
            or not state.slot_bound
            or plan.action in (PrefillAction.NONE, PrefillAction.OVERTAKE)
            or share <= 0
        ):
            return choice
        model, now, fastest = self.model, state.now_s, choice.split
        start, layers = plan.start_layer, model.num_layers - plan.start_layer
        plan_work = work = model.prefill_layers_time(plan.shapes, model.total_sms, start, layers)
        if work <= 0:
            return choice
        # The largest slowdown against the whole device that keeps every deadline within its share of slack.
        deadline = self._plan_deadline(state, plan)
        limit = share * (deadline - now) / work if math.isfinite(deadline) else math.inf
        planned = set(plan.ids)
        for r in inputs.ordered:
            if limit <= 1.0:
                return choice  # no split is faster than the whole device
            if r.request_id in planned or self._hopeless(r, now):
                continue
            work += self._alone_s(r)
            limit = min(limit, share * (r.ttft_deadline_s - now) / work)
        # An infinite limit means no deadline is left to keep (all late): prefill speed gains nothing, so
        # decode takes the most SMs.
        allowed = limit * plan_work
        assert inputs.budget is not None
        for s in sorted(
            (s for s in state.splits if s.is_mixed and s.decode_sms > fastest.decode_sms),
            key=lambda s: (-s.decode_sms, s.prefill_sms),
        ):
            if model.decode_time(inputs.batch, inputs.kv, s.decode_sms, contended=True) > inputs.budget:
                continue
            if (
                model.prefill_layers_time(plan.shapes, s.prefill_sms, start, layers, contended=True)
                <= allowed
            ):
                budget_ms = inputs.budget * 1e3
                return _Choice(
                    s,
                    choice.mode,
                    f"most decode SMs leaving the prefill enough ({budget_ms:.1f} ms step budget)",
                )
        return choice

    def _try_fold(self, inputs: _Inputs, choice: _Choice, plan: _Plan) -> tuple[_Choice, _Plan]:
        """Folding: the longest head of the queue whose prompts, run whole inside the decode step on the
        decode end of the splits, keep that step within the decode budget; it replaces the plan when the plan
        starts nothing or the fold takes all of it."""
        budget, cfg = inputs.budget, self.config
        if not (
            cfg.fold_max_tokens
            and inputs.head_fits
            and not inputs.started
            and choice.mode in _FOLDABLE
            and budget is not None
        ):
            return choice, plan
        sms = inputs.roles.decode_end.decode_sms
        batch, kv = inputs.batch, inputs.kv
        picked, step_s = self._take_head(
            inputs.ordered,
            inputs.state.free_kv_blocks,
            lambda shapes: self.model.mixed_step_time(shapes, batch, kv, sms),
            max_tokens=cfg.fold_max_tokens,
            lone_head_any_size=False,
            max_time=budget,
        )
        if not picked:
            return choice, plan
        if plan.action != PrefillAction.NONE and not set(plan.ids) <= {r.request_id for r in picked}:
            return choice, plan  # folding part of the planned launch would delay the rest by a step
        reason = (
            f"fold {len(picked)} request(s) into the decode step: {step_s * 1e3:.1f} ms "
            f"within the {budget * 1e3:.1f} ms step budget"
        )
        fold = _Plan.of_new(PrefillAction.FOLD, picked, step_s=step_s)
        return _Choice(inputs.roles.decode_end, "fold", reason), fold

    def _cost(self, inputs: _Inputs, choice: _Choice, plan: _Plan) -> DispatchDecision:
        """The predictions of the plan on the split, the layer block to launch now, and the decision."""
        split, now, budget, model = choice.split, inputs.state.now_s, inputs.budget, self.model
        run_decode = inputs.batch > 0 and split.decode_sms > 0
        reason = choice.reason
        layers = 0
        decode_step = block_s = remaining_s = None
        ttft: dict[str, float] = {}
        if plan.action == PrefillAction.FOLD:
            decode_step = block_s = remaining_s = plan.step_s
            ttft = {rid: now + plan.step_s for rid in plan.ids}
        elif plan.action == PrefillAction.NONE:
            if run_decode:
                decode_step = model.decode_time(inputs.batch, inputs.kv, split.decode_sms, contended=False)
            if inputs.prefill_work and choice.mode != "decode-first":
                reason += "; no prefill fits"
        else:
            if run_decode:
                decode_step = model.decode_time(inputs.batch, inputs.kv, split.decode_sms, contended=True)
            # Layer blocks: about `block_decode_steps` decode steps; a prefill turn's block, which decode
            # waits for, about one step budget; with no decode, all remaining layers.
            if decode_step is not None:
                target = self.config.block_decode_steps * decode_step
            elif choice.mode == "prefill-turn" and budget is not None:
                target = budget
            else:
                target = math.inf
            layers, block_s, remaining_s = model.layer_block(
                plan.shapes, split.prefill_sms, plan.start_layer, target, contended=run_decode
            )
            ttft = {rid: now + remaining_s for rid in plan.ids}
            reason += f"; prefill {plan.action.value}{plan.note}"
        return DispatchDecision(
            split=split,
            mode=choice.mode,
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
        in_order = [s for s in splits if s.is_mixed]
        mixed = sorted(in_order, key=lambda s: (s.decode_sms, -s.prefill_sms))
        turn = max(in_order, key=lambda s: s.decode_sms) if in_order else prefill_end
        static = None
        if self.config.mode == "static":
            if not mixed:
                raise ValueError("static mode needs a mixed split (both phases with SMs)")
            static = nearest_split(list(splits), self.config.static_prefill_share)
        roles = _SplitRoles(prefill_end, decode_end, tuple(mixed), turn, static)
        if type(splits) is tuple:
            self._roles_memo = (splits, roles)
        return roles

    def _alone_s(self, r: PrefillRequest) -> float:
        """`r`'s prefill time alone on the whole device, memoised by shape (a decision sorts the queue)."""
        key = (r.new_tokens, r.cached_tokens)
        t = self._alone.get(key)
        if t is None:
            if len(self._alone) >= 65536:
                self._alone.clear()
            t = self._alone[key] = self.model.prefill_time(r.shape, self.model.total_sms)
        return t

    def _hopeless(self, r: PrefillRequest, now: float) -> bool:
        return now + self._alone_s(r) > r.ttft_deadline_s

    def _prefill_order(self, waiting: Sequence[PrefillRequest], now: float) -> list[PrefillRequest]:
        """The prefill order: priority, the client's fair share (fairness only), hopeless last, then EDF. The
        key runs for every waiting request, every decision, so it reads the memo of `_alone_s` itself
        (`_hopeless` inlined)."""
        memo, alone_s = self._alone.get, self._alone_s

        def key(r: PrefillRequest) -> tuple:
            t = memo((r.new_tokens, r.cached_tokens))
            late = now + (alone_s(r) if t is None else t) > r.ttft_deadline_s
            return (r.priority, r.fair_share, late, r.ttft_deadline_s, r.arrival_s, r.request_id)

        return sorted(waiting, key=key)

    def _take_head(
        self,
        ordered: Sequence[PrefillRequest],
        free_blocks: int,
        time_of: Callable[[list[PrefillShape]], float],
        *,
        max_tokens: int,
        lone_head_any_size: bool,
        max_time: float = math.inf,
        keep_deadlines_at: float | None = None,
    ) -> tuple[list[PrefillRequest], float]:
        """The longest head of `ordered` (never skipping a request: a large prompt must not starve) within
        `free_blocks`, the batch cap, `max_tokens` (`lone_head_any_size`: but a head over it goes alone) and
        `max_time` of `time_of(shapes)`; and, with `keep_deadlines_at` (now), without pushing a picked request
        that can still meet its TTFT past it. The picked requests, with their `time_of`."""
        cfg, now = self.config, keep_deadlines_at
        blocks_left = free_blocks
        picked: list[PrefillRequest] = []
        shapes: list[PrefillShape] = []
        tokens, t_picked = 0, 0.0
        protected_deadline = math.inf  # earliest TTFT deadline among picked requests that can still meet it
        for r in ordered:
            if r.kv_blocks > blocks_left or len(picked) >= cfg.max_prefill_batch:
                break
            if tokens + r.new_tokens > max_tokens and (picked or not lone_head_any_size):
                break
            shapes.append(r.shape)
            t = time_of(shapes)
            if t > max_time or (now is not None and now + t > protected_deadline):
                break
            picked.append(r)
            blocks_left -= r.kv_blocks
            tokens += r.new_tokens
            t_picked = t
            if now is not None and not self._hopeless(r, now):
                protected_deadline = min(protected_deadline, r.ttft_deadline_s)
        return picked, t_picked

    def _plan_deadline(self, state: DispatchState, plan: _Plan) -> float:
        """The earliest TTFT deadline in the planned prefill that can still be met (for a new batch, judged by
        whole-device prefill time as the prefill order does; inf: none)."""
        if plan.action == PrefillAction.LAUNCH:
            live = [r.ttft_deadline_s for r in plan.launch if not self._hopeless(r, state.now_s)]
            return min(live, default=math.inf)
        job = state.in_flight if plan.action == PrefillAction.CONTINUE else state.paused
        return job.ttft_deadline_s if job is not None else math.inf
