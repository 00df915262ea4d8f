"""``jf-ray bench``: run decoders side by side on the same prompts and write a JSON report."""

from __future__ import annotations

import argparse
import json
from functools import partial

from jf_ray.cli.common import add_decode_options, add_model_options, decoder_list, positive_int
from jf_ray.decoding.registry import BENCH_NAMES, DECODER_NAMES, describe


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
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
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here (path or URI)")
    parser.set_defaults(func=run)


def vllm_references(args: argparse.Namespace) -> dict:
    """{"vllm": runner} with ``--vllm`` (engine checked and opened before any decoder runs), else {}."""
    if not args.vllm:
        return {}
    from jf_ray.bench import VLLM, vllm_runner
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


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jf_ray.bench import bench_decoders
    from jf_ray.cli.common import decode_config_from_args
    from jf_ray.modeling import encode_prompt, eos_token_ids, load_model, load_tokenizer, set_torch_threads
    from jf_ray.prompts import read_prompts
    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")
    set_torch_threads(args.threads)
    texts = [p.text for p in read_prompts(args.prompts)][: args.num_prompts]
    config = decode_config_from_args(args)
    references = vllm_references(args)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    prompts = [encode_prompt(tokenizer, t, use_chat_template=not args.no_chat_template) for t in texts]

    def progress_factory(name: str, total: int):
        bar = tqdm(total=total, desc=f"bench {name}", unit="prompt", leave=False)
        return bar.update

    results = bench_decoders(
        model,
        prompts,
        args.decoders,
        config,
        eos_token_ids(model, tokenizer),
        args.batch_size,
        progress_factory,
        args.repeats,
        references=references,
    )
    report = {
        "model": args.model,
        "config": {
            **config.model_dump(exclude={"decoder", "record_trajectory"}),
            "batch_size": args.batch_size,
            "num_prompts": len(prompts),
            "repeats": args.repeats,
            "dtype": str(model.dtype),
            "device": str(model.device),
            "references": ["ar", *references],
        },
        "results": results,
    }
    print_table(results)
    if args.json_out:
        from jf_ray.storage import write_json_atomic

        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0


def print_table(results: dict[str, dict]) -> None:
    columns = [
        "tokens",
        "forwards",
        "tpf",
        "tokens_per_s",
        "speedup_vs_ar",
        "speedup_vs_ar_range",
        "exact_match_vs_ar",
        "repetition",
        "overhead_frac",
        "query_tokens_per_forward",
        "peak_rss_mb",
    ]
    if any("speedup_vs_vllm" in row for row in results.values()):
        columns[5:5] = ["speedup_vs_vllm", "exact_match_vs_vllm"]
    header = f"{'decoder':<10}" + "".join(f"{c:>26}" for c in columns)
    print(header)
    for name, row in results.items():
        print(f"{name:<10}" + "".join(f"{json.dumps(row.get(c)):>26}" for c in columns))
