"""``jf-ray bench <decoders|collect|train|serve>``: the benchmarks of :mod:`jf_ray.bench`, each writing JSON.

``decoders``: decoders side by side on the same prompts in one process; ``collect``: trajectory collection
with 1..W Ray workers and batch sizes; ``train``: Ray Train packed tokens/s per worker count; ``serve``: the
Serve app (or any OpenAI-compatible server) under closed-loop load. Every report carries the same machine
record and speed-ups of one meaning (docs/benchmarking.md).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

from jf_ray.cli.common import (
    add_address_option,
    add_decode_options,
    add_model_options,
    add_set_option,
    decoder_list,
    join_or_start_ray,
    positive_int,
)
from jf_ray.decoding.registry import BENCH_NAMES, DECODER_NAMES, describe


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def reference_arg(text: str) -> tuple[str, str]:
    name, _, url = text.partition("=")
    if not name or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected NAME=http://host:port, got {text!r}")
    return name, url


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: decoders, collect, train, serve (JSON out, docs/benchmarking.md)",
        description="Benchmarks, each writing a JSON report with the machine it ran on and speed-ups of one "
        "meaning (docs/benchmarking.md).",
    )
    benchmarks = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    benchmarks.required = True
    register_decoders(benchmarks)
    register_collect(benchmarks)
    register_train(benchmarks)
    register_serve(benchmarks)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", dest="json_out", default=None, metavar="PATH|URI", help="write the report here (atomically)"
    )


def check_json_target(args: argparse.Namespace) -> None:
    """Fail before any work where the report could not be written."""
    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")


def write_report(args: argparse.Namespace, report: dict) -> None:
    from jf_ray.storage import write_json_atomic

    if args.json_out:
        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")


# -- decoders ------------------------------------------------------------------------------------------------
def register_decoders(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "decoders",
        help="compare decoders (TPF, tokens/s, exactness vs AR) on the same prompts",
        description="Runs greedy AR and the chosen decoders on the same prompts in one process.",
    )
    add_model_options(parser)
    parser.add_argument("--prompts", required=True, help='JSONL file or URI, one {"prompt": ...} per line')
    parser.add_argument(
        "--decoders",
        type=partial(decoder_list, allowed=BENCH_NAMES),
        default=list(DECODER_NAMES),
        help=f"comma-separated, from {','.join(BENCH_NAMES)} ({describe(BENCH_NAMES)})",
    )
    add_decode_options(parser)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="requests decoded together")
    parser.add_argument("--num-prompts", type=positive_int, default=None, help="use the first N prompts")
    parser.add_argument("--no-chat-template", action="store_true", help="feed prompts as raw text")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="timed runs per decoder, interleaved; the median wall time is reported",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also time vLLM's own greedy AR of the same checkpoint (a reference, docs/vllm.md): every decoder "
        "gets speedup_vs_vllm and exact_match_vs_vllm",
    )
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without compilation (starts faster)")
    add_json_option(parser)
    parser.set_defaults(func=run_decoders)


def vllm_references(args: argparse.Namespace) -> dict:
    """{"vllm": runner} with ``--vllm`` (engine checked and opened before any decoder runs), else {}."""
    if not args.vllm:
        return {}
    from jf_ray.bench.decoders import VLLM, vllm_runner
    from jf_ray.modeling import local_model_path, resolve_device
    from jf_ray.vllm_engine import VllmOptions, check_vllm_model, open_engine

    path = local_model_path(args.model)
    options = VllmOptions(
        dtype=args.dtype,
        device="cpu" if resolve_device(args.device) == "cpu" else "cuda",
        max_num_seqs=args.batch_size,
        num_threads=args.threads,
        enforce_eager=args.vllm_eager,
    )
    check_vllm_model(path, options)
    return {VLLM: vllm_runner(open_engine(path, options, seed=args.seed or 0))}


def run_decoders(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jf_ray.bench.common import MachineRecord
    from jf_ray.bench.decoders import bench_decoders
    from jf_ray.cli.common import decode_config_from_args
    from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer, set_torch_threads
    from jf_ray.prompts import read_prompts

    check_json_target(args)
    machine = MachineRecord.start()
    set_torch_threads(args.threads)
    texts = [p.text for p in read_prompts(args.prompts)][: args.num_prompts]
    config = decode_config_from_args(args)
    references = vllm_references(args)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = [encode_prompt(tokenizer, t, use_chat_template=not args.no_chat_template) for t in texts]

    def progress_factory(name: str, total: int):
        return tqdm(total=total, desc=f"bench {name}", unit="prompt", leave=False).update

    eos = eos_token_ids(model, tokenizer)
    results = bench_decoders(
        model, prompts, args.decoders, config, eos, args.batch_size, progress_factory, args.repeats, references
    )
    settings = config.model_dump(exclude={"decoder", "record_trajectory"})
    report = {
        "benchmark": "decoders",
        "model": args.model,
        "config": {
            **settings,
            "batch_size": args.batch_size,
            "num_prompts": len(prompts),
            "repeats": args.repeats,
            "dtype": str(model.dtype),
            "device": str(model.device),
            "references": ["ar", *references],
        },
        "results": results,
        "machine": machine.finish(),
    }
    print_table(results)
    write_report(args, report)
    return 0


def print_table(results: dict[str, dict]) -> None:
    columns = ["tokens", "forwards", "tpf", "tokens_per_s", "speedup_vs_ar", "speedup_vs_ar_range"]
    columns += ["exact_match_vs_ar", "repetition", "overhead_frac", "query_tokens_per_forward", "peak_rss_mb"]
    if any("speedup_vs_vllm" in row for row in results.values()):
        columns[5:5] = ["speedup_vs_vllm", "exact_match_vs_vllm"]
    print(f"{'decoder':<10}" + "".join(f"{c:>26}" for c in columns))
    for name, row in results.items():
        print(f"{name:<10}" + "".join(f"{json.dumps(row.get(c)):>26}" for c in columns))


# -- collect -------------------------------------------------------------------------------------------------
def register_collect(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "collect",
        help="trajectory collection: tokens/s per worker count and per batch size, per backend",
        description="Batch scaling in one in-process worker, then the real `collect` with 1..W Ray workers.",
    )
    parser.add_argument("--model", required=True, help="HF checkpoint dir, file:// or s3:// URI, or hub name")
    parser.add_argument("--prompts", required=True, help='JSONL file or URI, one {"prompt": ...} per line')
    parser.add_argument("--workers", type=int_list, default=[1, 2], help="comma-separated Ray worker counts")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8, 16], help="in-process batch sizes")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="batch size of the worker runs")
    parser.add_argument("--shard-size", type=positive_int, default=16, help="prompts per shard")
    parser.add_argument("--block-size", type=positive_int, default=16, help="Jacobi block size n")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads of the in-process worker")
    parser.add_argument(
        "--backends", type=name_list, default=["transformers"], help="comma-separated: transformers, vllm"
    )
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without compilation (starts faster)")
    parser.add_argument("--scratch", default=None, help="URI for the datasets written (default: a temp dir)")
    add_json_option(parser)
    add_address_option(parser)
    parser.set_defaults(func=run_collect)


def run_collect(args: argparse.Namespace) -> int:
    from jf_ray.bench.collect import CollectBench, bench_collection

    check_json_target(args)
    bench = CollectBench(
        model=args.model,
        prompts=args.prompts,
        workers=args.workers,
        batch_sizes=args.batch_sizes,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        block_size=args.block_size,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        backends=tuple(args.backends),
        vllm_eager=args.vllm_eager,
    )
    join_or_start_ray(args)
    report = bench_collection(bench, args.scratch)
    for row in report["batch_scaling"]:
        print(f"{row['backend']:<12} batch {row['batch_size']:<3} {row['tokens_per_s']:>9.1f} tok/s")
    for row in report["worker_scaling"]:
        print(
            f"{row['backend']:<12} workers {row['workers']:<3} {row['end_to_end_tokens_per_s']:>9.1f} tok/s end to "
            f"end, {row['steady_tokens_per_s']:.1f} steady"
        )
    write_report(args, report)
    return 0


# -- train ---------------------------------------------------------------------------------------------------
def register_train(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "train",
        help="Ray Train: packed tokens/s per worker count",
        description="One short Jacobi Forcing training run per worker count; figures from its metrics log.",
    )
    parser.add_argument("--model", required=True, help="HF checkpoint dir, file:// or s3:// URI, or hub name")
    parser.add_argument("--data", required=True, help="packed dataset URI (`jf-ray pack` output)")
    parser.add_argument("--workers", type=int_list, default=[1, 2], help="comma-separated worker counts")
    parser.add_argument("--steps", type=positive_int, default=20, help="training steps of each run")
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the figures")
    parser.add_argument("--scratch", default=None, help="URI for the runs (default: a temp dir)")
    add_set_option(parser, "TrainConfig")
    add_json_option(parser)
    add_address_option(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from jf_ray.bench.train import bench_training
    from jf_ray.errors import UserInputError

    if not 0 <= args.skip < args.steps:
        raise UserInputError(f"--skip must be >= 0 and below --steps ({args.steps}), got {args.skip}")
    check_json_target(args)
    join_or_start_ray(args)
    report = bench_training(args.model, args.data, args.workers, args.steps, args.skip, args.scratch, args.overrides)
    for row in report["results"]:
        print(f"workers {row['workers']:<3} {row['tokens_per_s_median']:>9.1f} tok/s (median)")
    write_report(args, report)
    return 0


# -- serve ---------------------------------------------------------------------------------------------------
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
    parser.add_argument("--decoders", type=decoder_list, default=["ar", "auto"], help="comma-separated decoders")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16], help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=positive_int, default=4, help="requests each client sends")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of every request")
    parser.add_argument("--prompts", default=None, help='JSONL file or URI, one {"prompt": ...} per line')
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


def run_serve(args: argparse.Namespace) -> int:
    from jf_ray.bench import serve as bench
    from jf_ray.bench.common import MachineRecord
    from jf_ray.errors import UserInputError

    if args.url and args.overrides:
        raise UserInputError("--set configures the local app; it has no effect on the server at --url")
    check_json_target(args)
    machine = MachineRecord.start()
    prompts, chat = bench.read_load_prompts(args.prompts), args.endpoint == "chat"
    load = (args.concurrency, args.requests_per_client, args.max_tokens, chat)
    # before the app starts: the offline engine gets the replica's CPU share, not shared with the replica
    offline = bench.offline_ar(local_config(args), prompts, *load) if args.offline and args.model else {}
    config, stop = (None, None) if args.url else start_local(local_config(args), args)
    url = args.url or f"http://{config.host}:{config.port}"
    model = args.model_name or (config.served_model_name if config else None) or bench.served_model(url, args.api_key)
    # jf-ray's decoders first, then each reference server under its name with its own served model
    targets = [bench.Target(None, url, model, decoder) for decoder in args.decoders]
    targets += [bench.Target(name, ref, bench.served_model(ref, args.api_key), name) for name, ref in args.references]
    try:
        results = bench.load_targets(targets, prompts, *load, api_key=args.api_key)
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
        "num_prompts": len(prompts),
        "server_config": config.model_dump(exclude={"api_key"}) if config else None,
        "results": results,
        "speedup_vs_ar": bench.speedups(results),
        "offline_ar": offline,
        "served_over_offline_ar": bench.served_over_offline(results, offline),
        **{f"speedup_vs_{name}": bench.speedups(results, name) for name, _ in args.references},
        "machine": machine.finish(),
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
