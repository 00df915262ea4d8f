"""One request's life on the asyncio side: submit, await step events, detokenize, apply stop strings, count.

:func:`stream_text` is an async generator of :class:`TextChunk`; the last chunk carries the finish reason
and the usage (with the decoder's counters). If the consumer stops early (client disconnect cancels the
task, or a stop string ends the text), the request is aborted so its batch slot frees before the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from jf_ray.decoding.types import DecodeConfig, DecodeStats, TokenLogprob
from jf_ray.errors import UserInputError
from jf_ray.serving.detokenizer import IncrementalDetokenizer
from jf_ray.serving.protocol import Usage, invalid_request
from jf_ray.serving.scheduler import BatchScheduler


@dataclass
class DraftCounts:
    """The shapes of a request's decoding forwards, as DecodeStats counts them (docs/load-aware-decoding.md)."""

    draft_hist: dict[str, int] = field(default_factory=dict)  # main draft length (head included) -> forwards
    candidates_hist: dict[str, int] = field(default_factory=dict)  # recycled candidates verified -> forwards
    blocks_hist: dict[str, int] = field(default_factory=dict)  # blocks in flight -> forwards
    query_tokens: int = 0  # tokens put into decoding forwards: the request's width budget

    @classmethod
    def of(cls, stats) -> DraftCounts:
        hists = (stats.draft_hist, stats.candidates_hist, stats.blocks_hist)
        return cls(*(_str_keys(hist) for hist in hists), stats.query_tokens)


class RequestObserver(Protocol):
    def on_first_token(self, decoder: str, ttft_s: float) -> None: ...

    def on_request_done(
        self, decoder: str, status: str, latency_s: float, tokens: int, forwards: int, drafts: DraftCounts
    ) -> None: ...


@dataclass
class TokenInfo:
    """A generated token as the API reports it under ``logprobs``."""

    text: str  # the token decoded alone (a piece of a multi-byte character decodes to U+FFFD)
    logprob: float
    offset: int  # where the token's text starts in the completion
    top: list[tuple[str, float]]  # most likely tokens at its position (text, logprob), most likely first


@dataclass
class TextChunk:
    text: str
    finish_reason: str | None = None  # "stop" | "length" on the last chunk
    usage: Usage | None = None  # on the last chunk
    logprobs: list[TokenInfo] | None = None  # the tokens this chunk's text releases, when asked for


@dataclass
class _Tally:
    """Counters of one request, filled from its step events.

    The decoder's own counters are read from the engine's stats object once, at the end: summarising them
    per step event would be per-step work on the event loop that the engine thread competes with.
    """

    tokens: int = 0
    steps: int = 0
    batch_sum: int = 0
    stats: DecodeStats | None = None  # the engine's running counters of this request
    first_token_at: float | None = None

    def add(self, event) -> bool:
        """Count one step event; True when it brought the request's first token."""
        out = event.output
        self.tokens += len(out.new_token_ids)
        self.steps += 1
        self.batch_sum += event.batch_size
        self.stats = out.stats
        if self.first_token_at is None and out.new_token_ids:
            self.first_token_at = time.perf_counter()
            return True
        return False

    @property
    def forwards(self) -> int:
        return self.stats.forwards if self.stats else 0

    @property
    def drafts(self) -> DraftCounts:
        return DraftCounts.of(self.stats) if self.stats else DraftCounts()

    def usage(self, prompt_tokens: int, decoder: str) -> Usage:
        stats = self.stats or DecodeStats()
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self.tokens,
            total_tokens=prompt_tokens + self.tokens,
            forwards=stats.forwards,
            tokens_per_forward=round(self.tokens / stats.forwards, 4) if stats.forwards else 0.0,
            accepted_hist=_str_keys(stats.accepted_hist),
            mean_batch_size=round(self.batch_sum / self.steps, 3) if self.steps else 0.0,
            decoder=decoder,
            **vars(DraftCounts.of(stats)),
        )


def _str_keys(hist: dict) -> dict:
    return {str(k): v for k, v in sorted(hist.items())}


@dataclass
class PreparedRequest:
    """A validated request, ready for the engine."""

    request_id: str
    prompt_ids: list[int]
    decode: DecodeConfig
    stop_strings: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.perf_counter)


async def stream_text(
    scheduler: BatchScheduler,
    tokenizer,
    request: PreparedRequest,
    queue: asyncio.Queue,
    observer: RequestObserver | None = None,
) -> AsyncIterator[TextChunk]:
    """Chunks of a request already submitted with ``queue = scheduler.submit(...)``.

    Submitting first (outside the generator) lets the caller answer 503 before any response header is sent.
    """
    decoder = request.decode.decoder
    detok = IncrementalDetokenizer(tokenizer, request.stop_strings)
    logprobs = _Logprobs(tokenizer) if request.decode.logprobs is not None else None
    tally, status = _Tally(), "aborted"
    try:
        while True:
            # Every step event already waiting is taken at once: when the engine outpaces this consumer (many
            # streams, one event loop), its steps merge into one chunk instead of one chunk per step each.
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            new_ids = []
            for event in events:
                if isinstance(event, Exception):
                    status = "error"
                    raise _as_api_error(event)
                if tally.add(event) and observer is not None:
                    observer.on_first_token(decoder, tally.first_token_at - request.created_at)
                if logprobs is not None:
                    logprobs.pending.extend(event.output.new_logprobs or [])
                new_ids += event.output.new_token_ids
            delta = detok.add(new_ids)
            finish = "stop" if delta.stopped else _openai_finish(event.output)
            if finish is None:
                if delta.text or delta.token_offsets:
                    yield TextChunk(delta.text, logprobs=logprobs and logprobs.release(delta.token_offsets))
                continue
            status = "ok"
            offsets = delta.token_offsets
            if not delta.stopped:
                rest = detok.flush()
                delta.text, offsets = delta.text + rest.text, offsets + rest.token_offsets
            usage = tally.usage(len(request.prompt_ids), decoder)
            yield TextChunk(delta.text, finish, usage, logprobs and logprobs.release(offsets))
            return
    finally:
        scheduler.abort(request.request_id)  # frees the slot; a no-op when the engine already finished it
        if observer is not None:
            latency = time.perf_counter() - request.created_at
            observer.on_request_done(decoder, status, latency, tally.tokens, tally.forwards, tally.drafts)


class _Logprobs:
    """Token logprobs received from the engine, handed out as the detokenizer releases their tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.pending: list[TokenLogprob] = []
        self._texts: dict[int, str] = {}

    def release(self, offsets: list[int]) -> list[TokenInfo]:
        taken, self.pending = self.pending[: len(offsets)], self.pending[len(offsets) :]
        return [
            TokenInfo(self._text(lp.token_id), lp.logprob, offset, [(self._text(t), v) for t, v in lp.top])
            for lp, offset in zip(taken, offsets)
        ]

    def _text(self, token_id: int) -> str:
        if token_id not in self._texts:
            self._texts[token_id] = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        return self._texts[token_id]


def _as_api_error(error: Exception) -> Exception:
    """The engine's verdict on bad input is the client's fault (4xx); anything else stays a server error."""
    if isinstance(error, UserInputError):
        return invalid_request(str(error))
    return error


async def collect_text(chunks: AsyncIterator[TextChunk]) -> tuple[str, str, Usage, list[TokenInfo] | None]:
    """Run a chunk stream to its end: (text, finish_reason, usage, logprobs or None)."""
    parts, tokens, last = [], [], None
    async for chunk in chunks:
        parts.append(chunk.text)
        tokens.extend(chunk.logprobs or [])
        last = chunk
    return "".join(parts), last.finish_reason, last.usage, tokens if last.logprobs is not None else None


def _openai_finish(output) -> str | None:
    if not output.finished:
        return None
    return "length" if output.finish_reason == "length" else "stop"
