"""Continuous batching for a server: one thread drives the synchronous ``DecodingEngine``; asyncio handlers
talk to it through a command queue and per-request asyncio queues.

The engine is not thread-safe, so only the engine thread touches it: ``submit`` and ``abort`` enqueue
commands that the thread applies between two steps (this is where requests join and leave the batch).
Outputs go back to the waiting handlers with ``loop.call_soon_threadsafe``, coalesced: a request's first and
last outputs at once, the others for all requests together once per interval: ``stream_interval_s``, or longer
where ``stream_chunks_per_s`` would be exceeded with this many requests running. A handler (and the SSE chunk
it sends through Serve's proxy) then wakes once per interval rather than once per engine step. The
time each step spends outside the model's forwards, this thread's delivery and waits included, is measured
and handed to the engine, whose ``auto`` planner counts it (docs/serving.md). No Ray here: the Serve
deployment wraps this, and the tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from jf_ray.decoding.types import DecodeConfig

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The replica holds ``max_batch_size + max_queued_requests`` requests already."""


class EngineFailure(RuntimeError):
    """The engine raised during a step; the requests in that batch end with this error."""


class StepObserver(Protocol):
    def on_step(self, batch_size: int, running: int, queue_length: int, step_s: float) -> None: ...


@dataclass
class StepEvent:
    """What one engine step produced for one request, as seen by its handler."""

    output: object  # jf_ray.decoding StepOutput: request_id, new_token_ids, finished, finish_reason, stats
    batch_size: int  # requests in the forward that produced it


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop | None  # None: the handler is in another process, reached through ``relay``
    queue: asyncio.Queue | None
    request_id: str = ""
    started: bool = False  # its first output went out (that one is never held back: time to first token)
    pending: list = field(default_factory=list)  # StepEvents held back until the next flush


@dataclass
class SchedulerStats:
    steps: int = 0
    admitted: int = 0
    finished: int = 0
    aborted: int = 0
    rejected: int = 0
    batch_size_hist: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        sizes = self.batch_size_hist
        return {
            "steps": self.steps,
            "admitted": self.admitted,
            "finished": self.finished,
            "aborted": self.aborted,
            "rejected": self.rejected,
            "max_batch_size_seen": max(sizes) if sizes else 0,
            "batch_size_hist": {str(k): v for k, v in sorted(sizes.items())},
        }


class StreamCapacity:
    """The open streams a scheduler counts, and the limit it answers 503 beyond: shared by the engine thread's
    :class:`BatchScheduler` and the replica's side of the engine process (jf_ray.serving.engine_process)."""

    max_batch_size: int
    capacity: int  # max_batch_size + the requests that may wait for a slot
    stats: SchedulerStats
    _streams: dict

    @property
    def num_active(self) -> int:
        return len(self._streams)

    @property
    def queue_length(self) -> int:
        """Requests accepted but not (yet) in the running batch."""
        return max(0, self.num_active - self.max_batch_size)

    def _check_room(self) -> None:
        """Raise QueueFullError (counted) when another stream would exceed the capacity; call under the lock."""
        if len(self._streams) >= self.capacity:
            self.stats.rejected += 1
            raise QueueFullError(
                f"server overloaded: {self.max_batch_size} requests decoding and "
                f"{self.capacity - self.max_batch_size} queued; retry later"
            )


class BatchScheduler(StreamCapacity):
    def __init__(
        self,
        engine,
        max_batch_size: int,
        max_queued_requests: int,
        observer: StepObserver | None = None,
        stream_interval_s: float = 0.0,
        stream_chunks_per_s: float | None = None,
        relay: Callable[[list[tuple[str, object]]], None] | None = None,
    ) -> None:
        self.engine = engine
        self.relay = relay  # takes (request_id, StepEvent or exception) pairs of streams enqueued without a loop
        engine.overhead_timed_by_caller = True  # _measure_overhead times whole steps, delivery included
        self.stream_interval_s = stream_interval_s
        self.stream_chunks_per_s = stream_chunks_per_s
        self.capacity = max_batch_size + max_queued_requests
        self.max_batch_size = max_batch_size
        self.observer = observer
        self.stats = SchedulerStats()
        self._streams: dict[str, _Stream] = {}
        self._commands: list[tuple] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._held: dict[str, _Stream] = {}  # streams with pending events (engine thread only)
        self._flushed_at = time.perf_counter()
        self._last_start: tuple[float, float] | None = None  # (wall, engine.forward_s) when the last step began
        self.step_overhead_ms = 0.0  # running average of a busy step's wall time outside the model's forwards
        self._thread = threading.Thread(target=self._run, name="jf-ray-engine", daemon=True)

    # ---- handler side (any thread / the event loop) ----
    def start(self) -> BatchScheduler:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, request_id: str, prompt_ids: list[int], config: DecodeConfig) -> asyncio.Queue:
        """Queue a request; its StepEvents (or an exception) arrive on the returned queue, in order."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request_id)
        self._enqueue(stream, prompt_ids, config)
        return stream.queue

    def enqueue(self, request_id: str, prompt_ids: list[int], config: DecodeConfig) -> None:
        """Queue a request whose events go to ``relay`` (the engine process: jf_ray.serving.engine_process)."""
        self._enqueue(_Stream(None, None, request_id), prompt_ids, config)

    def _enqueue(self, stream: _Stream, prompt_ids: list[int], config: DecodeConfig) -> None:
        with self._wakeup:
            self._check_room()
            self._streams[stream.request_id] = stream
            self._commands.append(("add", stream.request_id, prompt_ids, config))
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone, stop string hit): frees its batch slot before the next step."""
        with self._wakeup:
            if self._streams.pop(request_id, None) is None:
                return
            self.stats.aborted += 1
            self._commands.append(("abort", request_id))
            self._wakeup.notify()

    def snapshot(self) -> dict:
        return {
            "alive": self.alive,
            "active": self.num_active,
            "queued": self.queue_length,
            "step_overhead_ms": round(self.step_overhead_ms, 3),
            **self.stats.to_dict(),
        }

    # ---- engine thread ----
    def _run(self) -> None:
        logger.info("engine thread started (max batch %d, capacity %d)", self.max_batch_size, self.capacity)
        while True:
            with self._wakeup:
                while not (self._stopping or self._commands or self.engine.has_work):
                    self._last_start = None  # idle time is no step's overhead
                    self._wakeup.wait()
                if self._stopping:
                    break
                commands, self._commands = self._commands, []
            self._apply(commands)
            if self.engine.has_work:
                self._step()
        logger.info("engine thread stopped")

    def _apply(self, commands: list[tuple]) -> None:
        for command in commands:
            if command[0] == "add":
                _, request_id, prompt_ids, config = command
                if request_id in self._streams:  # not aborted while it waited for the thread
                    self._add(request_id, prompt_ids, config)
            else:
                self.engine.abort(command[1])

    def _add(self, request_id: str, prompt_ids: list[int], config: DecodeConfig) -> None:
        try:
            self.engine.add(request_id, prompt_ids, config)
        except Exception as exc:  # the engine's own validation; the server checks the same limits first
            with self._wakeup:
                stream = self._streams.pop(request_id, None)
            if stream is not None:
                self._post(stream, exc)
            return
        self.stats.admitted += 1

    def _step(self) -> None:
        started = time.perf_counter()
        self._measure_overhead(started)
        try:
            outputs = self.engine.step()
        except Exception as exc:  # keep the replica serving: fail this batch, not the process
            logger.exception("engine step failed; failing the running requests")
            self._fail_all(EngineFailure(f"decoding failed: {exc}"))
            return
        step_s = time.perf_counter() - started
        batch_size = self.engine.last_batch_size  # rows of the step's forward (prefill or decode)
        self.stats.steps += 1
        self.stats.batch_size_hist[batch_size] += 1
        self._deliver(outputs, batch_size)
        if self.observer is not None:
            self.observer.on_step(batch_size, self.engine.num_running, self.queue_length, step_s)

    def _measure_overhead(self, now: float) -> None:
        """Wall time since the last step began minus its forwards: what a step costs outside the model, the
        serving path included; the engine's planner learns it against the tokens that step committed."""
        forward_s = self.engine.forward_s
        if self._last_start is not None:
            began, forward_before = self._last_start
            outside_ms = ((now - began) - (forward_s - forward_before)) * 1000.0
            self.step_overhead_ms = 0.8 * self.step_overhead_ms + 0.2 * outside_ms
            self.engine.observe_step(outside_ms, (now - began) * 1000.0)
        self._last_start = (now, forward_s)

    def _deliver(self, outputs: list, batch_size: int) -> None:
        """Hand a step's outputs to their handlers: first and last outputs now, the rest once per interval,
        with one wake-up per event loop, not one per request."""
        now = time.perf_counter()
        interval = self.stream_interval_s
        if self.stream_chunks_per_s:  # every running request sends one chunk per flush
            interval = max(interval, self.engine.num_running / self.stream_chunks_per_s)
        flush_all = now - self._flushed_at >= interval
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._wakeup:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:  # aborted by its handler meanwhile
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                    self.stats.finished += 1
                stream.pending.append(StepEvent(out, batch_size))
                if out.finished or not stream.started:
                    self._release(stream, per_loop)
                    self._held.pop(out.request_id, None)
                else:
                    self._held[out.request_id] = stream
            if flush_all:
                self._flushed_at = now
                held, self._held = self._held, {}
                for request_id, stream in held.items():
                    if request_id in self._streams:  # not aborted since it was held
                        self._release(stream, per_loop)
        for loop, items in per_loop.items():
            if loop is None:
                self.relay(items)
            else:
                loop.call_soon_threadsafe(put_all_events, items)

    @staticmethod
    def _release(stream: _Stream, per_loop: dict) -> None:
        stream.started = True
        to = stream.queue if stream.loop is not None else stream.request_id
        per_loop.setdefault(stream.loop, []).extend((to, event) for event in stream.pending)
        stream.pending = []

    def _post(self, stream: _Stream, item: object) -> None:
        if stream.loop is None:
            self.relay([(stream.request_id, item)])
        else:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> None:
        with self._wakeup:
            streams, self._streams = self._streams, {}
            self._held = {}  # their held events are superseded by the error
        for request_id, stream in streams.items():
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine may not know it (never admitted); nothing to free then
                logger.debug("abort of %s after failure raised", request_id, exc_info=True)
            self._post(stream, error)


def put_all_events(items: list[tuple[asyncio.Queue, StepEvent]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
