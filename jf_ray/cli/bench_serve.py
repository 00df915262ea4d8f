"""``jf-ray bench-serve``: load-test the Serve app (or any running server) per decoder and concurrency.

Starts the app locally unless ``--url`` is given, then for every decoder (chosen per request, so all cells
use the same replica and model) and every concurrency runs a closed-loop load and writes one JSON report:
throughput, p50/p99 latency and time to first token, tokens per forward, errors. With ``--model`` it first
decodes the same requests offline with AR at batch = concurrency, in this process with the replica's CPU
share (before the app starts), so ``served_over_offline_ar`` measures what the serving path costs.
``--reference NAME=URL`` adds another OpenAI-compatible server of the same checkpoint (e.g. ``vllm serve``, or
vLLM with ``ngram`` speculative decoding; docs/vllm.md), loaded with the same prompts and clients, reported
as decoder NAME, and every decoder's throughput is also given over each reference's (``speedup_vs_<NAME>``).
"""

from __future__ import annotations

import argparse

from jf_ray.cli.common import add_address_option, decoder_list, join_or_start_ray, positive_int

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


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def reference_arg(text: str) -> tuple[str, str]:
    name, _, url = text.partition("=")
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=http://host:port, got {text!r}")
    return name, url


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench-serve",
        help="load-test the serving app: throughput and p50/p99 latency per decoder and concurrency",
        description="Closed-loop load with streaming OpenAI clients; writes a JSON report.",
    )
    parser.add_argument("--model", default=None, help="checkpoint to serve (not needed with --url)")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--model-name", default=None, help="`model` sent in requests (default: the served name)")
    parser.add_argument("--api-key", default="unused", help="API key of the server")
    parser.add_argument("--decoders", type=decoder_list, default=["ar", "auto"], help="comma-separated decoders")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=positive_int, default=4, help="requests each client sends")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of every request")
    parser.add_argument("--prompts", default=None, help='JSONL file or URI, one {"prompt": ...} per line')
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat", help="API to call")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ServeConfig field of the local app, e.g. --set decode.block_size=16",
    )
    parser.add_argument(
        "--reference",
        dest="references",
        type=reference_arg,
        action="append",
        default=[],
        metavar="NAME=URL",
        help="also load this running OpenAI-compatible server of the same checkpoint (repeatable), e.g. "
        "vllm=http://127.0.0.1:8001 from `python -m vllm.entrypoints.openai.api_server` (docs/vllm.md)",
    )
    parser.add_argument("--port", type=positive_int, default=8000, help="port of the local app")
    parser.add_argument("--ray-cpus", type=positive_int, default=None, help="CPUs of a locally started cluster")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here (path or URI)")
    parser.add_argument(
        "--no-offline", dest="offline", action="store_false", help="skip the offline batch-N AR reference"
    )
    add_address_option(parser)
    parser.set_defaults(func=run)


def local_config(args: argparse.Namespace):
    """The app's config: enough batch slots and queue that every client is served, none refused."""
    from jf_ray.config import parse_override, set_dotted
    from jf_ray.errors import UserInputError
    from jf_ray.serving.config import ServeConfig

    if not args.model:
        raise UserInputError("pass --model (to start the app) or --url (to use a running server)")
    peak = max(args.concurrency)
    data: dict = {
        "model": args.model,
        "port": args.port,
        "max_batch_size": peak,
        "max_queued_requests": peak,
        "default_max_tokens": args.max_tokens,
        "max_tokens_limit": max(args.max_tokens, 4096),
    }
    for item in args.overrides:
        set_dotted(data, *parse_override(item))
    return ServeConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    import os
    import platform

    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")
    prompts = _prompts(args.prompts)
    offline = offline_ar(args, prompts) if args.offline and args.model else {}
    config, stop = (None, None) if args.url else _start_local(local_config(args), args)
    url = args.url or f"http://{config.host}:{config.port}"
    model = args.model_name or (config.served_model_name if config else None) or _served_model(url, args.api_key)
    # (label, url, model, decoder): jf-ray's decoders first, then each reference server with its served model.
    targets = [(None, url, model, decoder) for decoder in args.decoders]
    targets += [(name, ref_url, _served_model(ref_url, args.api_key), name) for name, ref_url in args.references]
    results = []
    try:
        for target in targets:
            _load(args, prompts, target, 1, 1)  # warm-up, discarded
            for concurrency in args.concurrency:
                result = _load(args, prompts, target, concurrency, args.requests_per_client)
                print_row(result)
                results.append(result.to_dict())
    finally:
        if stop is not None:
            stop()
    report = {
        "url": url,
        "model": model,
        "endpoint": args.endpoint,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "num_prompts": len(prompts),
        "server_config": config.model_dump(exclude={"api_key"}) if config else None,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },  # other work on the box skews timings
        "results": results,
        "speedup_vs_ar": speedups(results),
        "offline_ar": offline,
        "served_over_offline_ar": served_over_offline(results, offline),
        **{f"speedup_vs_{name}": speedups(results, name) for name, _ in args.references},
    }
    if args.json_out:
        from jf_ray.storage import write_json_atomic

        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0


def _load(args, prompts: list[str], target: tuple, concurrency: int, requests: int):
    import asyncio

    from jf_ray.serving.loadtest import run_load

    label, url, model, decoder = target
    chat = args.endpoint == "chat"
    return asyncio.run(
        run_load(url, model, prompts, decoder, concurrency, requests, args.max_tokens, chat, args.api_key, label)
    )


def speedups(results: list[dict], reference: str = "ar") -> dict:
    """Throughput of each decoder over the reference's (AR, or a reference server), per concurrency."""
    ref = {r["concurrency"]: r["throughput_tokens_per_s"] for r in results if r["decoder"] == reference}
    out: dict = {}
    for r in results:
        base = ref.get(r["concurrency"])
        if r["decoder"] != reference and base:
            out.setdefault(r["decoder"], {})[str(r["concurrency"])] = round(r["throughput_tokens_per_s"] / base, 3)
    return out


def offline_ar(args: argparse.Namespace, prompts: list[str]) -> dict:
    """Offline AR tokens/s per concurrency: the bench's requests decoded in one engine at batch = concurrency,
    with as many torch threads as a replica gets (its num_cpus)."""
    from jf_ray.bench import run_decoder
    from jf_ray.decoding import DecodeConfig
    from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer, set_torch_threads

    config = local_config(args)
    set_torch_threads(max(1, int(config.num_cpus)))
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    eos = eos_token_ids(model, tokenizer)
    encoded = [encode_prompt(tokenizer, p, use_chat_template=args.endpoint == "chat") for p in prompts]
    decode = DecodeConfig(decoder="ar", max_new_tokens=args.max_tokens)
    out = {}
    for concurrency in args.concurrency:
        batch = [encoded[i % len(encoded)] for i in range(concurrency * args.requests_per_client)]
        run_decoder(model, batch[:concurrency], decode.model_copy(update={"max_new_tokens": 8}), eos, concurrency)
        run = run_decoder(model, batch, decode, eos, concurrency)
        tokens = sum(len(r.token_ids) for r in run.results)
        out[str(concurrency)] = round(tokens / run.wall_s, 2)
        print(f"offline ar batch={concurrency:<3} {out[str(concurrency)]:>8.1f} tok/s", flush=True)
    return out


def served_over_offline(results: list[dict], offline: dict) -> dict:
    """Served AR tokens/s over offline AR tokens/s at the same concurrency (1.0 = the serving path is free)."""
    return {
        str(r["concurrency"]): round(r["throughput_tokens_per_s"] / offline[str(r["concurrency"])], 3)
        for r in results
        if r["decoder"] == "ar" and offline.get(str(r["concurrency"]))
    }


def print_row(r) -> None:
    print(
        f"{r.decoder:<7} c={r.concurrency:<3} {r.throughput_tokens_per_s:>8.1f} tok/s  "
        f"p50 {r.latency_p50_s:.3f}s  p99 {r.latency_p99_s:.3f}s  ttft p50 {r.ttft_p50_s:.3f}s  "
        f"tpf {r.tokens_per_forward:.2f}  errors {r.errors}/{r.requests}",
        flush=True,
    )


def _prompts(uri):
    if uri is None:
        return DEFAULT_PROMPTS
    from jf_ray.prompts import read_prompts

    return [p.text for p in read_prompts(uri)]


def _served_model(url: str, api_key: str) -> str:
    from openai import OpenAI

    return OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key, max_retries=0).models.list().data[0].id


def _start_local(config, args):
    """Deploy the app on a cluster of our own (or the one ``--address`` names, leaving its other apps be)."""
    started_cluster = join_or_start_ray(args, num_cpus=args.ray_cpus)  # before ray is imported
    import ray
    from ray import serve

    from jf_ray.serving.deployment import build_app

    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)

    def stop() -> None:
        serve.delete(config.app_name)
        if started_cluster:
            serve.shutdown()
            ray.shutdown()

    return config, stop
