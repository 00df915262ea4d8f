"""The decoding engine: continuous batching of requests, each with its own draft policy.

Each :meth:`DecodingEngine.step` admits waiting requests (one prefill forward for them), then runs one
decoding forward over every running request, old and new: each request's policy lays out its segments (a draft, recycled
candidates, pseudo blocks), the engine batches them with a 4D mask over the ragged cache, and each policy
verifies its part of the logits and commits tokens. Requests join and leave between forwards. The engine
is synchronous and not thread-safe: one thread drives it (the server runs it in a background thread).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from jf_ray.decoding.auto import AutoPolicy, measure_cost_curve
from jf_ray.decoding.cache import RaggedKVCache
from jf_ray.decoding.gains import GainTable, menu_length
from jf_ray.decoding.planner import CostCurve, DraftPlan, DraftShape, ObservedCosts, StepOverhead, plan_drafts
from jf_ray.decoding.query import Segment, build_query, prefill_query
from jf_ray.decoding.realized import RealizedRates
from jf_ray.decoding.registry import policy_builder
from jf_ray.decoding.request import RequestState, SegmentOutput
from jf_ray.decoding.types import DecodeConfig, DecodeResult, DecodeStats, FinishReason, TokenLogprob
from jf_ray.errors import UserInputError
from jf_ray.modeling import attention_backends

logger = logging.getLogger(__name__)

CANDIDATE_ROOM = 1.5  # recycled candidates are offered while a 4-wide forward costs at most this times AR's
# A plan of AR stands this many steps at the same batch size (rounded down to a power of two): at AR no window is
# judged, so nothing the planner reads moves but the step's timing, and planning a saturated batch of 64 rows
# cost 5% of its step.
AR_PLAN_STEPS = 8


@dataclass
class StepOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    stats: DecodeStats
    result: DecodeResult | None = None  # set when finished
    new_logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked for logprobs


def make_policy(config: DecodeConfig):
    """The draft policy of ``config.decoder``, built as the registry says (jf_ray.decoding.registry)."""
    return policy_builder(config.decoder)(config)


class DecodingEngine:
    def __init__(
        self,
        model,
        eos_token_ids: list[int],
        max_batch_size: int = 8,
        pad_token_id: int = 0,
        cost_curve: CostCurve | None = None,
    ):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.pad_token_id = pad_token_id
        self.max_positions = getattr(model.config, "max_position_embeddings", None)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.cache = RaggedKVCache(self.device)
        self.last_batch_size = 0
        self.forward_s = 0.0  # time spent inside the model; wall time minus this is the engine's overhead
        self._cost_curve = cost_curve  # measured on first use by an ``auto`` request when not given
        # A decoding step's time outside the model (fixed, per query token, per token committed): auto plans
        # with it. The engine times its own part unless its driver times whole steps, delivery and streaming
        # included, and feeds those (jf_ray.serving.scheduler does; docs/load-aware-decoding.md).
        self.overhead = StepOverhead()
        self.overhead_timed_by_caller = False
        self.last_step_query = 0  # query tokens (rows x width) of the last decoding forward
        self.last_step_tokens = 0  # tokens it committed
        self.realized = RealizedRates()  # what drafting earned against AR, by batch size: the planner's guard
        self.gain_table = GainTable()  # tokens per forward by window length: one model, shared by auto requests
        self.forward_costs: ObservedCosts | None = None  # the cost curve, corrected by timed decoding forwards
        self.last_plan: DraftPlan | None = None  # the load-aware plan of the last forward, if any
        self._kept_width: int | None = None  # the last load-aware plan's width, kept unless another pays more
        self._ar_planned: dict[int, int] = {}  # batch size (power of two) -> steps its last AR plan still stands

    # -- requests ------------------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_ids: list[int], config: DecodeConfig) -> None:
        self.validate(prompt_ids, config)
        req = RequestState(request_id, list(prompt_ids), config, self.eos_token_ids, policy=make_policy(config))
        self.waiting.append(req)

    def validate(self, prompt_ids: list[int], config: DecodeConfig) -> None:
        check_request(prompt_ids, config, self.vocab_size, self.max_positions)

    def abort(self, request_id: str) -> None:
        """Stop a request; it leaves the batch at the next step (its slot is freed)."""
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
        for req in self.running:
            if req.request_id == request_id and not req.finished:
                req.close("abort")

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        outputs = [self._output(req) for req in self.running if req.finished]  # aborted since the last step
        self._drop_finished()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            outputs += [self._output(req) for req in admitted if req.finished]  # ended on their first token
            self._drop_finished()
        if self.running:  # new and old requests decode together right away: arrivals never stall the batch
            self._decode()
        outputs += [self._output(req) for req in self.running if len(req.generated) > req.emitted or req.finished]
        self._drop_finished()
        return outputs

    def _admit(self) -> list[RequestState]:
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            admitted.append(self.waiting.popleft())
        return admitted

    def _prefill(self, admitted: list[RequestState]) -> None:
        query = prefill_query([r.prompt_ids for r in admitted], self.dtype, self.device, self.pad_token_id)
        fresh = RaggedKVCache(self.device, num_rows=len(admitted))
        for req in admitted:
            req.started_at = time.perf_counter()
        logits = self._forward(query, fresh)
        for b, req in enumerate(admitted):
            fresh.commit(b, 0, len(req.prompt_ids))
            req.log_forward()
            req.stats.prefill_tokens = len(req.prompt_ids)
            req.start(logits[b, len(req.prompt_ids) - 1])
        self.cache.append_rows(fresh)
        self.running.extend(admitted)

    def ensure_cost_curve(self) -> CostCurve:
        """ms per forward by rows and query width: given, or measured now (once) up to this engine's limits."""
        if self._cost_curve is None:
            widths = [r.config.block_size for r in self.running if isinstance(r.policy, AutoPolicy)]
            self._cost_curve = measure_cost_curve(self.model, self.max_batch_size, max([64, *widths]))
        if self.forward_costs is None or self.forward_costs.curve is not self._cost_curve:
            self.forward_costs = ObservedCosts(self._cost_curve)  # corrected by every decoding forward from now on
        return self._cost_curve

    def _plan(self) -> None:
        """Lay out every running request's segments; ``auto`` shapes are chosen last, knowing the others."""
        sized = [req for req in self.running if isinstance(req.policy, AutoPolicy)]
        for req in self.running:  # every running request is unfinished here (see step)
            # multiblock: the verification budget (pool_size candidates) is shared by the batch: extra candidate
            # rows buy tokens per forward when the hardware has idle parallelism, and only cost time once the
            # batch already fills it (auto's planner sizes its candidates itself).
            req.verify_budget = req.config.pool_size // len(self.running)
            if not isinstance(req.policy, AutoPolicy):
                req.segments = req.policy.plan(req)
        self.last_plan = None
        if sized:
            rows = menu_length(len(self.running))
            if not self.realized.allows_drafting(len(self.running)):
                plan = _ar_plan(sized)  # drafting earned less than AR at this batch size (realized.py)
            elif self._ar_planned.get(rows, 0) > 0:
                self._ar_planned[rows] -= 1
                plan = _ar_plan(sized)
            else:
                plan = self._plan_drafts(sized)
                self._ar_planned[rows] = AR_PLAN_STEPS - 1 if plan.width == 1 else 0
            self.last_plan, self._kept_width = plan, plan.menu_width
            for req, shape in zip(sized, self.last_plan.shapes):
                req.policy.resize(req, shape)
                req.segments = req.policy.plan(req)
        for req in self.running:
            record_shape(req.stats, req.segments)

    def _plan_drafts(self, sized: list[RequestState]) -> DraftPlan:
        """The planner's shapes for the ``auto`` requests, beside the others' fixed segments."""
        fixed = [req for req in self.running if not isinstance(req.policy, AutoPolicy)]
        others = [sum(len(s.tokens) for s in req.segments) for req in fixed]
        costs = self.forward_costs  # the curve measured by _decode before its clock started, as corrected
        # A candidate at least doubles a row's width for less than a token: not worth looking for once a
        # 4-wide forward of this batch already costs half as much again as AR (past the curve's knee).
        batch = len(self.running)
        with_candidates = costs.cost_ms(batch, 4) <= CANDIDATE_ROOM * costs.cost_ms(batch, 1)
        rows = [req.policy.draft_row(req, with_candidates) for req in sized]
        for row in rows:
            row.acceptance.table = self.gain_table
        return plan_drafts(costs, rows, len(others), max(others, default=1), self.overhead, self._kept_width)

    def _decode(self) -> None:
        if any(isinstance(req.policy, AutoPolicy) for req in self.running):
            self.ensure_cost_curve()  # a measurement is not the engine's overhead: done before the clock starts
        started, forward_before = time.perf_counter(), self.forward_s
        tokens_before = sum(len(req.generated) for req in self.running)
        self._plan()
        query = build_query([r.segments for r in self.running], self.cache.valid, self.dtype, self.pad_token_id)
        slots_before = self.cache.num_slots
        logits = self._forward(query, self.cache)
        if self.forward_costs is not None:
            rows, width = query.input_ids.shape
            self.forward_costs.observe(rows, width, (self.forward_s - forward_before) * 1000.0)
        predictions = logits.argmax(dim=-1).tolist()
        for b, req in enumerate(self.running):
            req.offsets = query.offsets[b]
            row_predictions, row_logits = predictions[b], logits[b]
            req.outputs = [
                SegmentOutput(row_predictions[o : o + len(s.tokens)], row_logits, o)
                for s, o in zip(req.segments, req.offsets)
            ]
            req.log_forward()
            req.policy.update(req)
            offset, count = req.kv_commit
            self.cache.commit(b, slots_before + offset, count)
            req.outputs = []
        self.cache.maybe_compact()
        self.last_step_query = query.input_ids.numel()
        self.last_step_tokens = sum(len(req.generated) for req in self.running) - tokens_before
        if not self.overhead_timed_by_caller:
            wall_ms = (time.perf_counter() - started) * 1000.0
            self.observe_step(wall_ms - (self.forward_s - forward_before) * 1000.0, wall_ms)

    def observe_step(self, outside_ms: float, wall_ms: float) -> None:
        """The last decoding step's time outside the model's forwards and in all, measured by the engine or by
        its driver (a server times whole steps, streaming included): for the planner's overhead fit and guard."""
        self.overhead.observe(self.last_step_query, self.last_step_tokens, outside_ms)
        if self.last_plan is not None:
            drafted = self.last_plan.width > 1
            self.realized.observe(self.last_batch_size, drafted, self.last_step_tokens, wall_ms / 1000.0)

    def _forward(self, query, cache: RaggedKVCache) -> torch.Tensor:
        self.last_batch_size = query.input_ids.shape[0]
        start = time.perf_counter()
        with attention_backends(self.device):  # no cuDNN attention on CUDA: see modeling
            out = self.model(
                input_ids=query.input_ids,
                position_ids=query.position_ids,
                attention_mask=query.attention_mask,
                past_key_values=cache.kv,
                use_cache=True,
            )
        self.forward_s += time.perf_counter() - start
        cache.extend_slots(query.input_ids.shape[1])
        return out.logits

    def _output(self, req: RequestState) -> StepOutput:
        new = req.generated[req.emitted :]
        logprobs = req.logprobs[req.emitted :] if req.config.logprobs is not None else None
        req.emitted = len(req.generated)
        result = None
        if req.finished:
            req.close()
            trajectory = req.policy.trajectory(req) if req.config.record_trajectory else None
            result = DecodeResult(list(req.generated), req.finish_reason, req.stats, trajectory)
        return StepOutput(req.request_id, new, req.finished, req.finish_reason, req.stats, result, logprobs)

    def _drop_finished(self) -> None:
        keep = [b for b, req in enumerate(self.running) if not req.finished]
        if len(keep) == len(self.running):
            return
        self.running = [self.running[b] for b in keep]
        if keep:
            self.cache.keep_rows(keep)
        else:
            self.cache = RaggedKVCache(self.device)


def check_request(prompt_ids: list[int], config: DecodeConfig, vocab_size: int, max_positions: int | None) -> None:
    """A request this engine can decode: a prompt of known token ids that fits the context with its tokens."""
    if not prompt_ids:
        raise UserInputError("the prompt is empty")
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise UserInputError(f"prompt has token ids outside the vocabulary [0, {vocab_size})")
    if max_positions and len(prompt_ids) + config.max_new_tokens > max_positions:
        raise UserInputError(
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
            f"model's context of {max_positions} tokens"
        )


def _ar_plan(sized: list[RequestState]) -> DraftPlan:
    return DraftPlan([DraftShape(1)] * len(sized), 1, 0.0, 1)


def record_shape(stats: DecodeStats, segments: list[Segment]) -> None:
    """Count one decoding forward's shape: main draft length, candidates, blocks in flight and query tokens.

    A recycled candidate sees only the cache, a pseudo-active block sees the drafts before it
    (jf_ray/decoding/query.py); both follow the main draft.
    """
    pseudo = sum(1 for s in segments[1:] if s.sees)
    stats.draft_hist[len(segments[0].tokens)] += 1
    stats.candidates_hist[len(segments) - 1 - pseudo] += 1
    stats.blocks_hist[1 + pseudo] += 1
    stats.query_tokens += sum(len(s.tokens) for s in segments)


def generate(
    model,
    prompts: list[list[int]],
    config: DecodeConfig,
    eos_token_ids: list[int],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    cost_curve: CostCurve | None = None,
    on_step: Callable[[DecodingEngine], None] | None = None,
) -> list[DecodeResult]:
    """Decode every prompt with ``config``, ``batch_size`` at a time (continuous batching); results in order.

    ``progress(n)``: ``n`` more prompts have finished since the last call (a tqdm bar's ``update``); this is
    what ``progress`` means wherever a decode reports it (trajectory backends, benchmarks). ``cost_curve``
    serves the ``auto`` decoder (measured on first use when not given). ``on_step(engine)`` runs after every
    step: the decoder benchmark reads the engine's time inside the model from it (docs/benchmarking.md)."""
    engine = DecodingEngine(model, eos_token_ids, max_batch_size=batch_size, cost_curve=cost_curve)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt, config)
    results: dict[int, DecodeResult] = {}
    while engine.has_work:
        finished = [out for out in engine.step() if out.result is not None]
        for out in finished:
            results[int(out.request_id)] = out.result
        if progress is not None and finished:
            progress(len(finished))
        if on_step is not None:
            on_step(engine)
    return [results[i] for i in range(len(prompts))]
