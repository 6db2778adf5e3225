"""The synchronous engine: add_request / step / abort, and a `generate()` convenience for offline use."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.block_manager import BlockManager
from ..core.config import EngineConfig
from ..core.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    RequestFailedError,
    is_fatal_error,
)
from ..core.kv_copies import host_blocks_for_budget
from ..core.sampling_params import SamplingParams
from ..core.scheduler import Batch, Scheduler, SchedulerConfig
from ..core.sequence import SLO, FinishReason, RequestTimes, Sequence
from ..multiplex.analytic import ModelShape
from ..multiplex.devices import cpu_device_spec, lookup_device
from ..multiplex.model_select import select_perf_model
from ..multiplex.mux_loop import MuxLanes, decode_step_time, prefill_block_time
from ..multiplex.policies import MuxContext, make_policy
from ..partition import make_partitioner
from ..partition.base import Split
from .detokenizer import IncrementalDetokenizer
from .kv_swap import KVCopier, allocate_host_pool, block_nbytes
from .model_runner import (
    CPU_DEFAULT_KV_GB,
    DTYPES,
    ModelRunner,
    gpu_kv_budget_bytes,
    kv_bytes_per_token,
    num_kv_blocks_for_budget,
    resolve_device,
)
from .mux_executor import ModelMuxExecutor
from .outputs import EngineStats, RequestOutput, StepCosts
from .sampler import TokenLogprobs
from .structured import StructuredOutputs
from .trace import DecisionTrace

log = logging.getLogger(__name__)

# Steps in a row that may fail (each failing only its batch) before the engine counts as unusable: a fault
# that hits every step would otherwise fail every request while the process looks alive.
MAX_CONSECUTIVE_FAILED_STEPS = 8
# Until measured: host <-> device KV copy rates (pinned PCIe on CUDA, memcpy on CPU) and seconds per prefill
# token, for the `auto` preemption mode's first choices.
NOMINAL_HOST_COPY_BYTES_PER_S = {"cuda": 20e9, "cpu": 5e9}
NOMINAL_PREFILL_S_PER_TOKEN = {"cuda": 1e-4, "cpu": 1e-3}


@dataclass
class _Request:
    seq: Sequence
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_reported_tokens: int = 0
    num_reported_logprobs: int = 0
    text: str = ""
    error: Exception | None = None  # set when the request failed; its final output carries it
    grammar_done: bool = False  # its grammar ended it: the last token is text, not a stop token


def request_error(exc: Exception, what: str) -> Exception:
    """The error a failed request reports: the client's own mistake as is (a 4xx), anything else as a
    `RequestFailedError` caused by `exc`."""
    if isinstance(exc, InvalidRequestError):
        return exc
    err = RequestFailedError(f"{what}: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **overrides: object) -> None:
        from ..models.loader import load_model, load_tokenizer, resolve_max_model_len, resolve_model_path

        config = config or EngineConfig()
        if overrides:
            config = config.model_copy(update=overrides)
            config = EngineConfig.model_validate(config.model_dump())
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_dir = self._resolve_model_dir(config.model)
        self.model_name = config.served_model_name or (
            config.model if config.model else "SmolLM2-135M-Instruct"
        )
        self.device = resolve_device(config.device)
        tokenizer_dir = (
            resolve_model_path(config.tokenizer, "tokenizer") if config.tokenizer else self.model_dir
        )
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.generation_defaults = self._generation_defaults(config.generation_config)
        dtype_name = config.dtype
        if dtype_name == "auto":
            # bf16 matmuls are slow on CPUs without AMX; the model's own dtype on GPUs.
            dtype_name = "float32" if self.device.type == "cpu" else "bfloat16"
        self.dtype = DTYPES[dtype_name]
        model, hf_config = load_model(self.model_dir, self.dtype, self.device, config.attention_backend)
        self.hf_config = hf_config
        self.eos_token_ids = self._eos_ids(hf_config)

        max_model_len = resolve_max_model_len(hf_config, config.max_model_len)
        num_blocks = self._num_kv_blocks(model, max_model_len)
        pool_tokens = num_blocks * config.block_size
        if pool_tokens < max_model_len:
            log.warning(
                "KV pool holds %d tokens; capping the context window from %d", pool_tokens, max_model_len
            )
            max_model_len = pool_tokens
        self.max_model_len = max_model_len
        self.runner = ModelRunner(
            model, self.device, self.dtype, config.block_size, num_blocks, self.eos_token_ids
        )
        if not config.enforce_eager:
            reason = self.runner.enable_cuda_graphs(config.max_num_seqs, max_model_len)
            if reason is not None:
                (log.debug if self.device.type == "cpu" else log.info)("decode runs eagerly: %s", reason)
            elif self.runner.graphs is not None:
                self.runner.graphs.capture_all()
        # Grammars of structured outputs are built over the model's whole vocabulary (the logits' width).
        self.runner.structured = StructuredOutputs(self.tokenizer, model.vocab_size, self.eos_token_ids)
        # The host KV tier and the copier that moves blocks to and from it (none without swap space).
        self.kv_block_bytes = block_bytes = block_nbytes(self.runner.kv_pool)
        num_host_blocks = host_blocks_for_budget(config.swap_space_gb, block_bytes)
        self.copier: KVCopier | None = None
        if num_host_blocks:
            host_pool = allocate_host_pool(self.runner.kv_pool, num_host_blocks)
            self.copier = KVCopier(self.runner.kv_pool, host_pool)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, num_host_blocks
        )
        sched_cfg = SchedulerConfig(
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            fairness=config.fairness,
            fairness_preempt_gap=config.fairness_preempt_gap,
            preemption_mode=config.preemption_mode,
            default_slo=config.default_slo,
        )
        self._mux: tuple[MuxContext, ModelMuxExecutor] | None = None  # built on first use
        self.trace = DecisionTrace(config.trace_path)
        self.scheduler = Scheduler(
            sched_cfg, self.block_manager, make_policy(config.policy, config, self._mux_context)
        )
        # `auto` preemption starts from nominal rates (host link, a prefill token on this device) and follows
        # the measured ones.
        nominal_bw = NOMINAL_HOST_COPY_BYTES_PER_S[self.device.type]
        self.scheduler.swap_costs.copy_s_per_block = block_bytes / nominal_bw
        self.scheduler.swap_costs.recompute_s_per_token = NOMINAL_PREFILL_S_PER_TOKEN[self.device.type]
        self.requests: dict[str, _Request] = {}
        self._decisions: dict[str, int] = {}
        self._split: tuple[int, int] | None = None
        self._last_step: tuple[float | None, float | None] = (None, None)  # last lane: predicted, actual
        self._lanes: MuxLanes | None = None  # built on the first multiplexed step
        self._predicted: dict[str, float] = {}  # predicted latency of the work in flight on each lane
        # Measured step costs (for `GET /state`); per lane in flight: (decode seqs or prompt tokens, share of
        # the model's layers launched).
        self.costs = StepCosts(min(StepCosts.MIN_PREFILL_TOKENS, config.max_num_batched_tokens))
        self._lane_sizes: dict[str, tuple[int, float]] = {}
        self._pending_outputs: list[RequestOutput] = []  # posted while draining the lanes for a switch
        self._in_flight: list[Batch] = []  # the sequential step's batches not yet posted
        self._failed_steps = 0  # consecutive steps that failed
        self.dead: BaseException | None = None  # why the engine became unusable; then every step raises
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        log.info(
            "engine ready: model=%s device=%s dtype=%s attention=%s kv_blocks=%d block_size=%d "
            "max_model_len=%d policy=%s",
            self.model_dir,
            self.device,
            self.dtype,
            model.attention_backend,
            num_blocks,
            config.block_size,
            max_model_len,
            config.policy,
        )

    # ---- construction helpers ----------------------------------------------------------------------
    @staticmethod
    def _resolve_model_dir(model: str | None) -> Path:
        if model is None:
            from ..models.embedded import embedded_model_dir

            return embedded_model_dir()
        from ..models.loader import resolve_model_path

        return resolve_model_path(model)

    def _generation_defaults(self, source: str) -> dict[str, object]:
        """`--generation-config`'s request defaults, checked now: a bad value in the file stops the start
        instead of failing every request that leaves the field unset."""
        from ..models.loader import load_generation_defaults

        defaults = load_generation_defaults(source, self.model_dir)
        try:
            SamplingParams(**defaults)
        except (InvalidRequestError, TypeError) as exc:
            raise ModelLoadError(f"generation config ({source}): {exc}") from None
        if defaults:
            log.info("default sampling parameters from the generation config: %s", defaults)
        return defaults

    def _eos_ids(self, hf_config: object) -> frozenset[int]:
        ids: set[int] = set()
        gen_cfg = self.model_dir / "generation_config.json"
        if gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        eos = getattr(hf_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(int(i) for i in ids)

    def _num_kv_blocks(self, model: torch.nn.Module, max_model_len: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_token = kv_bytes_per_token(model.num_layers, model.num_kv_heads, model.head_dim, self.dtype)
        useful = cfg.max_num_seqs * max_model_len
        if cfg.kv_cache_memory_gb is not None:
            budget = cfg.kv_cache_memory_gb * 2**30
        elif self.device.type == "cuda":
            # Activations of one full step: hidden states and MLP intermediates for the token budget.
            hidden = int(getattr(self.hf_config, "hidden_size", 4096))
            inter = int(getattr(self.hf_config, "intermediate_size", 4 * hidden))
            reserve = cfg.max_num_batched_tokens * (4 * hidden + 3 * inter) * self.dtype.itemsize + 2**30
            budget = gpu_kv_budget_bytes(self.device, cfg.gpu_memory_utilization, reserve)
        else:
            budget = CPU_DEFAULT_KV_GB * 2**30
        return num_kv_blocks_for_budget(budget, cfg.block_size, per_token, useful)

    def _mux_context(self) -> MuxContext:
        """Partitions (created once) and the performance model, for the multiplexing policies."""
        if self._mux is None:
            cfg = self.config
            partitioner = make_partitioner(cfg.partition.backend, self.device)
            if partitioner.reason:
                log.info("partitioner %s: %s", partitioner.name, partitioner.reason)
            if self.device.type == "cuda":
                dev_name = torch.cuda.get_device_name(self.device)
                spec = lookup_device(dev_name) or cpu_device_spec(cores=partitioner.total_sms)
            else:
                dev_name, spec = "cpu", cpu_device_spec(cores=partitioner.total_sms)
            dtype_name = str(self.dtype).removeprefix("torch.")
            shape = ModelShape.from_hf_config(self.hf_config, dtype_name)
            perf, why = select_perf_model(
                profile_path=cfg.profile_path,
                model=self.model_name,
                device_name=dev_name,
                dtype=dtype_name,
                shape=shape,
                device=spec,
                architecture=(getattr(self.hf_config, "architectures", None) or [None])[0],
            )
            log.info("performance model: %s", why)
            ctx = MuxContext(
                perf_model=perf, splits=partitioner.splits, num_layers=self.runner.model.num_layers
            )
            self._mux = (ctx, ModelMuxExecutor(self.runner, partitioner))
        return self._mux[0]

    def _requeue_prefill_jobs(self) -> None:
        """Hand the old multiplexing policy's half-done prefills back to the queue (as a preemption would),
        so a policy switch loses only their partial compute, never the requests."""
        policy = self.scheduler.policy
        for job in (policy.active, policy.paused):
            if job is None:
                continue
            for item in job.batch.items:
                seq = item.seq
                seq.in_flight = False
                if seq.abort_pending:
                    self.scheduler.finish(seq, FinishReason.ABORT)
                elif not seq.is_finished:
                    self.scheduler.preempt(seq)
            self._mux[1].finish_prefill(job)
        policy.active = policy.paused = None

    def _realized_split(self) -> tuple[int, int] | None:
        if self._split is None or self._mux is None:
            return None
        return self._mux[1].partitioner.realized_sm_counts(Split(*self._split))

    @property
    def is_multiplexing(self) -> bool:
        return bool(getattr(self.scheduler.policy, "multiplexing", False))

    # ---- requests -----------------------------------------------------------------------------------
    def tokenize(self, prompt: str | abc.Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = [int(t) for t in prompt]
            vocab = self.runner.model.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if not ids:
            raise InvalidRequestError("prompt must contain at least one token")
        return ids

    def make_sequence(
        self,
        request_id: str,
        prompt: str | abc.Sequence[int],
        params: SamplingParams | None = None,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> Sequence:
        """Validate a request and build its sequence without touching engine state (safe off-thread)."""
        params = params or SamplingParams()
        params.validate()  # again: the fields of a dataclass may have changed since it was built
        limit = self.config.max_logprobs  # -1: no limit (vLLM's); SamplingParams itself has no bound
        if params.logprobs is not None and 0 <= limit < params.logprobs:
            raise InvalidRequestError(
                f"logprobs must be at most {limit} (max_logprobs), got {params.logprobs}"
            )
        if params.n != 1:
            raise InvalidRequestError("the engine runs one sequence per request; fan out n>1 as n requests")
        if params.structured is not None:
            # Compiled (and cached) now, so a grammar that cannot compile is refused before the request
            # enters the batch; raises InvalidRequestError naming the request field.
            self.runner.structured.compile(params.structured)
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=self.tokenize(prompt),
            params=params,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            slo=slo if slo is not None else SLO(),  # its missing targets are filled in when it is queued
            times=RequestTimes(arrival=arrival_time if arrival_time is not None else time.monotonic()),
        )
        self.scheduler.check_fits(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"engine is unusable: {self.dead!r}")
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"duplicate request id {seq.request_id!r}")
        # Everything that can fail comes before the scheduler sees it, so a failed add leaves nothing behind.
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params)
        self.scheduler.add(seq)
        self.requests[seq.request_id] = _Request(seq, detok)

    def add_request(
        self,
        request_id: str,
        prompt: str | abc.Sequence[int],
        params: SamplingParams | None = None,
        slo: SLO | None = None,
        arrival_time: float | None = None,
    ) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, slo, arrival_time))

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort at any time. Returns the final output (finish_reason 'abort') when the request ends now; a
        request whose batch is running ends when that batch returns, its final output then from `step`."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req.seq, FinishReason.ABORT)
        return self._advance(req, time.monotonic()) if req.seq.is_finished else None

    def _forget(self, req: _Request) -> None:
        self.requests.pop(req.seq.request_id, None)
        self.runner.release(req.seq.seq_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished or bool(self._pending_outputs) or self.copies_busy

    @property
    def copies_busy(self) -> bool:
        """KV copies collected or in flight: steps must go on until they land and free their blocks."""
        bm = self.block_manager
        return bm.copies_outstanding > 0 or not bm.pending.is_empty

    # ---- the loop -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of the requests it advanced or ended.

        Failures stay as small as they can. A request whose own work fails (sampling setup and seeding,
        detokenizing, stop strings) ends alone with an error output (finish_reason "error", `error` set). Any
        other exception fails the requests of the work in flight, frees their KV blocks, checks the
        scheduler's and the pool's invariants and leaves the engine serving the rest. Only a fatal error (a
        CUDA error, a state that fails the checks, MAX_CONSECUTIVE_FAILED_STEPS failed steps in a row) marks
        the engine dead: then this raises `EngineDeadError`, now and on every later call.
        """
        if self.dead is not None:
            raise EngineDeadError(f"engine is unusable: {self.dead!r}")
        if self._pending_outputs:
            outputs, self._pending_outputs = self._pending_outputs, []
            return outputs
        # Appended to in place, so outputs made before a failure (a request that finished) still go out.
        outputs: list[RequestOutput] = []
        try:
            if self.is_multiplexing:
                self._step_multiplexed(time.monotonic(), outputs)
            else:
                self._step_sequential(time.monotonic(), outputs)
        except Exception as exc:
            self._recover(exc, outputs)
        else:
            self._failed_steps = 0
        return outputs

    def _step_sequential(self, now: float, outputs: list[RequestOutput]) -> None:
        self._land_copies(outputs)
        sched_out = self.scheduler.schedule(now)
        ticket = self._submit_copies()
        if sched_out.is_empty:
            if self.copies_busy:  # waiting for KV to come back (or to be saved) is progress
                self._land_copies(outputs, wait=True)
            elif self.scheduler.has_unfinished:
                raise EngineDeadError("scheduler made no progress with unfinished requests (a bug)")
            return
        if ticket is not None:
            self.copier.before_forward(ticket)
        self._in_flight = list(sched_out.batches)
        for batch in sched_out.batches:
            prompt_tokens = sum(i.num_new_tokens for i in batch.items if i.seq.is_prefilling)
            self.prompt_tokens_total += prompt_tokens
            started = time.monotonic()
            result = self.runner.execute(batch)
            if self.runner.failed:
                self._fail_sampling()
            done_at = time.monotonic()
            if batch.phase == "decode":
                self.costs.decode(done_at - started, batch.num_seqs)
            else:
                self.costs.prefill(done_at - started, prompt_tokens, batch.num_tokens)
            if self.trace.enabled:
                self.trace.record(
                    t=now,
                    policy=self.scheduler.policy.name,
                    phase=batch.phase,
                    seqs=batch.num_seqs,
                    tokens=batch.num_tokens,
                    preempted=len(sched_out.preempted),
                    actual_s=done_at - now,
                )
            advanced = self.scheduler.on_batch_done(batch, result.tokens)
            self._in_flight.remove(batch)
            self._outputs(advanced, result.logprobs, done_at, outputs)

    def _outputs(
        self, seqs: list[Sequence], logprobs: dict[int, Any], now: float, outputs: list[RequestOutput]
    ) -> None:
        """Append the outputs of the sequences a finished batch advanced."""
        for seq in seqs:
            req = self.requests.get(seq.request_id)
            if req is None:
                continue
            lp = logprobs.get(seq.seq_id)
            if lp is not None:
                req.logprobs.append(lp)
            if seq.params.structured is not None and not seq.is_finished and req.error is None:
                self._end_if_grammar_done(req)
            out = self._advance(req, now)
            if out is not None:
                outputs.append(out)

    def _end_if_grammar_done(self, req: _Request) -> None:
        """Advance the sequence's grammar matcher by its new tokens; end it ("stop") once the grammar is
        complete, fail it alone if the matcher rejected a token."""
        seq = req.seq
        try:
            state = self.runner.structured.advance(seq)
        except Exception as exc:
            self._fail_request(req, exc, "structured output matching failed")
            return
        if state == "stopped":
            req.grammar_done = True
            self.scheduler.finish(seq, FinishReason.STOP)
        elif state == "error":
            err = RuntimeError(f"the grammar rejected a sampled token: {self.runner.structured.error(seq)}")
            self._fail_request(req, err, "structured output matching failed")

    def _step_multiplexed(self, now: float, outputs: list[RequestOutput]) -> None:
        """Launch on the free lanes, wait for the first lane to finish, post it (`multiplex.mux_loop`). The
        other lane may still be running when this returns; the next step picks it up."""
        self._mux_context()
        executor = self._mux[1]
        if self._lanes is None:
            self._lanes = MuxLanes(self.scheduler)
        lanes = self._lanes
        self._land_copies(outputs)
        launch = lanes.launch(now)
        ticket = self._submit_copies()
        if ticket is not None:  # the lanes run on their own streams: the host waits for the copies in
            self.copier.wait(ticket)
        perf = self._mux[0].perf_model
        if launch.new_job is not None:
            executor.start_prefill(launch.new_job)
        if launch.prefill is not None and launch.prefill_layers > 0:
            job, layers = launch.prefill, launch.prefill_layers
            executor.launch_prefill(launch.split, job, layers)
            self._predicted["prefill"] = prefill_block_time(
                perf, launch.split, job, layers, contended=lanes.decode is not None
            )
            self._lane_sizes["prefill"] = (job.batch.num_tokens, layers / max(job.num_layers, 1))
        if launch.decode is not None:
            if (
                launch.decode.phase == "mixed"
            ):  # prompts folded into the decode step (the dispatcher's folding)
                self.prompt_tokens_total += sum(
                    i.num_new_tokens for i in launch.decode.items if i.seq.is_prefilling
                )
            executor.launch_decode(launch.split, launch.decode)
            self._predicted["decode"] = decode_step_time(
                perf, launch.split, launch.decode, contended=lanes.prefill is not None
            )
            self._lane_sizes["decode"] = (launch.decode.num_seqs, 1.0)
        decision = launch.decision
        taken = launch.decision_taken
        if taken is not None:
            self._decisions[taken.mode] = self._decisions.get(taken.mode, 0) + 1
            self._split = launch.output.split
            if self.trace.enabled:
                self.trace.record(
                    t=now,
                    policy=self.scheduler.policy.name,
                    **taken.to_dict(),
                    decode_seqs=launch.decode.num_seqs if launch.decode is not None else 0,
                )
        if not lanes.busy:
            if self.copies_busy:
                self._land_copies(outputs, wait=True)
            elif self.scheduler.has_unfinished and not self.scheduler.running:
                raise EngineDeadError(
                    f"multiplexed scheduler made no progress: {decision and decision.reason}"
                )
            return
        self._post_lanes(executor.wait(), outputs)

    def _post_lanes(self, finished: list[str], outputs: list[RequestOutput]) -> None:
        """Post the finished lanes' results to the scheduler; append the requests' outputs."""
        executor, lanes = self._mux[1], self._lanes
        for lane in finished:
            result = executor.collect(lane)  # type: ignore[arg-type]
            if self.runner.failed:
                self._fail_sampling()
            done_at = time.monotonic()
            if lane == "decode":
                _, seqs = lanes.decode_done(result.tokens)
            else:
                job, seqs = lanes.prefill_done(result.tokens)
                if job.done:
                    executor.finish_prefill(job)
                    self.prompt_tokens_total += job.batch.num_tokens
            predicted = self._predicted.pop(lane, None)
            self._last_step = (predicted, result.elapsed_s)
            size = self._lane_sizes.pop(lane, None)
            if size is not None and lane == "decode":
                self.costs.decode(result.elapsed_s, size[0])
            elif size is not None:  # a block of layers: scaled to the whole model (on the prefill partition)
                self.costs.prefill(result.elapsed_s / size[1], size[0])
            if self.trace.enabled:
                self.trace.record(
                    t=done_at,
                    policy=self.scheduler.policy.name,
                    lane=lane,
                    predicted_s=predicted,
                    actual_s=result.elapsed_s,
                )
            self._outputs(seqs, result.logprobs, done_at, outputs)

    def _drain_lanes(self) -> None:
        """Wait for both lanes and post them (before a policy switch); their outputs go out with the next
        step."""
        while self._lanes is not None and self._lanes.busy:
            self._post_lanes(self._mux[1].wait(), self._pending_outputs)

    # ---- the host KV tier -----------------------------------------------------------------------------
    def _submit_copies(self) -> int | None:
        """Start the KV copies the step's scheduling asked for; the ticket a forward pass must wait for when
        it reads blocks they copy in (prefix hits promoted from the host tier), else None."""
        copies = self.block_manager.take_copies()
        if copies is None:
            return None
        assert self.copier is not None, "KV copies without a host tier"
        self.copier.submit(copies)
        return copies.ticket if copies.blocking else None

    def _land_copies(self, outputs: list[RequestOutput], wait: bool = False) -> None:
        """Free what landed copies held and let the sequences they brought back run (`wait`: first submit
        what is collected and block until everything in flight landed). A copy that failed leaves KV that
        cannot be trusted anywhere it went: the engine is unusable."""
        copier = self.copier
        if copier is None or not self.copies_busy:
            return
        try:
            if wait:
                self._submit_copies()
                copier.wait_all()
            landed = copier.poll()
        except Exception as exc:
            self._die(exc)
        for ticket in landed:
            for seq in self.scheduler.copies_done(ticket):  # aborted while on its way back
                req = self.requests.get(seq.request_id)
                out = self._advance(req, time.monotonic()) if req is not None else None
                if out is not None:
                    outputs.append(out)
        costs = self.scheduler.swap_costs
        rate = copier.stats.rate_gbps("in") or copier.stats.rate_gbps("out")
        if rate:
            costs.copy_s_per_block = copier.block_bytes / (rate * 1e9)
        if self.costs.prefill_s_per_token is not None:
            costs.recompute_s_per_token = self.costs.prefill_s_per_token

    # ---- failures -------------------------------------------------------------------------------------
    def _fail_sampling(self) -> None:
        """End the sequences whose own sampling setup failed (they got no token) when their batch is
        posted; the batch's other sequences go on."""
        for seq, exc in self.runner.take_failed():
            req = self.requests.get(seq.request_id)
            if req is not None and req.error is None:
                log.warning("request %s failed while setting up its sampling: %r", seq.request_id, exc)
                req.error = request_error(exc, "sampling setup failed")
            self.scheduler.finish(seq, FinishReason.ERROR)  # in flight: retired when the batch is posted

    def _fail_request(self, req: _Request, exc: Exception, what: str) -> None:
        if is_fatal_error(exc):
            raise exc
        log.warning("request %s failed: %s: %r", req.seq.request_id, what, exc)
        req.error = request_error(exc, what)
        self.scheduler.finish(req.seq, FinishReason.ERROR)

    def _recover(self, exc: Exception, outputs: list[RequestOutput]) -> None:
        """After a step raised `exc`: fail the requests that were in flight and check that what remains is
        consistent; or, when that is not possible, mark the engine dead and raise `EngineDeadError`."""
        if is_fatal_error(exc):
            self._die(exc)
        self._failed_steps += 1
        log.error("engine step failed; failing the requests in flight", exc_info=exc)
        try:
            self._fail_in_flight(exc, outputs)
            self.check_invariants()
        except Exception as inner:  # the failure left a state we cannot trust (`exc` is its __context__)
            self._die(inner)
        if self._failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            self._die(RuntimeError(f"{self._failed_steps} steps in a row failed, the last with {exc!r}"))

    def _die(self, exc: BaseException) -> None:
        self.dead = exc
        log.critical("engine is unusable: %r", exc)
        if isinstance(exc, EngineDeadError):
            raise exc
        raise EngineDeadError(f"engine is unusable: {exc!r}") from exc

    def _fail_in_flight(self, exc: Exception, outputs: list[RequestOutput]) -> None:
        """Fail every sequence of the work in flight (its KV may be half written) and free its blocks.
        Sequences merely waiting or between steps are untouched."""
        batches = self._in_flight
        self._in_flight = []
        batches += self._quiesce_lanes()
        self.runner.take_failed()
        self.runner.clear_masks()  # the batches in flight never sample
        victims: dict[int, Sequence] = {}
        for batch in batches:
            for item in batch.items:
                victims[item.seq.seq_id] = item.seq
        for seq in self.scheduler.running:  # scheduled before the step failed, with no batch to show
            if seq.in_flight:
                victims[seq.seq_id] = seq
        now = time.monotonic()
        for seq in victims.values():
            seq.in_flight = False
            self.scheduler.finish(seq, FinishReason.ERROR)
            req = self.requests.get(seq.request_id)
            if req is None:  # already ended and reported
                continue
            if req.error is None:
                req.error = request_error(exc, "the engine step running this request failed")
            out = self._error_output(req, now)
            if out is not None:
                outputs.append(out)

    def _quiesce_lanes(self) -> list[Batch]:
        """Multiplexing: wait until neither lane still runs on the device (nothing may write the KV of a
        sequence whose blocks are about to be reused), drop every prefill job and the lanes; the batches
        that were in flight."""
        batches: list[Batch] = []
        if self._mux is not None:
            executor = self._mux[1]
            for flight in executor.lanes.values():
                batches.append(flight.batch)
                if flight.future is not None:
                    concurrent.futures.wait([flight.future])
                elif flight.event is not None:
                    flight.event.synchronize()
            executor.lanes.clear()
            executor.jobs.clear()
        lanes, policy = self._lanes, self.scheduler.policy
        if lanes is not None:
            batches += [b for b in (lanes.decode, lanes.prefill and lanes.prefill.batch) if b is not None]
        for attr in ("active", "paused"):
            job = getattr(policy, attr, None)
            if job is not None:
                batches.append(job.batch)
                setattr(policy, attr, None)
        self._lanes = None
        self._predicted.clear()
        return batches

    def check_invariants(self) -> None:
        """The scheduler's and the block pool's invariants, and every open request is queued exactly where
        its state says (tests, and after a failed step). Raises AssertionError."""
        sched = self.scheduler
        sched.check_invariants()
        queued = {id(seq) for seq in (*sched.waiting, *sched.running, *sched.swapped)}
        queued |= {id(seq) for seqs in sched.resuming.values() for seq in seqs}
        for rid, req in self.requests.items():
            seq = req.seq
            if seq.is_finished or id(seq) not in queued:
                raise AssertionError(f"request {rid!r} is open but {seq} is not queued")
        if not self.is_multiplexing and any(seq.in_flight for seq in sched.running):
            raise AssertionError("a sequence is in flight between steps")

    # ---- outputs ---------------------------------------------------------------------------------------
    def _advance(self, req: _Request, now: float) -> RequestOutput | None:
        """The output of `req` after its sequence advanced or ended; its error output once it failed."""
        if req.error is None:
            try:
                return self._advance_text(req, now)
            except Exception as exc:  # detokenizing or stop strings of this request: it fails alone
                self._fail_request(req, exc, "processing its output failed")
        return self._error_output(req, now)

    def _error_output(self, req: _Request, now: float) -> RequestOutput | None:
        """The final output of a failed request; None while its batch still runs (it ends when posted)."""
        seq = req.seq
        if not seq.is_finished:
            return None
        seq.times.finished = now
        self._forget(req)
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=req.text,
            token_ids=seq.output_token_ids,
            delta_text="",
            delta_token_ids=[],
            finished=True,
            finish_reason=FinishReason.ERROR.value,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            logprobs=list(req.logprobs) if seq.params.logprobs is not None else None,
            times=seq.times,
            slo=seq.slo,
            error=req.error,
        )

    def _advance_text(self, req: _Request, now: float) -> RequestOutput | None:
        seq = req.seq
        new_ids = seq.output_token_ids[req.num_reported_tokens :]
        if new_ids:
            self.generation_tokens_total += len(new_ids)
            if seq.times.first_token is None:
                seq.times.first_token = now
            seq.times.last_token = now
            # A stop token or EOS that ended the sequence is not part of the text (vLLM semantics).
            by_token = (
                seq.is_finished
                and seq.finish_reason is FinishReason.STOP
                and not isinstance(seq.stop_reason, str)
                and not req.grammar_done
            )
            stop = req.detok.update(new_ids, stop_terminated=by_token)
            if stop is not None and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP, stop)
        if not new_ids and not seq.is_finished:
            return None
        if seq.is_finished:
            req.detok.finish()
            seq.times.finished = now
            self._forget(req)
        req.num_reported_tokens = seq.num_output_tokens
        delta_lp = req.logprobs[req.num_reported_logprobs :]
        req.num_reported_logprobs = len(req.logprobs)
        # Text is the sum of released deltas: output_text would rebuild the whole string every step.
        delta = req.detok.take_delta()
        req.text += delta
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            text=req.text,
            token_ids=seq.output_token_ids,
            delta_text=delta,
            delta_token_ids=new_ids,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            stop_reason=seq.stop_reason,
            num_cached_tokens=max(seq.num_cached_tokens, 0),
            logprobs=list(req.logprobs) if seq.params.logprobs is not None else None,
            delta_logprobs=delta_lp,
            times=seq.times,
            slo=seq.slo,
        )

    def update_settings(
        self,
        policy: str | None = None,
        partition: dict | None = None,
        slo_ttft_ms: float | None = None,
        slo_tpot_ms: float | None = None,
        fairness: str | None = None,
        preemption_mode: str | None = None,
    ) -> None:
        """Change the policy, partition settings, default SLO targets, fairness or preemption mode at run time
        (between steps). Validated as a whole first, so a bad value changes nothing."""
        update: dict = {}
        if fairness is not None:
            update["fairness"] = fairness
        if preemption_mode is not None:
            update["preemption_mode"] = preemption_mode
        if policy is not None:
            update["policy"] = policy
        if partition is not None:
            update["partition"] = self.config.partition.model_dump() | partition
        if slo_ttft_ms is not None:
            update["slo_ttft_ms"] = slo_ttft_ms
        if slo_tpot_ms is not None:
            update["slo_tpot_ms"] = slo_tpot_ms
        new = EngineConfig.model_validate(self.config.model_dump() | update)
        new_policy = (
            make_policy(new.policy, new, self._mux_context) if new.policy != self.config.policy else None
        )
        if new_policy is not None and self.is_multiplexing:
            try:
                self._drain_lanes()
            except Exception as exc:  # as in a step: the work in flight fails, its outputs go out next step
                self._recover(exc, self._pending_outputs)
            self._requeue_prefill_jobs()
            self._lanes = None
        self.config = new
        self.scheduler.config.preemption_mode = new.preemption_mode
        self.scheduler.config.default_slo = new.default_slo  # for requests queued from now on
        self.scheduler.set_fairness(new.fairness)
        if new_policy is not None:
            self.scheduler.policy = new_policy
        elif hasattr(self.scheduler.policy, "reconfigure"):
            self.scheduler.policy.reconfigure(new)

    def pending_prefill_tokens(self) -> int:
        """Tokens without KV of the waiting requests (a preempted one recomputes its output too) and of the
        running ones still prefilling; a running decode's newest token does not count."""
        sched = self.scheduler
        pending = sum(len(s.token_ids) - s.num_computed_tokens for s in sched.waiting)
        return pending + sum(s.num_uncomputed_tokens for s in sched.running if s.is_prefilling)

    def stats(self) -> EngineStats:
        bm, costs = self.block_manager, self.costs
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=bm.usage,
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
            policy=self.scheduler.policy.name,
            split=self._split if self.is_multiplexing else None,
            realized_split=self._realized_split() if self.is_multiplexing else None,
            total_sms=self._mux[1].partitioner.total_sms if self._mux else None,
            decisions=dict(self._decisions),
            predicted_step_s=self._last_step[0],
            actual_step_s=self._last_step[1],
            pending_prefill_tokens=self.pending_prefill_tokens(),
            prefill_s_per_token=costs.prefill_s_per_token,
            decode_step_s=costs.decode_step_s,
            decode_batch=costs.decode_batch,
            **self._tier_stats(),
        )

    def _tier_stats(self) -> dict[str, Any]:
        bm, sched = self.block_manager, self.scheduler
        copies = self.copier.stats if self.copier is not None else None
        return {
            "num_host_kv_blocks": bm.num_host_blocks,
            "num_free_host_kv_blocks": bm.num_free_host_blocks,
            "num_swapped": len(sched.swapped) + sched.num_resuming,
            "prefix_cache_host_hits": bm.prefix_host_hits,
            "num_swap_preemptions": sched.num_swap_preemptions,
            "num_fairness_preemptions": sched.num_fairness_preemptions,
            "recomputed_tokens": sched.num_recomputed_tokens,
            "kv_blocks_moved": {
                "demoted": bm.demoted_blocks,
                "promoted": bm.promoted_blocks,
                "swapped_out": bm.swapped_out_blocks,
                "swapped_in": bm.swapped_in_blocks,
                "reused": bm.reused_blocks,
            },
            "kv_copies": dict(copies.copies) if copies else {},
            "kv_copy_bytes": dict(copies.bytes) if copies else {},
            "kv_copy_seconds": dict(copies.seconds) if copies else {},
        }

    # ---- offline convenience ------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | abc.Sequence[str] | abc.Sequence[abc.Sequence[int]],
        params: SamplingParams | abc.Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """The final output of every prompt, in order. Invalid input raises before anything runs; a request
        that fails in the engine comes back alone with finish_reason "error" and its `error` set."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError("need one SamplingParams per prompt, or a single one for all")
        base = f"gen-{time.monotonic_ns()}-"
        ids = [f"{base}{i}" for i in range(len(prompts))]
        # All validated before any is added: a bad one raises and leaves nothing running.
        seqs = [self.make_sequence(rid, pr, p) for rid, pr, p in zip(ids, prompts, plist, strict=True)]
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts), desc="generate", unit="req")
        try:
            for seq in seqs:
                self.add_sequence(seq)
            while len(final) < len(ids):
                for out in self.step():
                    if out.finished:
                        final[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            while self.copies_busy:  # blocks the last requests freed are still being saved to the host tier
                self.step()
        finally:
            if bar is not None:
                bar.close()
            for rid in ids:
                if rid not in final:
                    self.abort_request(rid)
        return [final[rid] for rid in ids]
