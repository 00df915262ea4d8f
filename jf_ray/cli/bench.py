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

from jf_ray.cli.bench_serve import register_serve
from jf_ray.cli.common import (
    PROMPTS_HELP,
    add_address_option,
    add_decode_options,
    add_json_option,
    add_model_options,
    add_set_option,
    check_json_target,
    decoder_list,
    int_list,
    join_or_start_ray,
    positive_int,
    write_report,
)
from jf_ray.decoding.registry import BENCH_NAMES, DECODER_NAMES, describe


def name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


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


# -- decoders ------------------------------------------------------------------------------------------------
def register_decoders(benchmarks) -> None:
    parser = benchmarks.add_parser(
        "decoders",
        help="compare decoders (TPF, tokens/s, exactness vs AR) on the same prompts",
        description="Runs greedy AR and the chosen decoders on the same prompts in one process.",
    )
    add_model_options(parser)
    parser.add_argument("--prompts", required=True, help=PROMPTS_HELP)
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
    from jf_ray.precision import precision_of
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
        "machine": machine.finish(precision_of(model.dtype)),
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
    parser.add_argument("--prompts", required=True, help=PROMPTS_HELP)
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
