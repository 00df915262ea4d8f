"""``jf-ray bench serve``: the Serve app, or any OpenAI-compatible server, under closed-loop streaming load
(:mod:`jf_ray.bench.serve`; docs/benchmarking.md)."""

from __future__ import annotations

import argparse

from jf_ray.cli.common import (
    PROMPTS_HELP,
    add_address_option,
    add_json_option,
    add_set_option,
    check_json_target,
    decoder_list,
    int_list,
    join_or_start_ray,
    positive_int,
    write_report,
)


def reference_arg(text: str) -> tuple[str, str]:
    name, _, url = text.partition("=")
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=http://host:port, got {text!r}")
    return name, url


def register_serve(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "serve",
        help="the Serve app under closed-loop load: throughput, p50/p99 latency per decoder and concurrency",
        description="Starts the app locally unless --url is given, then loads it with streaming OpenAI clients "
        "per decoder (chosen per request: same replica and model) and concurrency, and loads every --reference "
        "server the same way. With --model, AR first decodes the same requests offline (served_over_offline_ar).",
    )
    parser.add_argument("--model", default=None, help="checkpoint to serve (not needed with --url)")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--model-name", default=None, help="`model` sent in requests (default: the served name)")
    parser.add_argument("--api-key", default="unused", help="API key of the server")
    parser.add_argument(
        "--decoders",
        type=lambda text: [] if text == "none" else decoder_list(text),
        default=["ar", "auto"],
        help="comma-separated jf-ray decoders, or none to load only the --reference servers",
    )
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=positive_int, default=4, help="requests each client sends")
    parser.add_argument(
        "--min-requests", type=positive_int, default=16, help="at least this many requests per level, all clients"
    )
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of every request")
    parser.add_argument(
        "--warmup-requests",
        type=positive_int,
        default=16,
        help="untimed requests each decoder and server gets first, from one client (a server that has been up a while)",
    )
    parser.add_argument("--prompts", default=None, help=PROMPTS_HELP)
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat", help="API to call")
    add_set_option(parser, "ServeConfig (the local app)")
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
    add_json_option(parser)
    parser.add_argument(
        "--no-offline", dest="offline", action="store_false", help="skip the offline batch-N AR reference"
    )
    add_address_option(parser)
    parser.set_defaults(func=run_serve)


def local_config(args: argparse.Namespace):
    """The app's config: enough batch slots and queue that every client is served, none refused."""
    from jf_ray.cli.common import apply_overrides
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
    return ServeConfig.from_dict(apply_overrides(data, args.overrides))


def server_precision(config) -> str | None:
    """What the local app decodes in; None for a server at --url, whose settings this process cannot see."""
    if config is None:
        return None
    from jf_ray.modeling import resolve_device
    from jf_ray.precision import resolve_precision

    return resolve_precision(config.dtype, resolve_device(config.device), "decode").name


def run_serve(args: argparse.Namespace) -> int:
    from jf_ray.bench import serve as bench
    from jf_ray.bench.common import MachineRecord
    from jf_ray.errors import UserInputError

    if not args.decoders and not args.references:
        raise UserInputError("nothing to load: --decoders none needs at least one --reference NAME=URL")
    if args.url and args.overrides:
        raise UserInputError("--set configures the local app; it has no effect on the server at --url")
    check_json_target(args)
    machine = MachineRecord.start()
    prompts, chat = bench.read_load_prompts(args.prompts), args.endpoint == "chat"
    load = (args.concurrency, args.requests_per_client, args.min_requests, args.max_tokens, chat)
    # before the app starts: the offline engine gets the replica's CPU share, not shared with the replica
    offline = bench.offline_ar(local_config(args), prompts, *load) if args.offline and args.model else {}
    config, stop = (None, None) if args.url else start_local(local_config(args), args)
    url = args.url or f"http://{config.host}:{config.port}"
    model = args.model_name or (config.served_model_name if config else None) or bench.served_model(url, args.api_key)
    # jf-ray's decoders first, then each reference server under its name with its own served model
    targets = [bench.Target(None, url, model, decoder) for decoder in args.decoders]
    targets += [bench.Target(name, ref, bench.served_model(ref, args.api_key), name) for name, ref in args.references]
    try:
        results = bench.load_targets(
            targets, prompts, *load, api_key=args.api_key, warmup_requests=args.warmup_requests
        )
    finally:
        if stop is not None:
            stop()
    report = {
        "benchmark": "serve",
        "url": url,
        "model": model,
        "endpoint": args.endpoint,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "min_requests": args.min_requests,
        "warmup_requests": args.warmup_requests,
        "num_prompts": len(prompts),
        "server_config": config.model_dump(exclude={"api_key"}) if config else None,
        "results": results,
        "speedup_vs_ar": bench.speedups(results),
        "offline_ar": offline,
        "served_over_offline_ar": bench.served_over_offline(results, offline),
        **{f"speedup_vs_{name}": bench.speedups(results, name) for name, _ in args.references},
        "machine": machine.finish(server_precision(config)),
    }
    write_report(args, report)
    return 0


def start_local(config, args: argparse.Namespace):
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
