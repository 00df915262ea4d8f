"""``jf-ray eval``: task quality (math accuracy, code loss and parse rate) plus decoder stats, as JSON."""

from __future__ import annotations

import argparse

from jf_ray.cli.common import add_decode_options, add_model_options, decoder_name, positive_int
from jf_ray.decoding.registry import DECODER_NAMES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on the code or math workload with any decoder",
        description="math: exact final-answer accuracy. code: held-out per-token loss of reference bodies and "
        "the share of generated bodies that parse. Both: tokens, forwards, TPF, tokens/s of the decode.",
    )
    add_model_options(parser)
    parser.add_argument("--task", required=True, choices=("code", "math"))
    parser.add_argument("--split", default="heldout", choices=("train", "heldout"))
    parser.add_argument("--decoder", type=decoder_name, default="ar", help=" | ".join(DECODER_NAMES))
    parser.add_argument("--n", type=positive_int, default=200, help="number of examples")
    add_decode_options(parser)
    parser.set_defaults(max_new_tokens=None)  # per task: a math solution, a stdlib function body
    parser.add_argument("--batch-size", type=positive_int, default=8, help="requests decoded together")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", dest="json_out", default=None, help="write the report here (path or URI)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jf_ray.cli.common import decode_config_from_args
    from jf_ray.evaluation import DEFAULT_MAX_NEW_TOKENS, EvalConfig, evaluate
    from jf_ray.modeling import set_torch_threads
    from jf_ray.storage import check_writable_file

    if args.json_out:
        check_writable_file(args.json_out, "--json")
    set_torch_threads(args.threads)
    if args.max_new_tokens is None:
        args.max_new_tokens = DEFAULT_MAX_NEW_TOKENS[args.task]
    config = EvalConfig(
        model=args.model,
        task=args.task,
        split=args.split,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        decode=decode_config_from_args(args, decoder=args.decoder),
    )
    report = evaluate(config, progress=_progress_bar(args.n))
    print_summary(report)
    if args.json_out:
        from jf_ray.storage import write_json_atomic

        write_json_atomic(args.json_out, report)
        print(f"wrote {args.json_out}")
    return 0


def _progress_bar(total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc="eval", unit="example", leave=False)
    return lambda done: bar.update(done - bar.n)


def print_summary(report: dict) -> None:
    quality = ["accuracy", "correct"] if report["task"] == "math" else ["loss", "parse_rate"]
    stats = report["stats"]
    row = {
        "task": report["task"],
        "n": report["n"],
        "decoder": report["decoder"],
        **{k: report[k] for k in quality},
        **{k: stats[k] for k in ("tokens", "forwards", "tpf", "tokens_per_s", "wall_s")},
    }
    print("  ".join(f"{k}={v}" for k, v in row.items()))
