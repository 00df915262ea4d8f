"""Closed-loop load test of an OpenAI-compatible server: C clients, each sending requests back to back.

Each request streams (so time to first token is measured at the client) and asks for the usage chunk, which
carries the decoder's forwards. One :func:`run_load` call measures one (decoder, concurrency) cell; the
``bench-serve`` command runs the grid and writes JSON. No Ray here: it only talks HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class RequestRecord:
    latency_s: float
    ttft_s: float | None
    completion_tokens: int
    forwards: int
    error: str | None = None


@dataclass
class LoadResult:
    decoder: str
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    throughput_tokens_per_s: float
    requests_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tokens_per_forward: float
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def one_request(
    client, model: str, prompt: str, chat: bool, max_tokens: int, decoder: str | None
) -> RequestRecord:
    """One streamed greedy request; ``decoder`` picks jf-ray's decoder (None for another server, e.g. vLLM)."""
    started = time.perf_counter()
    ttft, usage = None, None
    common = dict(
        model=model,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"decoder": decoder} if decoder else None,
    )
    try:
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        else:
            stream = await client.completions.create(prompt=prompt, **common)
        async for chunk in stream:
            if ttft is None and chunk.choices and _chunk_text(chunk, chat):
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                usage = chunk.usage
    except Exception as exc:  # recorded, not raised: an overloaded server is a result, not a crash
        return RequestRecord(time.perf_counter() - started, None, 0, 0, f"{type(exc).__name__}: {exc}")
    extra = usage.model_dump() if usage is not None else {}
    return RequestRecord(
        time.perf_counter() - started, ttft, extra.get("completion_tokens", 0), extra.get("forwards", 0)
    )


def _chunk_text(chunk, chat: bool) -> str:
    choice = chunk.choices[0]
    return (choice.delta.content or "") if chat else (choice.text or "")


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    decoder: str,
    concurrency: int,
    requests_per_client: int,
    max_tokens: int,
    chat: bool = True,
    api_key: str = "unused",
    label: str | None = None,
) -> LoadResult:
    """``concurrency`` clients send ``requests_per_client`` requests each, prompts taken round-robin.

    With ``label`` the server is not jf-ray (a reference such as ``vllm serve``): no decoder is sent and the
    result is reported under ``label``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=600)

    async def client_loop(index: int) -> list[RequestRecord]:
        records = []
        for k in range(requests_per_client):
            prompt = prompts[(index * requests_per_client + k) % len(prompts)]
            records.append(await one_request(client, model, prompt, chat, max_tokens, None if label else decoder))
        return records

    started = time.perf_counter()
    per_client = await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    await client.close()
    return summarize(label or decoder, concurrency, [r for rs in per_client for r in rs], wall)


def summarize(decoder: str, concurrency: int, records: list[RequestRecord], wall_s: float) -> LoadResult:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    forwards = sum(r.forwards for r in ok)
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return LoadResult(
        decoder=decoder,
        concurrency=concurrency,
        requests=len(records),
        errors=len(records) - len(ok),
        wall_s=round(wall_s, 4),
        completion_tokens=tokens,
        throughput_tokens_per_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        requests_per_s=round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        latency_p50_s=round(percentile(latencies, 50), 4),
        latency_p99_s=round(percentile(latencies, 99), 4),
        ttft_p50_s=round(percentile(ttfts, 50), 4),
        ttft_p99_s=round(percentile(ttfts, 99), 4),
        tokens_per_forward=round(tokens / forwards, 4) if forwards else 0.0,
        error_samples=sorted({r.error for r in records if r.error})[:3],
    )
