"""``jf-ray bench serve``: closed-loop load on an OpenAI-compatible server, C clients each sending requests
back to back, per decoder and concurrency. See docs/benchmarking.md and docs/serving.md.

Each request streams (so time to first token is measured at the client) and asks for the usage chunk, which
carries the decoder's forwards. One :func:`run_load` call measures one (decoder, concurrency) cell and
:func:`load_targets` the grid. Reference servers (e.g. ``vllm serve``, docs/vllm.md) are loaded the same way
and reported under their name. :func:`offline_ar` decodes the same requests offline with AR at batch =
concurrency, so that ``served_over_offline_ar`` measures what the serving path costs. No Ray here: starting
the app is the CLI's part; this module only talks HTTP (and runs the offline engine).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

from jf_ray.bench.common import speedup

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Compute 12345 + 67890.",
    "Write a function that reverses a linked list.",
    "Explain what a hash map is.",
    "Write a Python class for a stack with push and pop.",
    "What is 321 * 47?",
    "Write a function that checks whether a string is a palindrome.",
    "Sort a list of tuples by their second element.",
]


def read_load_prompts(uri: str | None) -> list[str]:
    """The prompt texts of a JSONL file or URI, or a small built-in mix of code, math and prose."""
    from jf_ray.prompts import read_prompts

    return DEFAULT_PROMPTS if uri is None else [p.text for p in read_prompts(uri)]


class Target(NamedTuple):
    """One server and decoder under load; ``label`` names a reference server (no jf-ray decoder is sent)."""

    label: str | None
    url: str
    model: str
    decoder: str


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


def load_targets(
    targets: list[Target],
    prompts: list[str],
    concurrency: list[int],
    requests_per_client: int,
    min_requests: int,
    max_tokens: int,
    chat: bool = True,
    api_key: str = "unused",
    warmup_requests: int = 1,
) -> list[dict]:
    """Every target at every concurrency (after ``warmup_requests`` discarded requests each, one client): one row
    per cell. The warm-up stands for a server that has been up a while: ``auto`` has learned what each window
    length gains and what a step costs (docs/load-aware-decoding.md), caches and kernels are warm.

    Targets take turns at each concurrency, so the cells compared with each other ran minutes apart at most
    (a drift in the machine's speed shifts all of them, not one decoder's)."""
    from tqdm import tqdm

    for label, url, model, decoder in targets:
        warmup = (url, model, prompts, decoder, 1, warmup_requests, max_tokens, chat, api_key, label)
        asyncio.run(run_load(*warmup))
    results = []
    with tqdm(total=len(targets) * len(concurrency), desc="bench serve", unit="cell") as bar:
        for clients in concurrency:
            each = requests_each(clients, requests_per_client, min_requests)
            for label, url, model, decoder in targets:
                load = [url, model, prompts, decoder]
                result = asyncio.run(run_load(*load, clients, each, max_tokens, chat, api_key, label))
                logger.info(row_line(result))
                results.append(result.to_dict())
                bar.update(1)
    return results


def row_line(r: LoadResult) -> str:
    return (
        f"{r.decoder:<7} c={r.concurrency:<3} {r.throughput_tokens_per_s:>8.1f} tok/s  "
        f"p50 {r.latency_p50_s:.3f}s  p99 {r.latency_p99_s:.3f}s  ttft p50 {r.ttft_p50_s:.3f}s  "
        f"tpf {r.tokens_per_forward:.2f}  errors {r.errors}/{r.requests}"
    )


def speedups(results: list[dict], reference: str = "ar") -> dict:
    """{decoder: {concurrency: speed-up}}: each decoder's throughput over the reference's (AR, or a reference
    server) at the same concurrency, by :func:`jf_ray.bench.common.speedup` (one run each: the plain ratio)."""
    ref = {r["concurrency"]: r["throughput_tokens_per_s"] for r in results if r["decoder"] == reference}
    out: dict = {}
    for r in results:
        gain = speedup([r["throughput_tokens_per_s"]], [ref.get(r["concurrency"], 0.0)])
        if r["decoder"] != reference and gain is not None:
            out.setdefault(r["decoder"], {})[str(r["concurrency"])] = gain.median
    return out


def served_over_offline(results: list[dict], offline: dict) -> dict:
    """Served AR tokens/s over offline AR tokens/s at the same concurrency (1.0 = the serving path is free),
    by :func:`jf_ray.bench.common.speedup`."""
    out = {}
    for r in results:
        gain = speedup([r["throughput_tokens_per_s"]], [offline.get(str(r["concurrency"]), 0.0)])
        if r["decoder"] == "ar" and gain is not None:
            out[str(r["concurrency"])] = gain.median
    return out


def requests_each(clients: int, requests_per_client: int, min_requests: int) -> int:
    """Requests each client sends: ``requests_per_client``, more where few clients would send fewer than
    ``min_requests`` in all (one client's four requests are too short a run to time)."""
    return max(requests_per_client, -(-min_requests // clients))


def offline_ar(
    config,
    prompts: list[str],
    concurrency: list[int],
    requests_per_client: int,
    min_requests: int,
    max_tokens: int,
    chat: bool,
) -> dict:
    """{concurrency: tokens/s} of offline AR: the load's requests decoded in one engine at batch = concurrency,
    with ``config`` (the app's ServeConfig) model, dtype and device, and as many torch threads as a replica
    gets (its num_cpus)."""
    from jf_ray.bench.decoders import run_decoder
    from jf_ray.decoding import DecodeConfig
    from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer, set_torch_threads

    set_torch_threads(max(1, int(config.num_cpus)))
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    eos = eos_token_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p, use_chat_template=chat) for p in prompts]
    decode = DecodeConfig(decoder="ar", max_new_tokens=max_tokens)
    out = {}
    for clients in concurrency:
        count = clients * requests_each(clients, requests_per_client, min_requests)
        batch = [encoded[i % len(encoded)] for i in range(count)]
        run_decoder(model, batch[:clients], decode.model_copy(update={"max_new_tokens": 8}), eos, clients)
        run = run_decoder(model, batch, decode, eos, clients)
        out[str(clients)] = round(sum(len(r.token_ids) for r in run.results) / run.wall_s, 2)
        logger.info("offline ar batch=%-3d %8.1f tok/s", clients, out[str(clients)])
    return out


def served_model(url: str, api_key: str) -> str:
    """The model a running OpenAI-compatible server serves (its first)."""
    from openai import OpenAI

    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0).models.list().data[0].id
