"""The decoding engine in a process of its own, beside the replica that answers HTTP (docs/serving.md).

In one process the engine thread shares the interpreter lock with the replica's event loops, Ray's threads and
the ASGI stack: at 64 streaming clients on 2 cores it was off the CPU about 30% of the time (py-spy), waiting
for the lock, while a core stood 30% idle. Here a child process holds the model, the engine and its
:class:`~jf_ray.serving.scheduler.BatchScheduler` thread, exactly as one process would; the replica keeps
tokenizing, detokenizing and streaming. Two one-way pipes: commands in (add, abort, stop) and events out (each
request's step events in order, or its error; step records for the metrics now and then). The child exits
when the replica goes (its command pipe closes); if the child dies, every open request ends with an
:class:`~jf_ray.serving.scheduler.EngineFailure` (a clean 5xx) and the replica reports itself unhealthy, so
Serve replaces it. No Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass

from jf_ray.decoding.engine import check_request
from jf_ray.decoding.types import DecodeConfig
from jf_ray.serving.config import ServeConfig
from jf_ray.serving.scheduler import (
    BatchScheduler,
    EngineFailure,
    QueueFullError,
    SchedulerStats,
    StepObserver,
    StreamCapacity,
    put_all_events,
)

logger = logging.getLogger(__name__)

STEP_RECORDS_EVERY_S = 0.25  # the child sends its step records (metrics) at least this often while busy


@dataclass(frozen=True)
class EngineInfo:
    """What the replica needs to know of the engine to check requests before they reach it."""

    context_length: int
    vocab_size: int
    max_positions: int | None

    @classmethod
    def of(cls, engine) -> EngineInfo:
        return cls(context_length(engine.model), engine.vocab_size, engine.max_positions)

    def validate(self, prompt_ids: list[int], config: DecodeConfig) -> None:
        """The engine's own checks (:func:`jf_ray.decoding.engine.check_request`), before the request is sent."""
        check_request(prompt_ids, config, self.vocab_size, self.max_positions)


def context_length(model) -> int:
    """Longest sequence the checkpoint was built for (prompt + completion)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot tell the context length of {type(model).__name__}; set max_position_embeddings")


def load_engine(config: ServeConfig):
    """The model and its engine, with the ``auto`` cost curve measured now (where not loaded), not in the
    first request."""
    from jf_ray.decoding import DecodingEngine
    from jf_ray.modeling import eos_token_ids, load_model, load_tokenizer

    model = load_model(config.model, dtype=config.dtype, device=config.device)
    eos = eos_token_ids(model, load_tokenizer(config.model))
    engine = DecodingEngine(model, eos, max_batch_size=config.max_batch_size, cost_curve=load_cost_curve(config))
    if config.decode.decoder == "auto":
        logger.info("auto decoder: forward cost curve %s", engine.ensure_cost_curve().to_dict())
    return engine


def load_cost_curve(config: ServeConfig):
    """The auto decoder's forward cost curve from ``config.cost_curve``; None means measure it."""
    if config.cost_curve is None:
        return None
    from jf_ray.decoding.planner import CostCurve
    from jf_ray.storage import read_json

    return CostCurve.from_dict(read_json(config.cost_curve))


def start_scheduler(engine, config: ServeConfig, observer: StepObserver | None = None, relay=None) -> BatchScheduler:
    return BatchScheduler(
        engine,
        config.max_batch_size,
        config.max_queued_requests,
        observer,
        stream_interval_s=config.stream_interval_ms / 1000.0,
        stream_chunks_per_s=config.stream_chunks_per_s,
        relay=relay,
    ).start()


class EngineProcess(StreamCapacity):
    """The replica's side: the same ``submit``/``abort``/``snapshot`` as a :class:`BatchScheduler`."""

    def __init__(self, config: ServeConfig, observer: StepObserver | None = None, start_timeout_s: float = 900.0):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads, CUDA-safe
        commands_in, self._commands = context.Pipe(duplex=False)
        self._events, events_out = context.Pipe(duplex=False)
        self.process = context.Process(
            target=_engine_main, args=(config, commands_in, events_out), name="jf-ray-engine", daemon=True
        )
        self.process.start()
        commands_in.close()
        events_out.close()
        self.info = self._wait_ready(start_timeout_s)
        self.max_batch_size = config.max_batch_size
        self.capacity = config.max_batch_size + config.max_queued_requests
        self.observer = observer
        self.stats = SchedulerStats()  # rejections and aborts are counted here, the engine's counters arrive
        self.engine_stats: dict = {}
        self.step_overhead_ms = 0.0
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._closed = False  # set under the lock once the events pipe closed: no stream may be added after
        self._receiver = threading.Thread(target=self._receive, name="jf-ray-engine-events", daemon=True)
        self._receiver.start()

    def _wait_ready(self, timeout_s: float) -> EngineInfo:
        try:
            if not self._events.poll(timeout_s):
                raise RuntimeError(f"the engine process did not start within {timeout_s:.0f} s")
            kind, payload = self._events.recv()
        except EOFError:
            kind, payload = "failed", f"it exited with code {self.process.exitcode}"
        if kind != "ready":
            self.process.terminate()
            raise RuntimeError(f"the engine process failed to start: {payload}")
        return payload

    # ---- handler side ----
    def submit(self, request_id: str, prompt_ids: list[int], config: DecodeConfig) -> asyncio.Queue:
        """Queue a request; its StepEvents (or an exception) arrive on the returned queue, in order."""
        events: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self._closed or not self.alive:
                events.put_nowait(EngineFailure("the engine process has stopped"))
                return events
            self._check_room()
            self._streams[request_id] = (asyncio.get_running_loop(), events)
            self._send(("add", request_id, prompt_ids, config))
        return events

    def abort(self, request_id: str) -> None:
        with self._lock:
            if self._streams.pop(request_id, None) is None:
                return
            self.stats.aborted += 1
            self._send(("abort", request_id))

    def _send(self, command: tuple) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the child is gone: the receiver fails the open requests
            logger.warning("engine process unreachable; %s not delivered", command[0])

    @property
    def alive(self) -> bool:
        return not (self._stopping or self._closed) and self.process.is_alive() and self._receiver.is_alive()

    def snapshot(self) -> dict:
        local = {"aborted": self.stats.aborted, "rejected": self.stats.rejected}
        return {
            "alive": self.alive,
            "active": self.num_active,
            "queued": self.queue_length,
            "step_overhead_ms": round(self.step_overhead_ms, 3),
            **self.engine_stats,
            **local,
        }

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._send(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)

    # ---- the events thread ----
    def _receive(self) -> None:
        try:
            while True:
                kind, payload = self._events.recv()
                if kind == "events":
                    self._dispatch(payload)
                else:
                    self._record(*payload)
        except (EOFError, OSError):
            pass
        if not self._stopping:
            logger.error("the engine process exited (code %s); failing its requests", self.process.exitcode)
        with self._lock:
            streams, self._streams, self._closed = self._streams, {}, True
        for loop, events in streams.values():
            loop.call_soon_threadsafe(events.put_nowait, EngineFailure("the engine process exited"))

    def _dispatch(self, items: list[tuple[str, object]]) -> None:
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is None:  # aborted by its handler meanwhile
                    continue
                if isinstance(item, Exception) or item.output.finished:
                    del self._streams[request_id]
                per_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, pairs in per_loop.items():
            loop.call_soon_threadsafe(put_all_events, pairs)

    def _record(self, steps: list[tuple], engine_stats: dict, step_overhead_ms: float) -> None:
        self.engine_stats, self.step_overhead_ms = engine_stats, step_overhead_ms
        if self.observer is not None:
            for step in steps:
                self.observer.on_step(*step)


class _Relay:
    """The child's side of the events pipe. The engine thread and the command loop only queue; a thread of its own
    sends, merging whatever queued meanwhile into one message: a send blocks while the pipe is full, and the
    replica drains it only when its receiver gets the interpreter lock, which must never stall a step."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.scheduler: BatchScheduler | None = None
        self.steps: list[tuple] = []
        self.recorded_at = time.monotonic()
        self.thread = threading.Thread(target=self._send_all, name="jf-ray-engine-relay", daemon=True)
        self.thread.start()

    def events(self, items: list[tuple[str, object]]) -> None:
        self.outbox.put(("events", items))

    def on_step(self, batch_size: int, running: int, queue_length: int, step_s: float) -> None:
        self.steps.append((batch_size, running, queue_length, step_s))
        idle = running == 0 and queue_length == 0  # the last step before a pause: its records go now
        if idle or time.monotonic() - self.recorded_at >= STEP_RECORDS_EVERY_S:
            self.outbox.put(("steps", (self.steps, self.scheduler.stats.to_dict(), self.scheduler.step_overhead_ms)))
            self.steps, self.recorded_at = [], time.monotonic()

    def close(self) -> None:
        self.outbox.put(None)
        self.thread.join(10.0)

    def _send_all(self) -> None:
        while True:
            messages = [self.outbox.get()]
            while not self.outbox.empty():
                messages.append(self.outbox.get())
            events = [item for kind, payload in filter(None, messages) if kind == "events" for item in payload]
            records = [payload for kind, payload in filter(None, messages) if kind == "steps"]
            try:
                if events:
                    self.conn.send(("events", events))
                if records:
                    steps = [step for record in records for step in record[0]]
                    self.conn.send(("steps", (steps, *records[-1][1:])))
            except OSError:  # the replica is gone; the command loop ends too
                return
            if None in messages:
                return


def _engine_main(config: ServeConfig, commands, events) -> None:
    """The child process: load the engine, then apply commands until the replica says stop or goes away."""
    from jf_ray.modeling import set_torch_threads

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    set_torch_threads(config.forward_threads)
    try:
        engine = load_engine(config)
    except Exception as exc:  # reported to the replica, which raises it from its constructor
        events.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    relay = _Relay(events)
    relay.scheduler = scheduler = start_scheduler(engine, config, relay, relay.events)
    events.send(("ready", EngineInfo.of(engine)))
    try:
        while True:
            command = commands.recv()
            if command[0] == "add":
                try:
                    scheduler.enqueue(*command[1:])
                except QueueFullError as exc:  # the replica counts the same limit first; kept as a safeguard
                    relay.events([(command[1], exc)])
            elif command[0] == "abort":
                scheduler.abort(command[1])
            else:
                break
    except EOFError:  # the replica is gone
        pass
    finally:
        scheduler.stop()
        relay.close()
